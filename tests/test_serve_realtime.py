"""The realtime clock through Serve: the world ticks on the wall clock, each session samples the
newest state, and the fps condition follows the simulated time between a session's frames.

What is asserted is what the clock guarantees whatever the speed of generation: on a slow
machine rounds skip ticks (the fps condition drops below the tick rate), on a fast one every
round waits for the next tick (the fps condition is the tick rate); either way the world runs
no faster than the wall clock, and no round samples a tick an earlier round saw.
"""

from __future__ import annotations

import time

import pytest
import requests

import deployments
from tests.waiting import eventually

DT = 0.05  # s per world tick: 20 ticks per wall-clock second
WINDOW_S = 2.0  # wall time over which the world's pace is compared with the wall clock
TICK = 1e-6  # tolerance on sim times (sums of DT in floating point)


@pytest.fixture(scope="module")
def base(ray_runtime):
    app = deployments.app({
        "pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "4",
        "world.dt": str(DT), "serve.clock": "realtime", "serve.graceful_shutdown_s": "1.0",
        "serve.public_viewing": "true",  # a local demo: anyone sees every session
    })
    with ray_runtime.serve_app(app, "test-serve-realtime") as url:
        yield url


def ticks(t: float) -> float:
    return t / DT


def test_realtime_world_runs_on_the_wall_clock_and_frames_sample_it(base):
    created = requests.post(f"{base}/sessions", timeout=60).json()
    url = f"{base}/sessions/{created['id']}"
    # serve.public_viewing=true: the list and the state need no token (driving still does).
    assert [s["id"] for s in requests.get(f"{base}/sessions", timeout=30).json()] == [created["id"]]
    assert requests.post(f"{url}/control", json={"steer": 0.1}, timeout=30).status_code == 401
    # (wall time before the request, wall time after it, the session's stats), one per poll.
    samples: list[tuple[float, float, dict]] = []

    def consecutive() -> list[tuple[dict, dict]]:
        """Pairs of samples whose newest conditions are consecutive pushes of the session."""
        pairs, by_push = [], {s["frames_in"]: s for _, _, s in samples if s["frames_in"]}
        for n, s in sorted(by_push.items()):
            if n - 1 in by_push:
                pairs.append((by_push[n - 1], s))
        return pairs

    def clock_window() -> tuple[float, dict, list[tuple[float, dict]]] | None:
        """From the first sample i that saw a push: the wall time i was asked for, the first
        sample `start` two or more pushes on, and the samples after `start` (each with the wall
        time its answer came back). The push two after the one i saw was observed after i was
        asked for; a later sample's newest observation was made before its answer came."""
        seen = [(b, a, s) for b, a, s in samples if s["frames_in"] >= 1]
        if not seen:
            return None
        first_before, _, first = seen[0]
        starts = [s for _, _, s in seen if s["frames_in"] >= first["frames_in"] + 2]
        if not starts:
            return None
        later = [(a, s) for _, a, s in seen if s["frames_in"] > starts[0]["frames_in"]]
        return first_before, starts[0], later

    def enough() -> bool:
        before = time.monotonic()
        stats = requests.get(url, timeout=30).json()["stats"]
        samples.append((before, time.monotonic(), stats))
        shown = {s["shown_sim_time"] for _, _, s in samples if s["shown_sim_time"] is not None}
        window = clock_window()
        return (
            len(shown) >= 6 and len(consecutive()) >= 3
            and window is not None and bool(window[2]) and window[2][-1][0] - window[0] >= WINDOW_S
        )

    eventually(enough, "6 frames shown, 3 consecutive pushes and a window of the clock", every=0.02)
    requests.delete(url, headers={"Authorization": f"Bearer {created['token']}"}, timeout=60)
    stats = [s for _, _, s in samples if s["shown_sim_time"] is not None]
    shown = [s["shown_sim_time"] for s in stats]
    shown = [t for k, t in enumerate(shown) if k == 0 or t != shown[k - 1]]

    # Shown times are whole ticks and go forward.
    assert all(b > a for a, b in zip(shown, shown[1:]))
    assert all(abs(ticks(t) - round(ticks(t))) < 1e-6 for t in shown)
    # The fps condition is 1 / the simulated step between the session's samples: never above
    # the world's tick rate.
    assert all(0 < s["fps_condition"] <= 1 / DT + 1e-6 for s in stats)

    # Each round samples a tick newer than the last round's: between consecutive pushes the
    # world moved a whole number of ticks, at least one, and the fps condition of the newer
    # push is 1 / that step (below the tick rate exactly when the round skipped ticks).
    for older, newer in consecutive():
        step = newer["sim_time"] - older["sim_time"]
        assert step >= DT - TICK and abs(ticks(step) - round(ticks(step))) < 1e-6, (older, newer)
        assert newer["fps_condition"] == pytest.approx(1 / step, rel=1e-5), (older, newer)

    # So the frame shown is at least one tick per frame between it and the newest conditions
    # behind the world, and those are at least the queue's depth.
    for s in stats:
        behind = s["frames_in"] - s["frames_out"]
        assert behind >= s["queue_depth"], s
        assert s["sim_time"] - s["shown_sim_time"] >= behind * DT - TICK, s

    # The world ticks on the wall clock, not once per round: at most one tick per DT of wall
    # time, however fast rounds are made (in lockstep a fast machine would tick it faster).
    first_before, start, later = clock_window()
    for after, s in later:
        assert s["sim_time"] - start["sim_time"] <= (after - first_before) + DT + TICK, (s, start)
