"""An actor of the app dies while sessions stream: what the drivers see.

The QueueServer (the denoiser) replica is killed with `ray.kill` while three sessions stream.
Serve starts a new replica; the session manager finds it holding no queue for the sessions
and opens new ones: every session goes on by itself, with the same id and stream URL, its
frame numbers going on from where they were, and the lost frames counted (`queue_restarts`,
`gap_frames`). Nothing else stops, and a new session can start.

The World replica is killed likewise: the new one is a new world without the sessions' cars;
each session gets a new car (`ego_restarts`) and its stream goes on.

The SessionManager holds the sessions in its memory: killed, its sessions are gone. Each
then answers that it was lost and why, its stream ends, the new session manager gives back
their cars and queues, and new sessions start.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import requests
from ray import serve

import deployments
from tests.waiting import StreamWatcher, eventually, serve_replica

OVERRIDES = {"pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "8", "serve.max_sessions": "4",
             "serve.graceful_shutdown_s": "1.0"}
APP = "test-serve-faults"


@pytest.fixture(scope="module")
def base(ray_runtime) -> Iterator[str]:
    with ray_runtime.serve_app(deployments.app(OVERRIDES), APP) as url:
        yield url


def replica_of(deployment: str):
    """The actor of the (one) replica of `deployment` in this app."""
    return serve_replica(APP, deployment)


def drive_three(base: str):
    """Three sessions on autopilot, their MJPEG readers started; (created, auth, state, readers)."""
    created = [requests.post(f"{base}/sessions", json={"autopilot": True}, timeout=120).json() for _ in range(3)]
    auth = {s["id"]: {"Authorization": f"Bearer {s['token']}"} for s in created}

    def state(sid: str) -> dict:
        r = requests.get(f"{base}/sessions/{sid}", headers=auth[sid], timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    readers = [StreamWatcher(s["streams"]["mjpeg"]) for s in created]
    for reader in readers:
        reader.start()
    return created, auth, state, readers


def end(base: str, created: list[dict], auth: dict) -> None:
    for s in created:
        r = requests.delete(f"{base}/sessions/{s['id']}", headers=auth[s["id"]], timeout=120)
        assert r.status_code == 200, r.text


def test_a_killed_world_is_replaced_and_every_session_gets_a_new_car_and_goes_on(base):
    created, auth, state, readers = drive_three(base)
    try:
        eventually(lambda: all(len(r.indices) >= 3 for r in readers), "frames on the three streams")
        ray.kill(replica_of("World"), no_restart=True)

        eventually(lambda: all(state(s["id"])["stats"]["ego_restarts"] == 1 for s in created),
                   "every session to get a new car")
        seen = [len(r.indices) for r in readers]
        eventually(lambda: all(len(r.indices) >= n + 3 for r, n in zip(readers, seen)), "the streams to go on")
        for s, reader in zip(created, readers):
            after = state(s["id"])
            assert after["id"] == s["id"] and after["streams"]["mjpeg"] == s["streams"]["mjpeg"]
            assert after["control"]["autopilot"] is True  # the new car drives as the old one did
            assert after["error"] is None and after["stats"]["queue_restarts"] == 0
            assert reader.error is None, reader.error
            assert reader.indices == sorted(set(reader.indices)), reader.indices
    finally:
        for reader in readers:
            reader.stop.set()
    end(base, created, auth)


def test_a_killed_denoiser_is_replaced_and_every_session_goes_on_with_its_id_and_stream(base):
    created, auth, state, readers = drive_three(base)
    try:
        eventually(lambda: all(len(r.indices) >= 3 for r in readers), "frames on the three streams")
        before = {s["id"]: state(s["id"]) for s in created}
        ray.kill(replica_of("QueueServer"), no_restart=True)

        # Each session's queue is rebuilt on the new replica, and its frames go on.
        eventually(lambda: all(state(s["id"])["stats"]["queue_restarts"] == 1 for s in created),
                   "every session's queue to be rebuilt")
        seen = [len(r.indices) for r in readers]
        eventually(lambda: all(len(r.indices) >= n + 3 for r, n in zip(readers, seen)), "the streams to go on")
        for s, reader in zip(created, readers):
            after = state(s["id"])
            assert after["id"] == s["id"] and after["streams"]["mjpeg"] == s["streams"]["mjpeg"]
            assert after["stats"]["gap_frames"] > 0  # the frames inside the lost queue
            assert after["stats"]["frames_out"] > before[s["id"]]["stats"]["frames_out"]
            assert after["error"] is None
            # The frame numbers go on from where they were: never back, never repeated.
            assert reader.error is None, reader.error
            assert reader.indices == sorted(set(reader.indices)), reader.indices
    finally:
        for reader in readers:
            reader.stop.set()

    # A new session starts and makes frames; the old ones end normally.
    new = requests.post(f"{base}/sessions", timeout=120)
    assert new.status_code == 201, new.text
    new = new.json()
    auth[new["id"]] = {"Authorization": f"Bearer {new['token']}"}
    eventually(lambda: state(new["id"])["stats"]["frames_out"] >= 1, "the new session's first frame")
    end(base, [*created, new], auth)


def test_a_killed_session_manager_says_its_sessions_were_lost_and_gives_back_their_cars(base):
    created, auth, state, readers = drive_three(base)
    try:
        eventually(lambda: all(len(r.indices) >= 2 for r in readers), "frames on the three streams")
        ray.kill(replica_of("SessionManager"), no_restart=True)

        # Each session says it was lost and why (no 5xx meanwhile); its stream ends.
        def lost(sid: str) -> str | None:
            r = requests.get(f"{base}/sessions/{sid}", headers=auth[sid], timeout=60)
            assert r.status_code in (404, 503), r.text
            return r.status_code == 404 and r.json()["detail"][0]
        for s in created:
            item = eventually(lambda sid=s["id"]: lost(sid), "the session to be reported lost")
            assert item["type"] == "session_lost" and "session manager" in item["msg"], item
        eventually(lambda: not any(r.is_alive() for r in readers), "the streams to end")
    finally:
        for reader in readers:
            reader.stop.set()

    # Nobody can reach those sessions' cars and queues any more: they are given back.
    world = serve.get_deployment_handle("World", APP)
    denoiser = serve.get_deployment_handle("QueueServer", APP)
    eventually(lambda: world.egos.remote().result() == [] and denoiser.sessions.remote().result() == [],
               "the lost sessions' cars and queues to be given back")
    # A new session starts and makes frames; ending a lost one says it is gone.
    new = requests.post(f"{base}/sessions", timeout=120)
    assert new.status_code == 201, new.text
    new = new.json()
    auth[new["id"]] = {"Authorization": f"Bearer {new['token']}"}
    eventually(lambda: state(new["id"])["stats"]["frames_out"] >= 1, "the new session's first frame")
    r = requests.delete(f"{base}/sessions/{created[0]['id']}", headers=auth[created[0]["id"]], timeout=60)
    assert r.status_code == 404 and r.json()["detail"][0]["type"] == "session_lost"
    end(base, [new], auth)
