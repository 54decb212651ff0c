"""The QueueServer deployment: one denoiser pipeline, the queues of the sessions placed on it.

Serve owns the pipelines: `serve.pipelines` is the deployment's number of replicas, each one
pipeline, and a session owner places a new session's queue on the one with the fewest
sessions (`deployments.pipeline_queues`, which asks each its `load`), and every later call
about it goes to that pipeline (`deployments.routing`).

`pipeline.bands` 1 (the default): the replica holds the model and each session's
`StreamingPipeline` (its FIFO queue and cached contexts) around it. A round hands all its
sessions' new conditions over in one call (`push_many`, conditions packed to uint8 layouts),
and every Euler step of that round is one model call over all the sessions' windows
(`dwm.pipelines.streaming.push_many`).

More bands: the replica is a pipeline of B stage actors, one band per GPU, in the bundles of
its placement group (`deployments.stages.StagePipeline`), and holds no model itself.

`pipeline.cfg_parallel=true` (one band): a `CfgPartner` actor on a second GPU (the second
bundle) runs every session's queue beside the replica's, each computing half the rows of
every model call and exchanging the outputs (`dwm.pipelines.cfg_parallel`); the replica
hands out the frames.

A pipeline that loses a stage (or its partner) gives its sessions back as `unknown` (their
owners open their queues again elsewhere), takes no new ones and fails Serve's health check:
Serve replaces it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from ray import serve
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments import metrics
from deployments.logs import route_library_logs
from deployments.memory import HeapTrimmer
from deployments.pipeline_scaling import autoscaled
from deployments.routing import replica_tag
from deployments.stages import STAGE_LOST, PipelineLost, StagePipeline, queue_schedule
from dwm.conditions.packed import PackedConditions
from dwm.pipelines.cfg_parallel import RowParallelDenoiser, join_group
from dwm.pipelines.streaming import StreamingPipeline, push_many

log = logging.getLogger("ray.serve")
LOST_LOAD = 1e9  # the load a lost pipeline reports: no new session goes there
WANTED_TTL_S = 10.0  # s an owner's report of its sessions counts (owners report every round)


class PipelineFull(RuntimeError):
    """The pipeline holds `serve.pipeline_sessions` sessions already."""


@dataclass
class GeneratedImages:
    """A generated frame on its way back: index (its queue's frame count) and images,
    (V, h, w, 3) uint8 at the output size (`dwm.pipelines.decode`)."""

    index: int
    images: torch.Tensor


@dataclass
class DenoisedRound:
    """What a round gives back: the pictures leaving the queues, and the sessions this
    pipeline holds no queue for (it is a new replica, or it lost a stage: open them again)."""

    images: dict[str, list[GeneratedImages]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


class SessionQueues:
    """Every session's `StreamingPipeline` around one model, in this process. rank, world:
    this process's place in a CFG-parallel group that has been joined (world 1: alone)."""

    def __init__(self, cfg: DictConfig, rank: int = 0, world: int = 1):
        self.cfg = cfg
        model = StreamingPipeline.build_model(cfg)
        if world > 1:
            model = model._replace(denoiser=RowParallelDenoiser(model.denoiser, rank, world))
        self.model = model
        self.device = torch.device(cfg.device)  # layouts cross to it as uint8
        self.pipelines: dict[str, StreamingPipeline] = {}

    def open(self, session_id: str, views: int, seed: int | None = None) -> int:
        pipeline = StreamingPipeline.from_config(self.cfg, views, model=self.model, seed=seed)
        self.pipelines[session_id] = pipeline
        return pipeline.depth

    def close(self, session_id: str) -> None:
        self.pipelines.pop(session_id, None)

    def push_many(self, frames: dict[str, PackedConditions]) -> dict[str, list[GeneratedImages]]:
        ids = [session_id for session_id in frames if session_id in self.pipelines]
        pushed = push_many([(self.pipelines[i], frames[i].unpack(self.device)) for i in ids])
        return {i: [GeneratedImages(f.index, f.images) for f in out] for i, out in zip(ids, pushed)}


@ray.remote
class CfgPartner:
    """Rank 1 of a CFG-parallel pair: the same sessions' queues as the QueueServer's, each
    model call's second half of rows. Joins the group at tcp://address:port."""

    def __init__(self, cfg: dict, address: str, port: int):
        route_library_logs()
        cfg = OmegaConf.create(cfg)
        if str(cfg.device).startswith("cuda"):
            cfg.device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        threads = cfg.serve.denoiser.torch_threads
        if threads:
            torch.set_num_threads(int(threads))
        join_group(address, port, 1, 2, torch.device(cfg.device))
        self.queues = SessionQueues(cfg, rank=1, world=2)

    def open(self, session_id: str, views: int, seed: int | None = None) -> int:
        return self.queues.open(session_id, views, seed)

    def close(self, session_id: str) -> None:
        self.queues.close(session_id)

    def push_many(self, frames: dict[str, PackedConditions]) -> int:
        """The same round as the QueueServer's; its frames stay here (the replica's are the same)."""
        return sum(len(out) for out in self.queues.push_many(frames).values())


@serve.deployment(name="QueueServer", num_replicas=1)
class QueueServer:
    def __init__(self, cfg: dict):
        route_library_logs()
        self.cfg = OmegaConf.create(cfg)
        self.tag = replica_tag()
        threads = self.cfg.serve.denoiser.torch_threads
        if threads:
            torch.set_num_threads(int(threads))
        self.stages = StagePipeline(self.cfg) if int(self.cfg.pipeline.bands) > 1 else None
        self.partner = None
        if self.stages:
            self.queues = None
        elif self.cfg.pipeline.cfg_parallel:
            address = ray.util.get_node_ip_address()
            port = _free_port(address)
            s = self.cfg.serve.denoiser
            group = get_current_placement_group()  # the partner takes its second bundle
            where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=1) if group else None
            self.partner = CfgPartner.options(
                num_cpus=s.num_cpus, num_gpus=s.num_gpus, scheduling_strategy=where
            ).remote(cfg, address, port)
            join_group(address, port, 0, 2, torch.device(self.cfg.device))
            self.queues = SessionQueues(self.cfg, rank=0, world=2)
        else:
            self.queues = SessionQueues(self.cfg)
        self.lost: str | None = None  # why this pipeline lost its queues and takes no new sessions
        capacity = self.cfg.serve.pipeline_sessions
        self.capacity = None if capacity is None else int(capacity)  # sessions it takes at most
        self._wanted: dict[str, tuple[int, float]] = {}  # owner -> its sessions that want a queue, when it said so
        # Serve runs sync methods on a thread pool; the model and the queues are used by one
        # call at a time.
        self._lock = threading.Lock()
        # Monotonic s of each session's last push: a queue no session owner has pushed to for
        # serve.lease_s was left by an owner that died, and is given back.
        self._lease_s = float(self.cfg.serve.lease_s)
        self._pushed: dict[str, float] = {}
        self._trimmer = HeapTrimmer(self.cfg.serve.trim_every_s)
        # Model calls per round: s steps per shift, one call each for the B windows at once
        # (batch_bands) or one per window.
        schedule = queue_schedule(self.cfg)
        self._autoscaled = autoscaled(self.cfg)
        self._calls_per_round = schedule.steps_per_shift * (1 if self.cfg.pipeline.batch_bands else schedule.bands)

    def open(self, session_id: str, views: int, seed: int | None = None) -> int:
        """A new, empty queue for a session; returns its depth (frames from conditions in to picture out - 1)."""
        with self._lock:
            if self.lost:
                raise PipelineLost(f"denoiser pipeline {self.tag} takes no sessions: {self.lost}")
            if self.capacity is not None and len(self._pushed) >= self.capacity:
                raise PipelineFull(
                    f"every denoiser pipeline is full (each takes {self.capacity} at most, config "
                    "serve.pipeline_sessions): the session waits for room"
                    + (" (Serve adds pipelines up to serve.max_pipelines)" if self._autoscaled else "")
                )
            self._pushed[session_id] = time.monotonic()
            if self.stages:
                depth = self.stages.open(session_id, views, seed)
            else:
                if self.partner:
                    ray.get(self.partner.open.remote(session_id, views, seed))
                depth = self.queues.open(session_id, views, seed)
            return depth

    def close(self, session_id: str) -> None:
        """Drop a session's queue state."""
        with self._lock:
            self._close(session_id)

    def _close(self, session_id: str) -> None:
        self._pushed.pop(session_id, None)
        if self.lost:
            return
        if self.stages:
            self.stages.close(session_id)
            return
        if self.partner:
            ray.get(self.partner.close.remote(session_id))
        self.queues.close(session_id)

    def sessions(self) -> list[str]:
        if self.lost:
            return []
        return self.stages.sessions if self.stages else list(self.queues.pipelines)

    def push_many(self, frames: dict[str, PackedConditions]) -> DenoisedRound:
        """Push each session's new conditions; returns the pictures that leave the queues
        (without their conditions: the caller has them). A session without a queue here is
        named in `unknown` and its frame dropped."""
        with self._lock:
            started = time.perf_counter()
            now = time.monotonic()
            self._pushed.update(dict.fromkeys(frames, now))
            for session_id in [sid for sid, at in self._pushed.items() if at < now - self._lease_s]:
                self._close(session_id)
            try:
                return self._push_many(frames)
            finally:
                self._trimmer.maybe()
                took = time.perf_counter() - started
                metrics.denoise_seconds().observe(took)
                metrics.model_call_seconds().set(took / self._calls_per_round)
                metrics.handover_seconds().set(self.stages.handover.last_overhead_s if self.stages else 0.0)

    def _push_many(self, frames: dict[str, PackedConditions]) -> DenoisedRound:
        held = set(self.sessions())
        unknown = [sid for sid in frames if sid not in held]
        frames = {sid: c for sid, c in frames.items() if sid in held}
        try:
            if self.stages:
                images = {sid: [GeneratedImages(i, im) for i, im in out]
                          for sid, out in self.stages.push_many(frames).items()}
            else:
                partner = self.partner.push_many.remote(frames) if self.partner else None
                images = self.queues.push_many(frames)  # with the partner's half of every call
                if partner is not None:
                    ray.get(partner)
        except (PipelineLost, *STAGE_LOST) as err:
            self._lose(str(err) if isinstance(err, PipelineLost) else f"its CFG partner died ({type(err).__name__})")
            return DenoisedRound(unknown=unknown + list(frames))
        return DenoisedRound(images, unknown)

    def _lose(self, why: str) -> None:
        """The pipeline's queues are gone (a stage or the partner died): give every session
        back, take no new one, and fail the health check so that Serve replaces this replica."""
        log.error("denoiser pipeline %s: %s; its sessions are given back to be placed elsewhere", self.tag, why)
        self.lost = why
        self._pushed.clear()
        if self.stages:
            self.stages.shutdown()
        if self.partner:
            ray.kill(self.partner, no_restart=True)
        self.queues = None

    def check_health(self) -> None:
        """Serve's health check: a pipeline that lost its queues is replaced."""
        if self.lost:
            raise RuntimeError(f"denoiser pipeline {self.tag} is lost: {self.lost}")

    def sessions_wanting(self, owner: str, n: int) -> None:
        """A session owner's count of its sessions that want a queue (those placed and those
        waiting for room), which it reports to one pipeline (`PipelineQueues.report`)."""
        self._wanted[owner] = (int(n), time.monotonic())

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's autoscaler weighs (`deployments.pipeline_scaling`): the sessions held
        here, and the sessions that want a queue as the owners lately reported them here."""
        now = time.monotonic()
        wanted = sum(n for n, at in self._wanted.values() if at > now - WANTED_TTL_S)
        return {"sessions": float(len(self._pushed)), "wanted": float(wanted)}

    def load(self) -> dict:
        """This pipeline's tag and its sessions (`LOST_LOAD` once lost): where a new queue goes."""
        return {"pipeline": self.tag, "load": LOST_LOAD if self.lost else len(self._pushed)}

    def placement(self) -> dict:
        """Where this pipeline runs: its tag, health, sessions, each stage's band, GPU ids and
        node, and the hand-over totals between its stages (None with one stage)."""
        with self._lock:
            if self.stages:
                stages, handover = self.stages.placement(), self.stages.handover.stats()
            else:
                stages = [] if self.lost else [{
                    "band": 0, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                    "node_id": ray.get_runtime_context().get_node_id(),
                }]
                handover = None
            return {"pipeline": self.tag, "healthy": self.lost is None, "sessions": sorted(self.sessions()),
                    "stages": stages, "handover": handover}


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]
