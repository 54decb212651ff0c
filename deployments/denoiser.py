"""The Denoiser actor: the model, built once, and every session's queue state.

Each session has its own `StreamingPipeline` (its FIFO queue and cached contexts) around the
shared model components. A round hands all sessions' new conditions over in one call
(`push_many`, conditions packed to uint8 layouts), and every Euler step of that round is one
model call over all the sessions' windows (`dwm.pipelines.streaming.push_many`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from ray import serve

from dwm.conditions.packed import PackedConditions
from dwm.pipelines.streaming import StreamingPipeline, push_many


@dataclass
class GeneratedImages:
    """A generated frame on its way back: index (the session's frame count) and images,
    (V, 3, H, W) float32 in [0, 1]."""

    index: int
    images: torch.Tensor


@serve.deployment(name="Denoiser", num_replicas=1)
class Denoiser:
    def __init__(self, cfg: dict):
        self.cfg = OmegaConf.create(cfg)
        threads = self.cfg.serve.denoiser.torch_threads
        if threads:
            torch.set_num_threads(int(threads))
        self.model = StreamingPipeline.build_model(self.cfg)
        self.pipelines: dict[str, StreamingPipeline] = {}
        # Serve runs sync methods on a thread pool; the model and the queues are used by one
        # call at a time.
        self._lock = threading.Lock()

    def open(self, session_id: str, views: int, seed: int | None = None) -> int:
        """A new, empty queue for a session; returns its depth (frames from conditions in to picture out - 1)."""
        pipeline = StreamingPipeline.from_config(self.cfg, views, model=self.model, seed=seed)
        with self._lock:
            self.pipelines[session_id] = pipeline
        return pipeline.depth

    def close(self, session_id: str) -> None:
        """Drop a session's queue state."""
        with self._lock:
            self.pipelines.pop(session_id, None)

    def sessions(self) -> list[str]:
        return list(self.pipelines)

    def push_many(self, frames: dict[str, PackedConditions]) -> dict[str, list[GeneratedImages]]:
        """Push each session's new conditions; returns the pictures that leave the queues
        (without their conditions: the caller has them). A session closed meanwhile is skipped."""
        with self._lock:
            ids = [session_id for session_id in frames if session_id in self.pipelines]
            pushed = push_many([(self.pipelines[i], frames[i].unpack()) for i in ids])
        return {i: [GeneratedImages(f.index, f.images) for f in out] for i, out in zip(ids, pushed)}
