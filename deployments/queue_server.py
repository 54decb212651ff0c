"""The QueueServer deployment: every session's denoising queue, and the model that steps them.

`pipeline.bands` 1 and `serve.pipelines` 1 (the default): the replica holds the model and
each session's `StreamingPipeline` (its FIFO queue and cached contexts) around it. A round
hands all sessions' new conditions over in one call (`push_many`, conditions packed to uint8
layouts), and every Euler step of that round is one model call over all the sessions'
windows (`dwm.pipelines.streaming.push_many`).

More bands or pipelines: the replica coordinates a pool of stage actors, one band per GPU
(`deployments.stages.DenoiserPool`), and holds no model itself.

`pipeline.cfg_parallel=true` (one band, one pipeline): a `CfgPartner` actor on a second GPU
runs every session's queue beside the replica's, each computing half the rows of every
model call and exchanging the outputs (`dwm.pipelines.cfg_parallel`); the replica hands out
the frames.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from ray import serve

from deployments import metrics
from deployments.logs import route_library_logs
from deployments.memory import HeapTrimmer
from deployments.stages import DenoiserPool, queue_schedule
from dwm.conditions.packed import PackedConditions
from dwm.pipelines.cfg_parallel import RowParallelDenoiser, join_group
from dwm.pipelines.streaming import StreamingPipeline, push_many


@dataclass
class GeneratedImages:
    """A generated frame on its way back: index (its queue's frame count) and images,
    (V, h, w, 3) uint8 at the output size (`dwm.pipelines.decode`)."""

    index: int
    images: torch.Tensor


@dataclass
class DenoisedRound:
    """What a round gives back: the pictures leaving the queues, the sessions whose queue was
    rebuilt (a denoiser stage died) with the frames that were inside it and are lost, and the
    sessions this QueueServer holds no queue for (it was restarted: open them again)."""

    images: dict[str, list[GeneratedImages]] = field(default_factory=dict)
    restarted: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def uses_stage_actors(cfg: DictConfig) -> bool:
    return int(cfg.pipeline.bands) > 1 or int(cfg.serve.pipelines) > 1


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
        threads = self.cfg.serve.denoiser.torch_threads
        if threads:
            torch.set_num_threads(int(threads))
        self.pool = DenoiserPool(self.cfg) if uses_stage_actors(self.cfg) else None
        self.partner = None
        if self.pool:
            self.queues = None
        elif self.cfg.pipeline.cfg_parallel:
            address = ray.util.get_node_ip_address()
            port = _free_port(address)
            s = self.cfg.serve.denoiser
            self.partner = CfgPartner.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus).remote(cfg, address, port)
            join_group(address, port, 0, 2, torch.device(self.cfg.device))
            self.queues = SessionQueues(self.cfg, rank=0, world=2)
        else:
            self.queues = SessionQueues(self.cfg)
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
        self._calls_per_round = schedule.steps_per_shift * (1 if self.cfg.pipeline.batch_bands else schedule.bands)

    def open(self, session_id: str, views: int, seed: int | None = None) -> int:
        """A new, empty queue for a session; returns its depth (frames from conditions in to picture out - 1)."""
        with self._lock:
            self._pushed[session_id] = time.monotonic()
            if self.pool:
                return self.pool.open(session_id, views, seed)
            if self.partner:
                ray.get(self.partner.open.remote(session_id, views, seed))
            return self.queues.open(session_id, views, seed)

    def close(self, session_id: str) -> None:
        """Drop a session's queue state."""
        with self._lock:
            self._close(session_id)

    def _close(self, session_id: str) -> None:
        self._pushed.pop(session_id, None)
        if self.pool:
            self.pool.close(session_id)
            return
        if self.partner:
            ray.get(self.partner.close.remote(session_id))
        self.queues.close(session_id)

    def sessions(self) -> list[str]:
        return list(self.pool.fronts) if self.pool else list(self.queues.pipelines)

    def push_many(self, frames: dict[str, PackedConditions]) -> DenoisedRound:
        """Push each session's new conditions; returns the pictures that leave the queues
        (without their conditions: the caller has them). A session without a queue here is
        named in `unknown` (this replica is a restarted one) and its frame dropped."""
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
                metrics.handover_seconds().set(self.pool.handover.last_overhead_s if self.pool else 0.0)

    def _push_many(self, frames: dict[str, PackedConditions]) -> DenoisedRound:
        held = set(self.sessions())
        unknown = [sid for sid in frames if sid not in held]
        frames = {sid: c for sid, c in frames.items() if sid in held}
        if self.pool:
            images, restarted = self.pool.push_many(frames)
            return DenoisedRound(
                {sid: [GeneratedImages(i, im) for i, im in out] for sid, out in images.items()}, restarted, unknown
            )
        partner = self.partner.push_many.remote(frames) if self.partner else None
        images = self.queues.push_many(frames)  # with the partner's half of every call
        if partner is not None:
            ray.get(partner)
        return DenoisedRound(images, unknown=unknown)

    def placement(self) -> dict:
        """Where the model runs: per pipeline its sessions and each stage's band, GPU ids and
        node; with the hand-over totals between stages."""
        with self._lock:
            if self.pool:
                return {"pipelines": self.pool.placement(), "handover": self.pool.handover.stats()}
            here = {"band": 0, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                    "node_id": ray.get_runtime_context().get_node_id()}
            return {"pipelines": [{"index": 0, "healthy": True, "sessions": sorted(self.queues.pipelines),
                                   "stages": [here]}], "handover": None}


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]
