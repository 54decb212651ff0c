"""Serve's request router for replicas that own state (`deployments.routing`): a request about
a session or a car reaches the replica that holds it, new ones go to the least loaded."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from deployments.routing import OwnerRouter, key_for, owned_by, owner_key, owner_of, slot_key


def replica(tag: str, load: int | None = None):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=tag), routing_stats={} if load is None else {"load": load})


def request(key: str):
    return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=key))


def router() -> OwnerRouter:
    r = OwnerRouter.__new__(OwnerRouter)  # its routing decisions only, without Serve's plumbing
    r.initialize_state()
    return r


def choose(r: OwnerRouter, replicas, key: str) -> list[list[str]]:
    ranks = asyncio.run(r.choose_replicas(replicas, request(key)))
    return [[x.replica_id.unique_id for x in rank] for rank in ranks]


def test_ids_name_their_owner():
    session = owned_by("k3xq9a2b", "0123456789abcdef")
    assert owner_of(session) == "k3xq9a2b" and key_for(session) == owner_key("k3xq9a2b")
    for made_up in ("nosuch", "-abc", "abc-", ""):  # ids no replica made go anywhere
        assert owner_of(made_up) is None and key_for(made_up) == ""


def test_a_request_about_a_thing_goes_to_its_owner_or_anywhere_when_it_is_gone():
    r = router()
    replicas = [replica("aaa"), replica("bbb"), replica("ccc")]
    assert choose(r, replicas, owner_key("bbb")) == [["bbb"]]
    # The owner died (Serve replaced it): any replica answers that it does not hold it.
    assert choose(r, replicas, owner_key("zzz")) == [["aaa", "bbb", "ccc"]]


def test_slots_reach_every_replica_once():
    r = router()
    replicas = [replica("ccc"), replica("aaa"), replica("bbb")]
    assert [choose(r, replicas, slot_key(k))[0][0] for k in range(3)] == ["aaa", "bbb", "ccc"]
    assert choose(r, replicas, slot_key(4)) == [["bbb"]]


def test_new_things_go_to_the_least_loaded_counting_what_was_sent_since_its_report():
    r = router()
    replicas = [replica("aaa", load=3), replica("bbb", load=1), replica("ccc", load=2)]
    firsts = [choose(r, replicas, "")[0][0] for _ in range(4)]
    # bbb (1) takes one -> 2, ties with ccc (2), the lower tag first -> 3, then ccc, then aaa.
    assert firsts == ["bbb", "bbb", "ccc", "aaa"]
    loads = {"aaa": 3, "bbb": 1, "ccc": 2}
    for tag in firsts:
        loads[tag] += 1
    assert max(loads.values()) - min(loads.values()) <= 1
    # A new report replaces the count of what was sent before it.
    replicas[1].routing_stats = {"load": 10}
    assert choose(r, replicas, "")[0][0] != "bbb"
