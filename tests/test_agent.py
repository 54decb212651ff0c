"""Programs that drive: `dwm.client.session.Session` in this process, the Gymnasium
environment `dwm.envs.DrivingEnv`, and the example lane-keeping agent, which must keep its
lane by the world's own measure (the ego's lane offset), not by anything the agent computes.
(The same session and environment over HTTP: tests/test_serve.py.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from dwm.client.session import Session
from dwm.envs import DrivingEnv

ROOT = Path(__file__).resolve().parents[1]
RING = str(ROOT / "tests" / "data" / "ring_road.xodr")  # one long curve: no straight road to hide on
SHORT_QUEUE = ["pipeline.steps=6", "pipeline.window=3", "world.vehicles=6"]


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lane_keeping_example_drives_20_s_on_a_curving_road_and_stays_in_its_lane():
    lane_keeping = example("lane_keeping")
    env = DrivingEnv(overrides=[f"world.map={RING}", "world.vehicles=6"], views=False)
    try:
        result = lane_keeping.drive(env, lane_keeping.LaneKeeper(lane_keeping.front_view(env)), seconds=20.0)
    finally:
        env.close()
    assert result["steps"] == 200 and not result["off_lane"], result  # 20 s at the world's 10 Hz
    # Never near a lane line (lanes are about 3.5 m wide): it kept its own lane all the way ...
    assert result["max_lane_offset_m"] < 1.0, result
    assert result["distance_m"] > 150.0, result  # ... while driving on at about its cruise speed


def test_the_lane_offset_notices_a_car_that_does_not_steer_along_the_curve():
    # What the test above relies on: the world's lane offset grows when nobody keeps the lane.
    env = DrivingEnv(overrides=[f"world.map={RING}", "world.vehicles=6"], views=False)
    try:
        env.reset(seed=0)
        worst = 0.0
        for _ in range(200):
            _, _, terminated, _, info = env.step([0.4, 0.0, 0.0])
            worst = max(worst, abs(info["lane_offset"]))
            if terminated or worst > 1.0:
                break
    finally:
        env.close()
    assert worst > 1.0


def test_a_session_in_process_numbers_controls_and_each_frame_shows_which_it_reflects():
    with Session.in_process(SHORT_QUEUE, seed=2) as session:
        assert session.camera_names == ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"]
        first = session.next_frame()  # the queue's warm-up is behind it
        assert first.index == 0 and first.control_seq == 0
        assert first.views.shape == (3, 172, 304, 3) and first.views.dtype == np.uint8
        assert first.hdmap.shape == first.boxes.shape == (3, 176, 304, 3)
        assert first.ego.sim_time > first.sim_time  # the layout is the world now; the views, the past
        assert session.control(throttle=0.7) == 1 and session.control(steer=0.2) == 2
        with pytest.raises(ValueError, match="steer"):
            session.control(steer=2.0)
        frames = [session.next_frame()]
        while frames[-1].control_seq < 2:
            assert len(frames) < 20, "the controls never showed"
            frames.append(session.next_frame())
        assert [f.index for f in frames] == list(range(1, len(frames) + 1))
        # Frames still in the queue when the controls came show none; the first after shows both.
        assert all(f.control_seq == 0 for f in frames[:-1]) and len(frames) > 1


def test_the_environment_passes_gymnasiums_checks_and_renders_its_views():
    env = DrivingEnv(overrides=["world.vehicles=6"], views=False, render_mode="rgb_array")
    try:
        check_env(env, skip_render_check=True)  # spaces, seeding, reset/step contracts
        obs, info = env.reset(seed=1)
        assert env.observation_space.contains(obs) and info["control_seq"] == 0
        obs, reward, terminated, truncated, info = env.step(np.array([2.0, -3.0, 0.0]))  # clipped into the space
        assert info["control_seq"] == 1 and env.session.session.control.steer == -1.0
        assert env.render().shape == (176, 3 * 304, 3)
        with pytest.raises(ValueError, match="finite"):
            env.step([np.nan, 0.0, 0.0])
    finally:
        env.close()
    with pytest.raises(ValueError, match="render_mode"):
        DrivingEnv(render_mode="human")
    with pytest.raises(ValueError, match="in this process only"):
        DrivingEnv(url="http://127.0.0.1:1", views=False)
