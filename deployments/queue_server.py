"""The QueueServer deployment: every session's denoising queue, and the model that steps them.

`pipeline.bands` 1 and `serve.pipelines` 1 (the default): the replica holds the model and
each session's `StreamingPipeline` (its FIFO queue and cached contexts) around it. A round
hands all sessions' new conditions over in one call (`push_many`, conditions packed to uint8
layouts), and every Euler step of that round is one model call over all the sessions'
windows (`dwm.pipelines.streaming.push_many`).

More bands or pipelines: the replica coordinates a pool of stage actors, one band per GPU
(`deployments.stages.DenoiserPool`), and holds no model itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from ray import serve

from deployments.stages import DenoiserPool
from dwm.conditions.packed import PackedConditions
from dwm.pipelines.streaming import StreamingPipeline, push_many


@dataclass
class GeneratedImages:
    """A generated frame on its way back: index (the session's frame count) and images,
    (V, 3, H, W) float32 in [0, 1]."""

    index: int
    images: torch.Tensor


@dataclass
class DenoisedRound:
    """What a round gives back: the pictures leaving the queues, and the sessions whose queue
    was rebuilt (a denoiser stage died) with the frames that were inside it and are lost."""

    images: dict[str, list[GeneratedImages]] = field(default_factory=dict)
    restarted: dict[str, int] = field(default_factory=dict)


def uses_stage_actors(cfg: DictConfig) -> bool:
    return int(cfg.pipeline.bands) > 1 or int(cfg.serve.pipelines) > 1


@serve.deployment(name="QueueServer", num_replicas=1)
class QueueServer:
    def __init__(self, cfg: dict):
        self.cfg = OmegaConf.create(cfg)
        threads = self.cfg.serve.denoiser.torch_threads
        if threads:
            torch.set_num_threads(int(threads))
        self.pool = DenoiserPool(self.cfg) if uses_stage_actors(self.cfg) else None
        self.model = None if self.pool else StreamingPipeline.build_model(self.cfg)
        self.pipelines: dict[str, StreamingPipeline] = {}
        # Serve runs sync methods on a thread pool; the model and the queues are used by one
        # call at a time.
        self._lock = threading.Lock()

    def open(self, session_id: str, views: int, seed: int | None = None) -> int:
        """A new, empty queue for a session; returns its depth (frames from conditions in to picture out - 1)."""
        if self.pool:
            with self._lock:
                return self.pool.open(session_id, views, seed)
        pipeline = StreamingPipeline.from_config(self.cfg, views, model=self.model, seed=seed)
        with self._lock:
            self.pipelines[session_id] = pipeline
        return pipeline.depth

    def close(self, session_id: str) -> None:
        """Drop a session's queue state."""
        with self._lock:
            if self.pool:
                self.pool.close(session_id)
            self.pipelines.pop(session_id, None)

    def sessions(self) -> list[str]:
        return list(self.pool.fronts) if self.pool else list(self.pipelines)

    def push_many(self, frames: dict[str, PackedConditions]) -> DenoisedRound:
        """Push each session's new conditions; returns the pictures that leave the queues
        (without their conditions: the caller has them). A session closed meanwhile is skipped."""
        with self._lock:
            if self.pool:
                images, restarted = self.pool.push_many(frames)
                return DenoisedRound(
                    {sid: [GeneratedImages(i, im) for i, im in out] for sid, out in images.items()}, restarted
                )
            ids = [session_id for session_id in frames if session_id in self.pipelines]
            pushed = push_many([(self.pipelines[i], frames[i].unpack()) for i in ids])
        return DenoisedRound({i: [GeneratedImages(f.index, f.images) for f in out] for i, out in zip(ids, pushed)})

    def placement(self) -> dict:
        """Where the model runs: per pipeline its sessions and each stage's band, GPU ids and
        node; with the hand-over totals between stages."""
        with self._lock:
            if self.pool:
                return {"pipelines": self.pool.placement(), "handover": self.pool.handover.stats()}
            here = {"band": 0, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                    "node_id": ray.get_runtime_context().get_node_id()}
            return {"pipelines": [{"index": 0, "healthy": True, "sessions": sorted(self.pipelines), "stages": [here]}],
                    "handover": None}
