"""A denoiser pipeline of B stage actors, one band of the queue per GPU.

With `pipeline.bands` B > 1 a QueueServer replica is one pipeline and does not run the model
itself: its B `StageActor`s take the bundles of its placement group after its own (one per
stage with `serve.stage.num_gpus` GPUs; strategy `serve.stage.placement`, PACK by default:
a pipeline's stages on one node when they fit, NVLink between them, spread over nodes when
they must). Stage b holds band b of the queues of every session on the pipeline
(`dwm.pipelines.stages.BandStage`), with the denoiser; the last stage also holds the
decoder. The replica keeps each session's front (its noise, its phase and the text encoder),
feeds the stages the new frames and takes the decoded frames from the last stage.

A round of a pipeline is one execution of its compiled graph (Ray Compiled Graphs,
`serve.stage.compiled_graph`; `auto`, the default, where the stages have GPUs):

    round input --> stage 0 step --> stage 1 take    (frames handed on, stage to stage)
                \\-> stage 1 step --> stage 2 take
                \\-> ...           --> decoded frames out of the last stage

Every stage steps at once; each hands its frames to the next itself (shared memory between
processes on one node; NCCL between GPU stages, `with_tensor_transport`), and only the
round's input and the decoded frames pass through this process. With `compiled_graph=false`
the same stage methods are called round by round with plain Ray calls, every hand-over
through this process: the path to compare against (bench/bench_pool.py), and the default
for stages without GPUs, because a stage waiting on a graph's channel spins its CPU core
(0.96 of a core per waiting stage, measured on a quiet 2-core machine), taking it from the
stages with model work.

When a stage dies the pipeline is given up (`PipelineLost`): its queues are gone, its replica
fails Serve's health check and Serve starts a new one, and the session owners rebuild the
queues of its sessions on the other pipelines (`deployments.pipeline_queues`).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field, replace

import numpy as np
import ray
import torch
from omegaconf import DictConfig, OmegaConf
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import RayActorError, RayChannelError
from ray.experimental.channel.cpu_communicator import CPUCommunicator
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.logs import route_library_logs
from dwm.conditions.packed import PackedConditions
from dwm.models.base import LatentDecoder, TextEmbedding, TextEncoder
from dwm.models.checkpoint import build_denoiser
from dwm.pipelines.fifo import Entry, LatentFrame, QueueFront, QueueSchedule
from dwm.pipelines.stages import BandStage, FrameInputs, SessionFront, handed_bytes
from dwm.pipelines.streaming import build_decoder, build_text_encoder, frame_shape, model_dtype

log = logging.getLogger("ray.serve")

# What a failed round of a pipeline raises: a stage died (plain calls), or the compiled
# graph's channels closed because one did.
STAGE_LOST = (RayActorError, RayChannelError)
# A round takes what it takes (many sessions on a slow device): the compiled graph's
# waits are bounded only by this. (A timeout of -1, "forever" in Ray's docs, is turned into
# -1000 ms by its shared-memory channel and fails at once.)
ROUND_TIMEOUT_S = 24 * 3600.0


def queue_schedule(cfg: DictConfig) -> QueueSchedule:
    """The schedule of `cfg.pipeline`: every stage's and every session front's."""
    p = cfg.pipeline
    return QueueSchedule(p.steps, p.window, p.bands, p.shift, p.train_steps)


@dataclass
class RoundInput:
    """What every stage of a pipeline is given for one round.

    entering: per band, session -> the entries into it from the session's front (the new
    frame into band 0 once the queue runs; while it warms up, the slots of every band at
    the first push, then frame k into slot k); pushes: session -> the number of its push
    this round (sessions without a frame this round are absent);
    opened: session -> its V empty captions' embedding, for sessions new on this pipeline;
    closed: sessions to drop. Opens and closes apply before the round's frames.
    """

    entering: list[dict[str, list[Entry]]]
    pushes: dict[str, int]
    opened: dict[str, TextEmbedding] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)


@ray.remote
class StageActor:
    """Band `band` of a pipeline: the denoiser (and the decoder on the last stage) and that
    band of its sessions' queues."""

    def __init__(self, cfg: dict, band: int):
        route_library_logs()
        cfg = OmegaConf.create(cfg)
        gpus = ray.get_gpu_ids()
        if str(cfg.device).startswith("cuda") and torch.cuda.is_available():
            cfg.device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        threads = cfg.serve.stage.torch_threads
        if threads:
            torch.set_num_threads(int(threads))
        p = cfg.pipeline
        schedule = queue_schedule(cfg)
        last = band == schedule.bands - 1
        self.stage = BandStage(
            build_denoiser(cfg, torch.device(cfg.device), model_dtype(cfg)),
            build_decoder(cfg) if last else None,
            band, schedule, guidance=p.guidance, resolution=p.resolution, output_size=p.output_size,
            device=cfg.device,
            dtype=model_dtype(cfg), batch_sessions=bool(cfg.serve.stage.batch_sessions),
            keep_on_device=str(cfg.device).startswith("cuda"),
        )
        context = ray.get_runtime_context()
        self.placement = {
            "band": band, "gpu_ids": [str(g) for g in gpus], "node_id": context.get_node_id(),
            "actor": context.get_actor_name(),
        }

    def where(self) -> dict:
        return self.placement

    def holds(self) -> dict[str, str]:
        """The model parts this stage holds: attribute -> class name, for every torch module,
        decoder and text encoder its `BandStage` keeps."""
        parts = (torch.nn.Module, LatentDecoder, TextEncoder)
        return {name: type(value).__name__ for name, value in vars(self.stage).items() if isinstance(value, parts)}

    def step(self, work: RoundInput) -> tuple[dict, float]:
        """The stage's step of a round; returns (its frames handed out, seconds it worked)."""
        start = time.perf_counter()
        for session_id in work.closed:
            self.stage.close(session_id)
        for session_id, empty_text in work.opened.items():
            self.stage.open(session_id, empty_text)
        entering = {sid: [e._replace(frame=_owned(e.frame)) for e in entries]
                    for sid, entries in work.entering[self.stage.band].items()}
        out = self.stage.step(entering, work.pushes)
        return out, time.perf_counter() - start

    def take(self, handed: tuple[dict, float]) -> dict:
        """The previous stage's hand-over of this round joins this stage's bands; returns what
        crossed (frames, bytes) and the seconds both stages worked on it."""
        frames, step_s = handed
        start = time.perf_counter()
        self.stage.take({sid: _owned(frame) for sid, frame in frames.items()})
        return {"frames": len(frames), "bytes": sum(handed_bytes(f) for f in frames.values()),
                "previous_step_s": step_s, "take_s": time.perf_counter() - start}


def _owned(frame: LatentFrame) -> LatentFrame:
    """The frame with arrays of its own. A compiled graph's channel hands NumPy arrays over
    without a copy, as views of its buffer, and a buffer is written again only when no view of
    it is left: a frame kept in a band with such a view would hold its buffer for the frame's
    whole stay, and after as many rounds as the channel has buffers the round input could no
    longer be written (the graph stops)."""
    inputs: FrameInputs | None = frame.payload
    if inputs is None:  # a slot's noise: a tensor, which the channel copies
        return frame
    conditions = replace(inputs.conditions, camera_params=np.array(inputs.conditions.camera_params))
    return LatentFrame(frame.latent, frame.index, inputs._replace(conditions=conditions))


@dataclass
class Handover:
    """Running totals of the frames carried from one stage to the next, and of what a round
    costs beyond its slowest stage's own work (starting the round, carrying the frames)."""

    frames: int = 0
    bytes: int = 0
    rounds: int = 0
    overhead_s: float = 0.0  # round wall time minus the slowest stage's work, summed
    work_s: float = 0.0  # the slowest stage's work (its step and its take), summed
    wall_s: float = 0.0  # the rounds' wall time, summed
    stage_s: list[float] = field(default_factory=list)  # per stage, its work, summed
    last_overhead_s: float = 0.0  # the latest round's

    def add(self, wall_s: float, stage_work_s: list[float], crossed: list[dict]) -> None:
        work = max(stage_work_s)
        self.last_overhead_s = max(wall_s - work, 0.0)
        self.rounds += 1
        self.work_s += work
        self.wall_s += wall_s
        self.overhead_s += max(wall_s - work, 0.0)
        self.stage_s = [a + b for a, b in zip(self.stage_s, stage_work_s)] if self.stage_s else list(stage_work_s)
        self.frames += sum(c["frames"] for c in crossed)
        self.bytes += sum(c["bytes"] for c in crossed)

    def stats(self) -> dict:
        rounds = max(self.rounds, 1)
        return {
            "frames": self.frames, "bytes_per_frame": self.bytes // max(self.frames, 1), "rounds": self.rounds,
            "overhead_ms_per_round": round(1e3 * self.overhead_s / rounds, 3),
            "stage_work_ms_per_round": round(1e3 * self.work_s / rounds, 3),
            # per stage: the fraction of the rounds' wall time it did no work of its own
            "stage_idle": [round(1 - s / self.wall_s, 4) for s in self.stage_s] if self.wall_s else [],
        }


def compile_pipeline(stages: list, on_gpus: bool, transport: str = "auto") -> object:
    """The compiled graph of one round over `stages` (see the module docstring): every stage
    steps on the round's input, each stage b > 0 takes stage b-1's hand-over; the outputs are
    the last stage's step and every take's account. on_gpus: the hand-overs' tensors go
    device to device (NCCL), overlapped with the stages' compute. transport "cpu_communicator"
    (`serve.stage.transport`): the hand-overs' tensors go through Ray's CPU communicator, the
    collective path of GPU stages taken by stages on CPUs (how that path is tested without
    GPUs); "auto": NCCL on GPUs, else the frames are pickled into shared memory."""
    with InputNode() as work:
        steps = [stage.step.bind(work) for stage in stages]
        if transport == "cpu_communicator":
            communicator = CPUCommunicator(len(stages), stages)
            steps[:-1] = [step.with_tensor_transport(transport=communicator) for step in steps[:-1]]
        elif on_gpus:
            steps[:-1] = [step.with_tensor_transport("auto") for step in steps[:-1]]
        takes = [stage.take.bind(handed) for stage, handed in zip(stages[1:], steps[:-1])]
        graph = MultiOutputNode([steps[-1], *takes])
    return graph.experimental_compile(_submit_timeout=ROUND_TIMEOUT_S, _overlap_gpu_communication=on_gpus)


class PipelineLost(RuntimeError):
    """A stage of the pipeline died: its queues are gone and it takes no more sessions."""


class StagePipeline:
    """One pipeline of B stage actors, the text encoder and its sessions' fronts.

    Inside a Serve replica whose placement group has a bundle per stage after its own
    (`deployments.builder`), stage b takes bundle b + 1; elsewhere (a test, a benchmark) the
    pipeline makes a placement group of its own, one bundle per stage."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.plain = OmegaConf.to_container(cfg, resolve=True)
        s = cfg.serve
        self.bands = int(cfg.pipeline.bands)
        bundle = stage_bundle(cfg)
        # A stage waiting on a compiled graph's channel spins its CPU core: where the stages
        # have no GPUs of their own, that core is one the model needs.
        gpus = "GPU" in bundle
        use_graph = gpus if s.stage.compiled_graph == "auto" else bool(s.stage.compiled_graph)
        group, first = get_current_placement_group(), 1
        self._own_group = group is None
        if self._own_group:
            group, first = placement_group([dict(bundle) for _ in range(self.bands)], strategy=str(s.stage.placement)), 0
        if not group.wait(timeout_seconds=float(s.stage.start_timeout_s)):
            raise RuntimeError(
                f"denoiser pipeline: {self.bands} stages of {bundle} do not fit the cluster "
                f"(serve.pipelines={s.pipelines}, pipeline.bands={self.bands}, serve.stage.*); "
                f"it has {ray.cluster_resources()}"
            )
        self.group = group
        self.name = f"dwm-stage-{secrets.token_hex(3)}"  # its stage actors: {name}-b{band}
        self.stages = [
            StageActor.options(
                name=f"{self.name}-b{b}", num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=first + b),
            ).remote(self.plain, b)
            for b in range(self.bands)
        ]
        ray.get([stage.where.remote() for stage in self.stages])  # built, or the error now
        on_gpus = gpus and str(cfg.device).startswith("cuda")
        self.graph = compile_pipeline(self.stages, on_gpus, transport=str(s.stage.transport)) if use_graph else None
        self.text_encoder = build_text_encoder(cfg)  # one for every session: the prompt cache is shared
        self.fronts: dict[str, SessionFront] = {}
        self.frames_out: dict[str, int] = {}
        self.opened: dict[str, TextEmbedding] = {}  # for the next round
        self.closed: list[str] = []  # for the next round
        self.handover = Handover()
        self.latent_channels = int(cfg.model.denoiser.latent_channels)
        self.lost = False

    # ------------------------------------------------------------------ sessions

    def open(self, session_id: str, views: int, seed: int | None) -> int:
        """A new queue for the session; returns its depth."""
        if self.lost:
            raise PipelineLost("this denoiser pipeline lost a stage and takes no new sessions")
        p = self.cfg.pipeline
        shape = frame_shape(views, self.latent_channels, p.resolution)
        front = QueueFront(queue_schedule(self.cfg), shape, int(self.cfg.seed if seed is None else seed), p.text_interval)
        self.fronts[session_id] = SessionFront(front, self.text_encoder, views)
        self.frames_out[session_id] = 0
        self.opened[session_id] = self.fronts[session_id].empty_text  # the stages open it with its next round
        return front.schedule.depth

    def close(self, session_id: str) -> None:
        if self.fronts.pop(session_id, None) is None:
            return
        self.frames_out.pop(session_id, None)
        if self.opened.pop(session_id, None) is None:  # the stages hold it: drop it with the next round
            self.closed.append(session_id)

    @property
    def sessions(self) -> list[str]:
        return list(self.fronts)

    # ------------------------------------------------------------------ rounds

    def push_many(self, frames: dict[str, PackedConditions]) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """One round: each session's new conditions in, the frames that leave out: session ->
        [(frame index, images (V, h, w, 3) uint8)]. Raises PipelineLost when a stage has died
        (the queues are gone with it)."""
        if self.lost:
            raise PipelineLost("this denoiser pipeline lost a stage")
        mine = {sid: c for sid, c in frames.items() if sid in self.fronts}
        if not mine:
            return {}
        work = RoundInput([{} for _ in range(self.bands)], {}, self.opened, self.closed)
        self.opened, self.closed = {}, []
        for sid, conditions in mine.items():
            pushed, entries = self.fronts[sid].enter(conditions)
            for entry in entries:
                work.entering[entry.band].setdefault(sid, []).append(entry)
            work.pushes[sid] = pushed
        start = time.perf_counter()
        try:
            images, work_s, crossed = self._finish(self._start(work))
        except STAGE_LOST as err:
            log.error("denoiser pipeline %s lost a stage (%s); its sessions %s lose their queues",
                      self.name, type(err).__name__, sorted(self.fronts))
            self.shutdown()
            raise PipelineLost(f"a stage of this denoiser pipeline died: {type(err).__name__}") from None
        self.handover.add(time.perf_counter() - start, work_s, crossed)
        out: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for sid, views in images.items():
            if sid in self.frames_out:
                out[sid] = [(self.frames_out[sid], views)]
                self.frames_out[sid] += 1
        return out

    def _start(self, work: RoundInput):
        """Start a round; `_finish` waits for it."""
        if self.graph is not None:
            return self.graph.execute(work)
        return [stage.step.remote(work) for stage in self.stages]

    def _finish(self, started) -> tuple[dict, list[float], list[dict]]:
        """(session -> decoded views from the last stage, each stage's work in seconds, what
        crossed each hand-over)."""
        if self.graph is not None:
            (out, last_s), *crossed = [ref.get(timeout=ROUND_TIMEOUT_S) for ref in started]
        else:  # this process carries each stage's hand-over to the next itself
            steps = ray.get(started)
            crossed = ray.get([stage.take.remote(handed) for stage, handed in zip(self.stages[1:], steps[:-1])])
            out, last_s = steps[-1]
        work = [c["previous_step_s"] + (crossed[b - 1]["take_s"] if b else 0.0) for b, c in enumerate(crossed)]
        work.append(last_s + (crossed[-1]["take_s"] if crossed else 0.0))
        return out, work, crossed

    def placement(self) -> list[dict]:
        """Each stage's band, GPU ids, node and actor name (none once a stage is lost)."""
        return [] if self.lost else ray.get([s.where.remote() for s in self.stages])

    def shutdown(self) -> None:
        """Tear the graph, the stages and (when it made it) the placement group down."""
        if self.lost:
            return
        self.lost = True
        if self.graph is not None:
            try:
                self.graph.teardown()
            except Exception:  # a stage already gone: nothing left to tear down there
                pass
            self.graph = None
        for stage in self.stages:
            ray.kill(stage, no_restart=True)
        if self._own_group:
            remove_placement_group(self.group)


def stage_bundle(cfg: DictConfig) -> dict[str, float]:
    """The Ray resources of one stage: `serve.stage.num_cpus` CPUs and `serve.stage.num_gpus`
    GPUs (null: one where the model runs on CUDA)."""
    s = cfg.serve.stage
    bundle = {"CPU": float(s.num_cpus)}
    gpus = s.num_gpus
    if gpus is None:
        gpus = 1 if str(cfg.device).startswith("cuda") else 0
    if gpus:
        bundle["GPU"] = float(gpus)
    return bundle
