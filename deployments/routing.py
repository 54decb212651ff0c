"""Routing a request to the replica that holds what it is about: Serve's request router for the
deployments whose replicas own state (driving sessions, the worlds' cars).

A replica that owns things names them after itself: a session id or an ego id begins with the
owner's tag (`owned_by`), its Serve replica id. A caller puts a routing key on the request
(`handle.options(multiplexed_model_id=key)`), and `OwnerRouter` sends it:

- `owner_key(tag)`: to the replica with that tag. When that replica is gone (it died, Serve
  started another in its place) to any replica, which answers that it does not hold the thing
  (a lost session, an unknown ego): a dead owner's things are not served by another.
- `slot_key(k)`: to the k-th replica in the order of their tags (k modulo their number): how a
  caller asks every replica once (k = 0..n-1), e.g. to list the sessions of all owners.
- no key: to the replica with the least load it reports (`record_routing_stats`: `LOAD_STAT`,
  e.g. its sessions), counting what this router sent it since that report: where new things go.

Nothing here knows about sessions: the keys are the callers', the load is the replicas'.

Serve's router hands a chosen replica to the waiting request with the same request id, and
calls made from inside one request carry that request's id: such calls must be made one after
the other, not at once (two at once may both wait forever).
"""

from __future__ import annotations

from collections import Counter

from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

OWNER_PREFIX = "owner:"
SLOT_PREFIX = "slot:"
LOAD_STAT = "load"  # what a replica reports in `record_routing_stats` to take new things
TAG_SEPARATOR = "-"  # between the owner's tag and the rest of an id


def owner_key(tag: str) -> str:
    return OWNER_PREFIX + tag


def slot_key(k: int) -> str:
    return f"{SLOT_PREFIX}{int(k)}"


def replica_tag() -> str:
    """This replica's tag (its Serve replica id), or "local" outside a Serve replica."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a replica: a test building the class directly
        return "local"


def owned_by(tag: str, name: str) -> str:
    """The id of something owned by the replica `tag`: what routes a request about it there."""
    return f"{tag}{TAG_SEPARATOR}{name}"


def owner_of(thing_id: str) -> str | None:
    """The tag of the replica that owns `thing_id`, or None for an id no replica made."""
    tag, separator, rest = thing_id.partition(TAG_SEPARATOR)
    return tag if separator and tag and rest else None


def routed(handle, key: str):
    """`handle` with the routing key `key` on its requests (an `OwnerRouter` deployment's)."""
    return handle.options(multiplexed_model_id=key)


def key_for(thing_id: str) -> str:
    """The routing key of a request about `thing_id` (an id no replica made goes anywhere,
    which answers that it does not know it)."""
    tag = owner_of(thing_id)
    return owner_key(tag) if tag else ""


class OwnerRouter(RequestRouter):
    """Serve's request router for replicas that own state; see the module's text."""

    def initialize_state(self, **kwargs) -> None:
        self._sent: Counter[str] = Counter()  # new things sent to a replica since its last report
        self._reported: dict[str, object] = {}  # the stats each replica last reported

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if key.startswith(OWNER_PREFIX):
            tag = key[len(OWNER_PREFIX):]
            owner = [r for r in candidate_replicas if r.replica_id.unique_id == tag]
            # Its owner gone: any replica, which answers that it does not hold it.
            return [owner] if owner else [candidate_replicas]
        if key.startswith(SLOT_PREFIX):
            ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            try:
                k = int(key[len(SLOT_PREFIX):])
            except ValueError:
                k = 0
            return [[ordered[k % len(ordered)]]]
        ranked = sorted(candidate_replicas, key=self._load)
        if pending_request is not None:
            self._sent[ranked[0].replica_id.unique_id] += 1
        return [[r] for r in ranked]

    def _load(self, replica: RunningReplica) -> tuple[float, str]:
        tag = replica.replica_id.unique_id
        stats = replica.routing_stats or {}
        if self._reported.get(tag) != stats:  # a new report counts what was sent before it
            self._reported[tag] = dict(stats)
            self._sent[tag] = 0
        return float(stats.get(LOAD_STAT, 0)) + self._sent[tag], tag
