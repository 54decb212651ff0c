"""The denoiser pool: P pipelines of B stage actors, one band of the queue per GPU.

With `pipeline.bands` B > 1 or `serve.pipelines` P > 1 the QueueServer replica does not run the
model itself: it places P pipelines, each B `StageActor`s in a placement group (one bundle
per stage with `serve.stage.num_gpus` GPUs; strategy `serve.stage.placement`, PACK by
default: a pipeline's stages on one node when they fit, NVLink between them, spread over
nodes when they must). Stage b of a pipeline holds band b of the queues of every session on
that pipeline (`dwm.pipelines.stages.BandStage`); the pool keeps each session's
`QueueFront` and, per round, calls every stage of every pipeline at once and carries each
stage's handed-on frames to the next stage for the next round.

A session joins the pipeline with the fewest sessions. When a stage dies, its pipeline is
given up: its sessions are rebuilt on the healthy pipelines (a new queue that warms up
again; the frames that were inside are lost and counted), keeping their ids and streams.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dwm.conditions.packed import PackedConditions
from dwm.pipelines.fifo import LatentFrame, Phase, QueueFront, QueueSchedule
from dwm.pipelines.stages import BandStage, enter_conditions, handed_bytes
from dwm.pipelines.streaming import StreamingPipeline, frame_shape, model_dtype

log = logging.getLogger("ray.serve")


def queue_schedule(cfg: DictConfig) -> QueueSchedule:
    """The schedule of `cfg.pipeline`: every stage's and every session front's."""
    p = cfg.pipeline
    return QueueSchedule(p.steps, p.window, p.bands, p.shift, p.train_steps)


@ray.remote
class StageActor:
    """Band `band` of a pipeline: the model and that band of its sessions' queues."""

    def __init__(self, cfg: dict, band: int):
        cfg = OmegaConf.create(cfg)
        gpus = ray.get_gpu_ids()
        if str(cfg.device).startswith("cuda") and torch.cuda.is_available():
            cfg.device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        threads = cfg.serve.stage.torch_threads
        if threads:
            torch.set_num_threads(int(threads))
        model = StreamingPipeline.build_model(cfg)
        p = cfg.pipeline
        self.stage = BandStage(
            model, band, queue_schedule(cfg), guidance=p.guidance, resolution=p.resolution,
            device=cfg.device, dtype=model_dtype(cfg), batch_sessions=bool(cfg.serve.stage.batch_sessions),
        )
        context = ray.get_runtime_context()
        self.placement = {
            "band": band, "gpu_ids": [str(g) for g in gpus], "node_id": context.get_node_id(),
            "actor": context.get_actor_name(),
        }

    def where(self) -> dict:
        return self.placement

    def open(self, session_id: str) -> None:
        self.stage.open(session_id)

    def close(self, session_id: str) -> None:
        self.stage.close(session_id)

    def round(self, entering: dict[str, LatentFrame], phases: dict[str, Phase]) -> tuple[dict, float]:
        """The stage's round, and the seconds it worked on it (its model calls and updates)."""
        start = time.perf_counter()
        out = self.stage.round(entering, phases)
        return out, time.perf_counter() - start


@dataclass
class Handover:
    """Running totals of the frames carried from one stage to the next, and of what a round
    costs beyond its slowest stage's own work (calling the stages, carrying the frames)."""

    frames: int = 0
    bytes: int = 0
    rounds: int = 0
    overhead_s: float = 0.0  # round wall time minus the slowest stage's work, summed
    work_s: float = 0.0  # the slowest stage's work, summed

    def stats(self) -> dict:
        rounds = max(self.rounds, 1)
        return {
            "frames": self.frames, "bytes_per_frame": self.bytes // max(self.frames, 1), "rounds": self.rounds,
            "overhead_ms_per_round": round(1e3 * self.overhead_s / rounds, 3),
            "stage_work_ms_per_round": round(1e3 * self.work_s / rounds, 3),
        }


@dataclass
class Pipeline:
    index: int
    stages: list  # StageActor handles, band order
    group: object  # its placement group
    sessions: set[str] = field(default_factory=set)
    pending: list[dict] = field(default_factory=list)  # per stage: frames handed on for the next round
    healthy: bool = True


class DenoiserPool:
    """P pipelines of B stage actors and every session's queue front."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.plain = OmegaConf.to_container(cfg, resolve=True)
        s, p = cfg.serve, cfg.pipeline
        self.bands = int(p.bands)
        bundle = {"CPU": float(s.stage.num_cpus)}
        gpus = s.stage.num_gpus
        if gpus is None:  # one GPU per stage where the model runs on GPUs
            gpus = 1 if str(cfg.device).startswith("cuda") else 0
        if gpus:
            bundle["GPU"] = float(gpus)
        self.pipelines: list[Pipeline] = []
        self.name = f"dwm-stage-{secrets.token_hex(3)}"  # stage actors: {name}-p{pipeline}-b{band}
        for i in range(int(s.pipelines)):
            group = placement_group([dict(bundle) for _ in range(self.bands)], strategy=str(s.stage.placement))
            if not group.wait(timeout_seconds=float(s.stage.start_timeout_s)):
                raise RuntimeError(
                    f"denoiser pipeline {i}: {self.bands} stages of {bundle} do not fit the cluster "
                    f"(serve.pipelines={s.pipelines}, pipeline.bands={self.bands}, serve.stage.*); "
                    f"it has {ray.cluster_resources()}"
                )
            stages = [
                StageActor.options(
                    name=f"{self.name}-p{i}-b{b}", num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b),
                ).remote(self.plain, b)
                for b in range(self.bands)
            ]
            ray.get([stage.where.remote() for stage in stages])  # built, or the error now
            self.pipelines.append(Pipeline(i, stages, group, pending=[{} for _ in range(self.bands)]))
        self.fronts: dict[str, QueueFront] = {}
        self.seeds: dict[str, int] = {}
        self.where: dict[str, Pipeline] = {}
        self.frames_out: dict[str, int] = {}
        self.handover = Handover()
        self.latent_channels = int(cfg.model.denoiser.latent_channels)

    # ------------------------------------------------------------------ sessions

    def open(self, session_id: str, views: int, seed: int | None) -> int:
        """A new queue for the session on the least-loaded pipeline; returns its depth."""
        self.seeds[session_id] = int(self.cfg.seed if seed is None else seed)
        self.frames_out.setdefault(session_id, 0)
        return self._attach(session_id, views)

    def _attach(self, session_id: str, views: int) -> int:
        pipeline = self._least_loaded()
        ray.get([stage.open.remote(session_id) for stage in pipeline.stages])
        p = self.cfg.pipeline
        shape = frame_shape(views, self.latent_channels, p.resolution)
        front = QueueFront(queue_schedule(self.cfg), shape, self.seeds[session_id], p.text_interval)
        self.fronts[session_id] = front
        self.where[session_id] = pipeline
        pipeline.sessions.add(session_id)
        return front.schedule.depth

    def close(self, session_id: str) -> None:
        pipeline = self.where.pop(session_id, None)
        for table in (self.fronts, self.frames_out, self.seeds):
            table.pop(session_id, None)
        if pipeline is None:
            return
        pipeline.sessions.discard(session_id)
        for pending in pipeline.pending:
            pending.pop(session_id, None)
        if pipeline.healthy:
            try:
                ray.get([stage.close.remote(session_id) for stage in pipeline.stages])
            except RayActorError:
                self._fail(pipeline)

    def _least_loaded(self) -> Pipeline:
        healthy = [p for p in self.pipelines if p.healthy]
        if not healthy:
            raise RuntimeError("no denoiser pipeline is running: every one lost a stage")
        return min(healthy, key=lambda p: (len(p.sessions), p.index))

    # ------------------------------------------------------------------ rounds

    def push_many(self, frames: dict[str, PackedConditions]) -> tuple[dict[str, list[tuple[int, torch.Tensor]]], dict[str, int]]:
        """One round: each session's new conditions in, the frames that leave out.

        Returns (session -> [(frame index, images (V, 3, H, W))], session -> frames lost by a
        restart of its queue in this round). All pipelines' stages run at once."""
        calls, waiting_by = [], {}
        for pipeline in self.pipelines:
            mine = {sid: c for sid, c in frames.items() if self.where.get(sid) is pipeline}
            if not pipeline.healthy or not mine:
                continue
            # Frames handed on enter with their session's next frame; a session that skips a
            # round keeps them waiting (its bands must not take a frame without a shift).
            entering = [{sid: f for sid, f in pending.items() if sid in mine} for pending in pipeline.pending]
            waiting = [{sid: f for sid, f in pending.items() if sid not in mine} for pending in pipeline.pending]
            phases = {}
            for sid, conditions in mine.items():
                entry = enter_conditions(self.fronts[sid], conditions)
                entering[entry.band][sid] = entry.frame
                phases[sid] = entry.phase
            waiting_by[pipeline.index] = waiting
            start = time.perf_counter()
            calls.append((pipeline, start, [stage.round.remote(entering[b], phases) for b, stage in enumerate(pipeline.stages)]))
        out: dict[str, list[tuple[int, torch.Tensor]]] = {}
        restarted: dict[str, int] = {}
        for pipeline, start, refs in calls:
            try:
                answers = ray.get(refs)
            except RayActorError:
                restarted.update(self._fail(pipeline))
                continue
            results = [out for out, _ in answers]
            work = max(seconds for _, seconds in answers)
            self.handover.rounds += 1
            self.handover.work_s += work
            self.handover.overhead_s += max(time.perf_counter() - start - work, 0.0)
            waiting = waiting_by[pipeline.index]
            pipeline.pending = [{**waiting[0]}] + [{**w, **r} for w, r in zip(waiting[1:], results[:-1])]
            for handed in results[:-1]:
                self.handover.frames += len(handed)
                self.handover.bytes += sum(handed_bytes(f) for f in handed.values())
            for sid, images in results[-1].items():
                if sid in self.frames_out:
                    out[sid] = [(self.frames_out[sid], images)]
                    self.frames_out[sid] += 1
        return out, restarted

    def _fail(self, pipeline: Pipeline) -> dict[str, int]:
        """Give up a pipeline that lost a stage; rebuild its sessions on the healthy ones.
        Returns session -> frames that were inside its old queue (pushed, never out: lost)."""
        pipeline.healthy = False
        moving, pipeline.sessions = sorted(pipeline.sessions), set()
        pipeline.pending = [{} for _ in range(self.bands)]
        log.error("denoiser pipeline %d lost a stage; moving its sessions %s", pipeline.index, moving)
        for stage in pipeline.stages:
            ray.kill(stage, no_restart=True)
        remove_placement_group(pipeline.group)
        lost = {}
        for sid in moving:
            front = self.fronts[sid]
            lost[sid] = front.pushed - self.frames_out[sid]
            self._attach(sid, front.frame_shape[0])
        return lost

    def placement(self) -> list[dict]:
        """Per pipeline: healthy, sessions, and each stage's band, GPU ids and node."""
        out = []
        for pipeline in self.pipelines:
            stages = ray.get([s.where.remote() for s in pipeline.stages]) if pipeline.healthy else []
            out.append({"index": pipeline.index, "healthy": pipeline.healthy,
                        "sessions": sorted(pipeline.sessions), "stages": stages})
        return out
