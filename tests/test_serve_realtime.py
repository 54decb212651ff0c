"""The realtime clock through Serve: the world ticks on the wall clock, each session samples the
newest state, and the fps condition follows the simulated time between a session's frames."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import serve  # noqa: E402

import deployments  # noqa: E402
from tests.waiting import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DT = 0.05  # s per world tick: 20 ticks per wall-clock second, faster than this CPU generates frames


@pytest.fixture(scope="module")
def base():
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployments.app({
            "pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "4",
            "world.dt": str(DT), "serve.clock": "realtime", "serve.graceful_shutdown_s": "1.0",
        }))
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_realtime_world_runs_on_the_wall_clock_and_frames_sample_it(base):
    created = requests.post(f"{base}/sessions", timeout=60).json()
    url = f"{base}/sessions/{created['id']}"
    shown, stats = [], []
    deadline = time.monotonic() + 120
    while len(shown) < 6:
        assert time.monotonic() < deadline, "timed out waiting for frames"
        state = requests.get(url, timeout=30).json()["stats"]
        if state["shown_sim_time"] is not None and (not shown or state["shown_sim_time"] != shown[-1]):
            shown.append(state["shown_sim_time"])
            stats.append(state)
        time.sleep(0.05)
    requests.delete(url, headers={"Authorization": f"Bearer {created['token']}"}, timeout=60)

    # The world ticks on the wall clock, not once per frame: it runs ahead of the frames made
    # (in lockstep the newest observation is queue_depth ticks ahead of the frame shown).
    assert any(s["sim_time"] - s["shown_sim_time"] > (s["queue_depth"] + 2) * DT for s in stats), stats
    # Shown times are whole ticks and go forward.
    assert all(b > a for a, b in zip(shown, shown[1:]))
    assert all(abs(t / DT - round(t / DT)) < 1e-6 for t in shown)
    # The fps condition is 1 / the simulated step between the session's samples: below the
    # world's tick rate whenever the session skipped ticks.
    assert all(0 < s["fps_condition"] <= 1 / DT + 1e-6 for s in stats)
    assert any(s["fps_condition"] < 1 / DT - 1e-6 for s in stats)
