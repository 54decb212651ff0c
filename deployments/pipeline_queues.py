"""A session owner's queues on the denoiser pipelines (`deployments.queue_server`).

The owner (a SessionManager replica) calls these as it would call one QueueServer. Each
pipeline is a QueueServer replica: a new session's queue goes to the pipeline with the
fewest sessions, and every later call about it to the pipeline that holds it
(`deployments.routing`). A round pushes to all the owner's pipelines at once and merges what
they give back. A pipeline that is gone (Serve replaced its replica) or lost a stage answers
that it holds no queue for its sessions (`DenoisedRound.unknown`): the owner opens them again.
"""

from __future__ import annotations

import asyncio

from ray.serve.handle import DeploymentHandle

from deployments.queue_server import DenoisedRound
from deployments.routing import owner_key, routed, slot_key
from deployments.served import actor_died
from dwm.conditions.packed import PackedConditions


class PipelineQueues:
    """handle: the QueueServer deployment's. pipelines: its replicas (`serve.pipelines`)."""

    def __init__(self, handle: DeploymentHandle, pipelines: int = 1):
        self.handle, self.pipelines = handle, pipelines
        self._pipeline_of: dict[str, str] = {}  # session -> the tag of the pipeline holding its queue

    def _call(self, key: str, method: str, *args):
        return getattr(routed(self.handle, key), method).remote(*args)

    async def open(self, session_id: str, views: int, seed: int | None = None) -> int:
        """A new queue for the session on the least-loaded pipeline; its depth."""
        opened = await self._call("", "open", session_id, views, seed)
        self._pipeline_of[session_id] = opened["pipeline"]
        return int(opened["depth"])

    async def close(self, session_id: str) -> None:
        tag = self._pipeline_of.pop(session_id, None)
        if tag is not None:
            await self._call(owner_key(tag), "close", session_id)

    async def push_many(self, frames: dict[str, PackedConditions]) -> tuple[DenoisedRound, list[Exception]]:
        """One round on every pipeline holding some of these sessions, all at once. Returns
        what they gave back, merged, and the errors of those that failed: the sessions of a
        pipeline whose replica died are `unknown` (their queues died with it). (These calls are
        made from the owner's rounds, outside any request: see `deployments.routing`.)"""
        by_pipeline: dict[str, dict[str, PackedConditions]] = {}
        unknown = []
        for session_id, conditions in frames.items():
            tag = self._pipeline_of.get(session_id)
            if tag is None:
                unknown.append(session_id)
            else:
                by_pipeline.setdefault(tag, {})[session_id] = conditions
        results = await asyncio.gather(
            *[self._call(owner_key(tag), "push_many", mine) for tag, mine in by_pipeline.items()],
            return_exceptions=True,
        )
        merged, failed = DenoisedRound(unknown=unknown), []
        for mine, result in zip(by_pipeline.values(), results):
            if isinstance(result, Exception):
                failed.append(result)
                if actor_died(result):
                    merged.unknown.extend(mine)
                continue
            merged.images.update(result.images)
            merged.unknown.extend(result.unknown)
        return merged, failed

    async def placement(self) -> list[dict]:
        """Each pipeline's placement (`QueueServer.placement`), in the order of their tags."""
        found = [await self._call(slot_key(k), "placement") for k in range(self.pipelines)]
        return sorted({p["pipeline"]: p for p in found}.values(), key=lambda p: p["pipeline"])

    async def release_all(self) -> int:
        """Drop every queue of every pipeline (the app's only session owner starting: any queue
        there was a dead owner's); how many."""
        released = 0
        for k in range(self.pipelines):
            for session_id in await self._call(slot_key(k), "sessions"):
                await self._call(slot_key(k), "close", session_id)
                released += 1
        return released
