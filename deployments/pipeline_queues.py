"""A session owner's queues on the denoiser pipelines (`deployments.queue_server`).

The owner (a SessionManager replica) calls these as it would call one QueueServer. Each
pipeline is a QueueServer replica: a new session's queue goes to the pipeline with the
fewest sessions (asked of each when queues are placed: the owners place theirs
independently, and the loads Serve's router hears every second would let two owners fill
the same pipeline), and every later call about it to the pipeline that holds it
(`deployments.routing`). A round pushes to all the owner's pipelines at once and merges what
they give back.

A session waits (no queue, no frames) while no pipeline takes it: every one is full
(`serve.pipeline_sessions`), or the one that held its queue was lost and no other has taken
it yet. The owner tries again each round (`place_waiting`), and reports how many sessions
want a queue (`report`): what Serve's autoscaler adds pipelines for
(`deployments.pipeline_scaling`). A pipeline that is gone (Serve replaced its replica) or lost
a stage answers that it holds no queue for its sessions (`DenoisedRound.unknown`): they wait
for a new queue.
"""

from __future__ import annotations

import asyncio
from ray.serve.handle import DeploymentHandle

from deployments.queue_server import DenoisedRound
from deployments.routing import owner_key, routed, slot_key
from deployments.served import actor_died, cause_of
from dwm.conditions.packed import PackedConditions

QUEUE_LOST = "the denoiser pipeline that held its queue is gone; waiting for a new queue"


class PipelineQueues:
    """handle: the QueueServer deployment's. pipelines: the most replicas it has
    (`serve.pipelines`, or `serve.max_pipelines` with autoscaling)."""

    def __init__(self, handle: DeploymentHandle, owner: str, pipelines: int = 1):
        self.handle, self.owner, self.pipelines = handle, owner, pipelines
        self._pipeline_of: dict[str, str] = {}  # session -> the tag of the pipeline holding its queue
        self._queue: dict[str, tuple[int, int | None]] = {}  # session -> its queue's views and seed
        self.waiting: dict[str, str] = {}  # sessions without a queue now -> why (what the last pipeline asked said)
        self._reported = 0  # sessions last reported

    def _call(self, key: str, method: str, *args):
        return getattr(routed(self.handle, key), method).remote(*args)

    def placed(self, session_id: str) -> bool:
        return session_id in self._pipeline_of

    def why_waiting(self, session_id: str) -> str | None:
        return self.waiting.get(session_id)

    async def loads(self) -> dict[str, float]:
        """Each pipeline's sessions, by its tag (asked of each, one after the other; one that
        does not answer, e.g. stopping, is left out)."""
        loads = {}
        for k in range(self.pipelines):
            try:
                found = await self._call(slot_key(k), "load")
            except Exception:
                continue
            loads[found["pipeline"]] = found["load"]
        return loads

    async def open(self, session_id: str, views: int, seed: int | None = None,
                   loads: dict[str, float] | None = None) -> bool:
        """A new queue for the session on the pipeline with the fewest sessions (`loads`, asked
        when not given, and counted up here), or the next if that one refuses (full, lost or
        stopping): whether it has one; if not, it waits (`why_waiting`)."""
        self._queue[session_id] = (views, seed)
        loads = await self.loads() if loads is None else loads
        why = "no denoiser pipeline is running"
        for tag in sorted(loads, key=lambda t: (loads[t], t)):
            try:
                await self._call(owner_key(tag), "open", session_id, views, seed)
            except Exception as err:
                why = cause_of(err)
                continue
            loads[tag] += 1
            self._pipeline_of[session_id] = tag
            self.waiting.pop(session_id, None)
            return True
        self.waiting[session_id] = why
        return False

    async def place_waiting(self, sessions: list[str]) -> list[str]:
        """Ask once more for a queue for each of these waiting sessions; those that got one."""
        placed, loads = [], None
        for session_id in sessions:
            if session_id in self.waiting:
                loads = await self.loads() if loads is None else loads
                if await self.open(session_id, *self._queue[session_id], loads=loads):
                    placed.append(session_id)
        return placed

    async def report(self) -> None:
        """Tell the first pipeline how many of this owner's sessions want a queue, placed or
        waiting (each round while there are any, and once when none are left: a report is
        forgotten after a while). The first of them all: one count per owner, whichever
        pipeline it reached before."""
        n = len(self._queue)
        if n or self._reported:
            await self._call(slot_key(0), "sessions_wanting", self.owner, n)
            self._reported = n

    async def close(self, session_id: str) -> None:
        self.waiting.pop(session_id, None)
        self._queue.pop(session_id, None)
        tag = self._pipeline_of.pop(session_id, None)
        if tag is not None:
            await self._call(owner_key(tag), "close", session_id)

    async def push_many(self, frames: dict[str, PackedConditions]) -> tuple[DenoisedRound, list[Exception]]:
        """One round on every pipeline holding some of these sessions, all at once. Returns
        what they gave back, merged, and the errors of those that failed. The sessions whose
        queue is gone (`unknown`: their pipeline is new, lost a stage, or its replica died)
        now wait for a new one. (These calls are made from the owner's rounds, outside any
        request: see `deployments.routing`.)"""
        by_pipeline: dict[str, dict[str, PackedConditions]] = {}
        for session_id, conditions in frames.items():
            tag = self._pipeline_of.get(session_id)
            if tag is not None:  # a waiting session has nothing to push to
                by_pipeline.setdefault(tag, {})[session_id] = conditions
        results = await asyncio.gather(
            *[self._call(owner_key(tag), "push_many", mine) for tag, mine in by_pipeline.items()],
            return_exceptions=True,
        )
        merged, failed = DenoisedRound(), []
        for mine, result in zip(by_pipeline.values(), results):
            if isinstance(result, Exception):
                failed.append(result)
                if actor_died(result):
                    merged.unknown.extend(mine)
                continue
            merged.images.update(result.images)
            merged.unknown.extend(result.unknown)
        for session_id in merged.unknown:
            self._pipeline_of.pop(session_id, None)
            self.waiting[session_id] = QUEUE_LOST
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
