"""A Carla server that goes away under a running Serve app, and comes back.

No Carla server runs here: the World actor drives `CarlaWorld` on the stand-in for
`carla.Client` (tests/carla_standin.py), which is down while a flag file exists. What a
driver notices: the session says the world is unavailable and why (no traceback), a control
sent meanwhile is kept (or refused with the reason when it needs the world), nothing crashes, and when the server is back the same session's video
goes on with that control.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

carla = pytest.importorskip("carla", reason="the Carla world needs the carla package")

import deployments  # noqa: E402
from tests.waiting import eventually  # noqa: E402


def test_a_lost_world_is_reported_to_the_session_and_the_video_resumes(tmp_path, ray_runtime):
    flag = tmp_path / "server-down"
    overrides = {
        "world": "carla", "world._target_": "tests.carla_standin.world_on_standin",
        "+world.down_flag": str(flag), "world.vehicles": "4", "world.walkers": "2",
        "world.reconnect.first_delay_s": "0.2", "world.reconnect.max_delay_s": "0.5",
        "pipeline.steps": "6", "pipeline.window": "3", "serve.graceful_shutdown_s": "1.0",
    }
    original_client = carla.Client  # the builder's check builds the stand-in world here too
    try:
        with ray_runtime.serve_app(deployments.app(overrides), "test-serve-world-gone") as base:
            drive(base, flag)
    finally:
        carla.Client = original_client


def drive(base: str, flag: Path) -> None:
    """A session through the world going away and coming back."""
    created = requests.post(f"{base}/sessions", json={"autopilot": True}, timeout=60).json()
    sid, token = created["id"], created["token"]

    def state() -> dict:
        r = requests.get(f"{base}/sessions/{sid}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    eventually(lambda: state()["stats"]["frames_out"] >= 2, "the first frames")
    assert state()["error"] is None

    flag.touch()  # the server goes away
    gone = eventually(lambda: (s := state())["state"] == "world unavailable" and s, "the session to say so")
    assert gone["error"] and "Traceback" not in gone["error"]
    # A control meanwhile is kept (controls are sticky): the ego has it when the world is
    # back. Handing the car to or from the autopilot needs the world: refused, with why.
    auth = {"Authorization": f"Bearer {token}"}
    r = requests.post(f"{base}/sessions/{sid}/control", json={"throttle": 0.5}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    r = requests.post(f"{base}/sessions/{sid}/control", json={"autopilot": False}, headers=auth, timeout=30)
    assert r.status_code == 503, r.text
    (refused,) = r.json()["detail"]  # every error answer: [{"loc", "msg", "type"}]
    assert "did not reach the world" in refused["msg"] and refused["type"] == "world_unavailable", r.text
    assert "Traceback" not in refused["msg"]
    frames_then = state()["stats"]["frames_out"]

    flag.unlink()  # and comes back
    back = eventually(lambda: (s := state())["error"] is None and s["stats"]["frames_out"] > frames_then + 2 and s,
                      "the video to go on")
    assert back["state"] == "running" and back["id"] == sid
    assert back["control"]["throttle"] == 0.5 and back["control"]["autopilot"] is True
    r = requests.post(f"{base}/sessions/{sid}/control", json={"autopilot": False}, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["autopilot"] is False, r.text
