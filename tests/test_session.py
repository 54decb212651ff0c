"""The driving session in one process (no Ray): what a driver would notice of its control, its
stats and how long a control takes to show in the video.

A real embedded world and a real queue around the tiny model, at a small resolution and
without guidance so that every frame takes milliseconds; the clock of the session is the
test's, so fps and latency in seconds are exact.
"""

from __future__ import annotations

import pytest

from dwm.conditions.builder import ConditionBuilder
from dwm.config import compose, instantiate
from dwm.pipelines.streaming import StreamingPipeline
from dwm.session import DrivingSession
from dwm.world.base import VehicleControl

# N=6 steps, T=3: the queue is 2 frames deep, so frames leave from the third push on.
OVERRIDES = {
    "pipeline.steps": "6", "pipeline.window": "3", "pipeline.guidance": "1.0",
    "pipeline.resolution": "[64,112]", "world.vehicles": "8",
}
DT = 0.1  # s per world tick (the embedded world's default)


class Clock:
    """The session's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def cfg():
    cfg = compose(OVERRIDES)
    assert cfg.world.dt == DT
    return cfg


@pytest.fixture(scope="module")
def model(cfg):
    return StreamingPipeline.build_model(cfg)


@pytest.fixture
def world(cfg):
    world = instantiate(cfg, "world")
    yield world
    world.close()


@pytest.fixture
def builder(cfg):
    return ConditionBuilder.from_config(cfg)


@pytest.fixture
def pipeline(cfg, model, builder):
    return StreamingPipeline.from_config(cfg, builder.num_views, model=model)


def drive(session, world, pipeline, clock: Clock, frames: int, every: float = 1.0) -> list:
    """`frames` lockstep frames, `every` s apart on the session's clock; the frames out."""
    out = []
    for _ in range(frames):
        clock.now += every
        out += session.step(world, pipeline)
        world.tick()
    return out


def test_controls_are_sticky_and_reach_the_ego(world, builder):
    session = DrivingSession.start(world, builder, queue_depth=2)
    assert session.control_state() == {**vars(VehicleControl()), "autopilot": False, "seq": 0}

    assert session.apply_control(world, throttle=0.6)["seq"] == 1
    state = session.apply_control(world, steer=-0.4)
    # The second control keeps the first's throttle: controls hold until changed.
    assert state["throttle"] == 0.6 and state["steer"] == -0.4 and state["autopilot"] is False
    assert state["seq"] == 2  # each control is numbered
    assert world.observe(session.ego_id).control == VehicleControl(throttle=0.6, steer=-0.4)

    # A value out of range is refused with its name, and changes nothing.
    with pytest.raises(ValueError, match="steer"):
        session.apply_control(world, steer=3.0)
    with pytest.raises(ValueError, match="wings"):
        session.apply_control(world, wings=1.0)
    assert session.control == VehicleControl(throttle=0.6, steer=-0.4)
    assert session.controls_applied == 2
    session.close(world)
    assert session.ego_id not in world.egos()


def test_autopilot_on_and_off_hands_the_car_over_with_its_last_control(world, builder, pipeline):
    session = DrivingSession.start(world, builder, pipeline.depth, autopilot=True)
    assert session.control_state()["autopilot"] is True
    assert world.observe(session.ego_id).autopilot
    drive(session, world, pipeline, Clock(), 3)
    driven = world.observe(session.ego_id).control
    assert driven.throttle > 0  # the autopilot has been driving

    state = session.apply_control(world, autopilot=False, steer=0.2)
    # Taking the car back starts from what the autopilot held, with the request on top.
    assert state == {**vars(driven), "steer": 0.2, "autopilot": False, "seq": 1}
    observed = world.observe(session.ego_id)
    assert not observed.autopilot and observed.control == session.control

    # Asking for the autopilot it already has switches nothing but still counts as a control.
    session.apply_control(world, autopilot=False)
    assert session.control_state()["autopilot"] is False and session.controls_applied == 2


def test_stats_count_frames_and_follow_the_newest_observation(world, builder, pipeline):
    clock = Clock()
    session = DrivingSession.start(world, builder, pipeline.depth, autopilot=True, fps_window=3.0, clock=clock)
    start = session.stats(world_time=7.5)
    assert (start.frames_in, start.frames_out, start.sim_time, start.shown_sim_time) == (0, 0, 7.5, None)
    assert start.fps == 0.0 and start.fps_condition is None and start.control_latency_frames is None

    # Frames every 0.5 s of the session's clock, one world tick each.
    out = drive(session, world, pipeline, clock, 8, every=0.5)
    stats = session.stats()
    assert pipeline.depth == 2 and stats.queue_depth == 2
    assert (stats.frames_in, stats.frames_out) == (8, 6) and len(out) == 6
    # The newest observation: the 8th, after 7 ticks; the newest frame out shows the 6th.
    assert stats.sim_time == pytest.approx(7 * DT)
    assert stats.shown_sim_time == pytest.approx(5 * DT) == out[-1].conditions.sim_time
    assert stats.ego_speed == session.last_observation.ego_speed > 0
    assert stats.fps_condition == pytest.approx(1 / DT)  # lockstep: the world's tick rate
    # Frames out and the conditions they show stay in order, one per push once warm.
    assert [f.index for f in out] == list(range(6))
    assert [f.conditions.sim_time for f in out] == pytest.approx([k * DT for k in range(6)])
    # 2 frames per s, counted over the last 3 s only.
    assert stats.fps == pytest.approx(2.0)
    # A session that stops making frames: its fps falls, 1 / the seconds since its last frame.
    clock.now += 10
    assert session.stats().fps == pytest.approx(0.1)


def test_a_control_shows_in_the_first_frame_observed_after_it(world, builder, pipeline):
    clock = Clock()
    session = DrivingSession.start(world, builder, pipeline.depth, clock=clock)
    observed, frames = [], []

    def step() -> None:
        clock.now += 1.0
        frames.extend(session.step(world, pipeline))
        observed.append(session.last_observation)
        world.tick()

    for _ in range(4):
        step()
    shown_before = session.frames_out
    pushed_before = session.frames_in
    clock.now += 0.25
    sent_at = clock.now
    seq = session.apply_control(world, brake=1.0)["seq"]
    while session.stats().control_latency_frames is None:
        assert session.frames_in < pushed_before + 10, "the control never showed"
        step()

    stats = session.stats()
    # The frame that measured it shows the first conditions observed after the control, and
    # says so: it carries the control's sequence number, the frames before it the one before.
    assert frames[-1].index == pushed_before
    assert frames[-1].control_seq == seq and all(f.control_seq == seq - 1 for f in frames[:-1])
    assert observed[pushed_before].control.brake == 1.0
    assert observed[pushed_before - 1].control.brake == 0.0
    # ... which leaves the queue depth + 1 frames after the control: its latency.
    assert stats.control_latency_frames == session.frames_out - shown_before == pipeline.depth + 1
    assert stats.control_latency_s == pytest.approx(clock.now - sent_at)


def test_a_control_landing_while_the_ego_is_observed_is_not_claimed_by_that_frame(world, builder, pipeline):
    # The Serve app reads the control count, then asks the World actor for the observations;
    # a control landing in between may or may not be in them, so their frames do not count
    # as showing it: the next frame does.
    session = DrivingSession.start(world, builder, pipeline.depth, clock=Clock())
    for _ in range(2):
        session.step(world, pipeline)
        world.tick()
    seen = session.controls_applied
    session.apply_control(world, throttle=0.5)
    observation = world.observe(session.ego_id)
    conditions = session.build(observation)
    session.pushed(observation, conditions, seen)
    session.delivered(pipeline.push(conditions.unpack()))
    world.tick()
    for _ in range(2):
        session.step(world, pipeline)
        world.tick()
    assert session.frames_out == 3  # the third shows that push
    assert session.stats().control_latency_frames is None
    session.step(world, pipeline)
    assert session.stats().control_latency_frames == 4  # frames out since the control


def test_realtime_fps_condition_follows_the_simulated_time_between_frames(world, builder):
    session = DrivingSession.start(world, builder, queue_depth=2)
    first = world.observe(session.ego_id)
    conditions = session.build(first, realtime=True)
    assert float(conditions.camera_params[0, 0]) == pytest.approx(1 / DT)  # no previous frame: the tick's
    session.pushed(first, conditions, session.controls_applied)
    world.tick()
    world.tick()
    later = world.observe(session.ego_id)
    assert float(session.build(later, realtime=True).camera_params[0, 0]) == pytest.approx(1 / (2 * DT))
    assert float(session.build(later).camera_params[0, 0]) == pytest.approx(1 / DT)  # lockstep


def test_a_rebuilt_queue_counts_its_lost_frames_and_the_frames_go_on(cfg, model, world, builder, pipeline):
    clock = Clock()
    session = DrivingSession.start(world, builder, pipeline.depth, autopilot=True, clock=clock)
    drive(session, world, pipeline, clock, 4)
    assert session.frames_out == 2
    assert session.queue_rebuilt() == pipeline.depth  # the frames pushed that never came out
    fresh = StreamingPipeline.from_config(cfg, builder.num_views, model=model)
    out = drive(session, world, fresh, clock, 4)
    stats = session.stats()
    assert (stats.queue_restarts, stats.gap_frames) == (1, pipeline.depth)
    assert (stats.frames_in, stats.frames_out) == (8, 4)
    # Each frame after the rebuild shows the conditions pushed into the new queue.
    assert [f.conditions.sim_time for f in out] == pytest.approx([4 * DT, 5 * DT])
