"""Room on the denoiser pipelines: each takes at most `serve.pipeline_sessions` sessions. A
session beyond that waits, and says so, until there is room: when another session leaves, or
when Serve adds a pipeline (`serve.max_pipelines`), which it gives back once it is not needed.
"""

from __future__ import annotations

import requests

import deployments
from tests.waiting import StreamWatcher, eventually

ONE_EACH = {"pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "8", "serve.graceful_shutdown_s": "1.0",
            "serve.pipeline_sessions": "1"}


class Client:
    def __init__(self, base: str):
        self.base, self.tokens = base, {}

    def create(self) -> dict:
        r = requests.post(f"{self.base}/sessions", json={"autopilot": True}, timeout=120)
        assert r.status_code == 201, r.text
        self.tokens[r.json()["id"]] = r.json()["token"]
        return r.json()

    def state(self, sid: str) -> dict:
        r = requests.get(f"{self.base}/sessions/{sid}", headers={"Authorization": f"Bearer {self.tokens[sid]}"},
                         timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def delete(self, sid: str) -> None:
        r = requests.delete(f"{self.base}/sessions/{sid}", headers={"Authorization": f"Bearer {self.tokens[sid]}"},
                            timeout=120)
        assert r.status_code == 200, r.text

    def pipelines(self) -> list[dict]:
        return requests.get(f"{self.base}/pipelines", timeout=60).json()["pipelines"]


def watch(session: dict) -> StreamWatcher:
    reader = StreamWatcher(session["streams"]["mjpeg"])
    reader.start()
    return reader


def test_a_session_beyond_the_room_waits_and_gets_its_queue_when_another_leaves(ray_runtime):
    with ray_runtime.serve_app(deployments.app(ONE_EACH), "test-pipeline-room") as base:
        client = Client(base)
        first, second = client.create(), client.create()
        waiting = client.state(second["id"])
        assert waiting["state"] == "waiting", waiting
        assert "serve.pipeline_sessions" in waiting["error"] and "full" in waiting["error"], waiting["error"]
        readers = [watch(first)]
        try:
            eventually(lambda: len(readers[0].indices) >= 2, "frames of the session that has the room")
            assert client.state(second["id"])["stats"]["frames_in"] == 0  # nothing pushed while it waits
            (pipeline,) = client.pipelines()
            assert pipeline["sessions"] == [first["id"]]

            client.delete(first["id"])
            readers.append(watch(second))
            eventually(lambda: len(readers[1].indices) >= 2, "frames of the session that waited")
            after = client.state(second["id"])
            assert after["state"] == "running" and after["error"] is None, after
            # It never had a queue before: nothing was lost, no queue was rebuilt.
            assert after["stats"]["queue_restarts"] == 0 and after["stats"]["gap_frames"] == 0
            assert readers[1].indices[0] == 0 and readers[1].error is None
        finally:
            for reader in readers:
                reader.stop.set()


def test_serve_adds_a_pipeline_for_a_waiting_session_and_gives_it_back_when_it_leaves(ray_runtime):
    # The run's shared Ray has 2 CPUs: room for a second pipeline at half a CPU each.
    overrides = {**ONE_EACH, "serve.max_pipelines": "2", "serve.pipeline_idle_s": "1.0", "serve.denoiser.num_cpus": "0.5"}
    with ray_runtime.serve_app(deployments.app(overrides), "test-pipeline-autoscaling") as base:
        client = Client(base)
        (only,) = client.pipelines()
        first, second = client.create(), client.create()
        readers = [watch(first), watch(second)]
        try:
            eventually(lambda: all(len(r.indices) >= 2 for r in readers), "frames on both streams", timeout=300)
            placed = client.pipelines()
            assert len(placed) == 2 and sorted(len(p["sessions"]) for p in placed) == [1, 1], placed
            assert only["pipeline"] in {p["pipeline"] for p in placed}  # added to, not replaced

            client.delete(second["id"])
            eventually(lambda: len(client.pipelines()) == 1, "Serve to give the pipeline back", timeout=300)
            seen = len(readers[0].indices)
            eventually(lambda: len(readers[0].indices) >= seen + 2, "the remaining session to stream on")
            (left,) = client.pipelines()
            assert left["sessions"] == [first["id"]] and readers[0].error is None
        finally:
            for reader in readers:
                reader.stop.set()
