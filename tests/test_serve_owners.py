"""Sessions owned by several SessionManager replicas (`serve.sessions.owners=2`), their cars in
two World replicas: each request reaches the owner of its session, and the death of one owner
takes only its own sessions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import ray
import requests

import deployments
from deployments.routing import owner_of
from tests.waiting import StreamWatcher, eventually, serve_replica

OVERRIDES = {"pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "8", "serve.max_sessions": "4",
             "serve.graceful_shutdown_s": "1.0", "serve.sessions.owners": "2", "serve.world.replicas": "2"}
APP = "test-serve-owners"


@pytest.fixture(scope="module")
def base(ray_runtime) -> Iterator[str]:
    with ray_runtime.serve_app(deployments.app(OVERRIDES), APP) as url:
        yield url


def test_sessions_spread_over_owners_and_one_owner_dying_takes_only_its_own(base):
    created = []
    for _ in range(4):
        r = requests.post(f"{base}/sessions", json={"autopilot": True}, timeout=120)
        assert r.status_code == 201, r.text
        created.append(r.json())
    auth = {s["id"]: {"Authorization": f"Bearer {s['token']}"} for s in created}
    owners = Counter(owner_of(s["id"]) for s in created)
    assert len(owners) == 2 and set(owners.values()) == {2}, owners  # two each: max_sessions shared
    full = requests.post(f"{base}/sessions", timeout=120)
    assert full.status_code == 429, full.text

    def state(sid: str) -> requests.Response:
        return requests.get(f"{base}/sessions/{sid}", headers=auth[sid], timeout=60)

    # Every request reaches the session's owner: state, control, the list a token sees, video.
    for s in created:
        assert state(s["id"]).json()["id"] == s["id"]
        r = requests.post(f"{base}/sessions/{s['id']}/control", json={"autopilot": False, "steer": 0.2},
                          headers=auth[s["id"]], timeout=60)
        assert r.status_code == 200 and r.json()["steer"] == 0.2, r.text
        listed = requests.get(f"{base}/sessions", headers=auth[s["id"]], timeout=60).json()
        assert [x["id"] for x in listed] == [s["id"]]
    readers = {s["id"]: StreamWatcher(s["streams"]["mjpeg"]) for s in created}
    for reader in readers.values():
        reader.start()
    try:
        eventually(lambda: all(len(r.indices) >= 2 for r in readers.values()), "frames on the four streams")
        dead = owner_of(created[0]["id"])
        ray.kill(serve_replica(APP, "SessionManager", dead), no_restart=True)
        mine = [s["id"] for s in created if owner_of(s["id"]) == dead]
        others = [s["id"] for s in created if owner_of(s["id"]) != dead]

        # The other owner's sessions stream on; the dead owner's say they were lost.
        seen = {sid: len(readers[sid].indices) for sid in others}
        eventually(lambda: all(len(readers[sid].indices) >= seen[sid] + 3 for sid in others),
                   "the other owner's sessions to go on streaming")
        assert all(readers[sid].error is None and readers[sid].is_alive() for sid in others)

        def lost(sid: str):
            r = state(sid)
            assert r.status_code in (404, 503), r.text
            return r.status_code == 404 and r.json()["detail"][0]
        for sid in mine:
            item = eventually(lambda sid=sid: lost(sid), "the dead owner's session to be reported lost")
            assert item["type"] == "session_lost", item
        for sid in others:
            assert state(sid).status_code == 200
    finally:
        for reader in readers.values():
            reader.stop.set()

    # Room again where the dead owner was: a new session starts and makes frames.
    new = eventually(lambda: (r := requests.post(f"{base}/sessions", timeout=120)).status_code == 201 and r.json(),
                     "a new session to start")
    auth[new["id"]] = {"Authorization": f"Bearer {new['token']}"}
    eventually(lambda: state(new["id"]).json()["stats"]["frames_out"] >= 1, "the new session's first frame")
    for sid in [*others, new["id"]]:
        r = requests.delete(f"{base}/sessions/{sid}", headers=auth[sid], timeout=120)
        assert r.status_code == 200, r.text
