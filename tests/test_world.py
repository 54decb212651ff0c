"""The embedded world: what a person driving in it, or a session observing it, would notice."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dwm.world.base import (
    REAR_AXLE_BEHIND_CENTRE_M,
    MapKind,
    UnknownEgoError,
    VehicleControl,
    Weather,
)
from dwm.world.embedded import EmbeddedWorld
from dwm.world.maps import MAPS

CONF = Path(__file__).resolve().parents[1] / "conf" / "world" / "embedded.yaml"
ALL_MAPS = ["highway", "merge", "roundabout", "intersection"]


def yaw_of(pose: np.ndarray) -> float:
    return math.atan2(pose[1, 0], pose[0, 0])


def forward_of(pose: np.ndarray) -> np.ndarray:
    return pose[:2, 0]


def drive(world: EmbeddedWorld, ticks: int) -> None:
    for _ in range(ticks):
        world.tick()


def quiet_highway(**kwargs) -> EmbeddedWorld:
    """A highway without traffic: the egos' own motion only."""
    return EmbeddedWorld(map="highway", vehicles=0, seed=0, **kwargs)


def stop(world: EmbeddedWorld, ego: str) -> None:
    world.apply_control(ego, VehicleControl(brake=1.0))
    drive(world, 50)
    assert world.observe(ego).ego_speed == 0.0


# ---------------------------------------------------------------- driving by controls


@pytest.mark.parametrize("steer, turns_left", [(-0.5, True), (0.5, False)])
def test_steering_turns_the_way_carla_steers(steer, turns_left):
    world = quiet_highway()
    ego = world.add_ego()
    before = world.observe(ego).ego_pose
    world.apply_control(ego, VehicleControl(throttle=0.3, steer=steer))
    drive(world, 15)
    after = world.observe(ego).ego_pose
    # World frame: x forward, y left, yaw about +z. Carla's negative steer is left.
    turned = yaw_of(after) - yaw_of(before)
    drift = (after[:2, 3] - before[:2, 3]) @ np.array([-before[1, 0], before[0, 0]])  # along ego's left
    if turns_left:
        assert turned > 0.1 and drift > 0.5
    else:
        assert turned < -0.1 and drift < -0.5


def test_braking_stops_a_moving_car_and_it_stays_stopped():
    world = quiet_highway()
    ego = world.add_ego()
    assert world.observe(ego).ego_speed > 10.0  # egos enter the highway at traffic speed
    world.apply_control(ego, VehicleControl(brake=1.0))
    drive(world, 50)
    stopped = world.observe(ego)
    drive(world, 20)
    later = world.observe(ego)
    assert stopped.ego_speed == 0.0 and later.ego_speed == 0.0
    np.testing.assert_allclose(later.ego_pose, stopped.ego_pose)  # no creeping backwards


def test_reverse_with_throttle_drives_backwards():
    world = quiet_highway()
    ego = world.add_ego()
    stop(world, ego)
    start = world.observe(ego).ego_pose
    world.apply_control(ego, VehicleControl(throttle=0.6, reverse=True))
    drive(world, 20)
    obs = world.observe(ego)
    assert obs.ego_speed < -1.0
    assert (obs.ego_pose[:2, 3] - start[:2, 3]) @ forward_of(start) < -2.0
    assert obs.control.reverse


def test_hand_brake_stops_the_car_even_with_throttle():
    world = quiet_highway()
    ego = world.add_ego()
    world.apply_control(ego, VehicleControl(throttle=1.0, hand_brake=True))
    drive(world, 80)
    assert world.observe(ego).ego_speed == 0.0


def test_controls_are_sticky_until_changed():
    world = quiet_highway()
    ego = world.add_ego()
    control = VehicleControl(throttle=1.0, steer=0.0)
    world.apply_control(ego, control)
    speeds = []
    for _ in range(20):
        world.tick()
        obs = world.observe(ego)
        assert obs.control == control and not obs.autopilot
        speeds.append(obs.ego_speed)
    assert all(b > a for a, b in zip(speeds, speeds[1:]))  # still accelerating 2 s later


def test_two_egos_are_driven_independently():
    world = quiet_highway()
    a, b = world.add_ego(), world.add_ego()
    speed_a, speed_b = world.observe(a).ego_speed, world.observe(b).ego_speed
    world.apply_control(a, VehicleControl(brake=1.0))
    world.apply_control(b, VehicleControl(throttle=1.0, steer=-0.2))
    drive(world, 20)
    obs_a, obs_b = world.observe(a), world.observe(b)
    assert obs_a.ego_speed < speed_a - 5.0 and obs_b.ego_speed > speed_b + 2.0
    assert obs_a.control.brake == 1.0 and obs_b.control.throttle == 1.0
    assert abs(yaw_of(obs_a.ego_pose)) < 1e-6 and yaw_of(obs_b.ego_pose) > 0.05


def test_a_crashed_ego_stops_and_can_then_be_driven_away():
    world = quiet_highway()
    a, b = world.add_ego(), world.add_ego()
    stop(world, b)
    # Put `a` 20 m behind `b` in its lane (the spawn places are random).
    car_a, car_b = world._egos[a].vehicle, world._egos[b].vehicle
    car_a.position = car_b.position - [20.0, 0.0]
    car_a.heading = car_b.heading
    world.apply_control(a, VehicleControl(throttle=1.0))
    for _ in range(40):
        world.tick()
        if car_a.crashed:
            break
    assert car_a.crashed, "a should have run into b"
    yaw = yaw_of(world.observe(a).ego_pose)
    world.apply_control(a, VehicleControl(throttle=1.0, steer=-1.0))
    drive(world, 5)
    assert yaw_of(world.observe(a).ego_pose) == pytest.approx(yaw)  # a wreck does not steer
    world.apply_control(a, VehicleControl())
    drive(world, 60)  # the wreck slides to a stop
    world.apply_control(a, VehicleControl(throttle=0.8, reverse=True))
    drive(world, 30)
    assert world.observe(a).ego_speed < -1.0  # released: backing away from b


# ---------------------------------------------------------------- autopilot


def test_autopilot_keeps_its_lane_and_keeps_moving():
    world = EmbeddedWorld(map="highway", seed=1)
    ego = world.add_ego()
    world.set_autopilot(ego, True)
    start = world.observe(ego).ego_pose
    lane_y = start[1, 3]  # highway lanes run along world x
    for _ in range(200):  # 20 s
        world.tick()
        obs = world.observe(ego)
        assert obs.autopilot
        assert abs(obs.ego_pose[1, 3] - lane_y) < 1.0  # half a lane is 2 m
        assert obs.ego_speed > 5.0
    assert obs.ego_pose[0, 3] - start[0, 3] > 200.0


def test_autopilot_hands_back_speed_position_and_its_last_control():
    world = quiet_highway()
    ego = world.add_ego()
    world.set_autopilot(ego, True)
    drive(world, 50)
    on = world.observe(ego)
    world.set_autopilot(ego, False)
    off = world.observe(ego)
    assert not off.autopilot
    assert off.ego_speed == on.ego_speed
    np.testing.assert_allclose(off.ego_pose, on.ego_pose)
    assert off.control == on.control  # the autopilot's last control stays applied, as in Carla
    drive(world, 20)
    assert world.observe(ego).ego_speed == pytest.approx(on.ego_speed, abs=1.0)  # cruising on
    world.apply_control(ego, VehicleControl(brake=1.0))
    drive(world, 50)
    assert world.observe(ego).ego_speed == 0.0  # the person drives again


# ---------------------------------------------------------------- determinism


def trajectory(seed: int) -> list[np.ndarray]:
    world = EmbeddedWorld(map="roundabout", seed=seed, vehicles=10, view_range=1e4)
    a, b = world.add_ego(), world.add_ego()
    world.set_autopilot(b, True)
    out = []
    for i in range(60):
        world.apply_control(a, VehicleControl(throttle=0.5, steer=0.3 * math.sin(i / 10)))
        world.tick()
        obs = world.observe(a)
        out.append(np.concatenate([obs.ego_pose[:2, 3], obs.boxes.centers[:, :2].ravel()]))
    return out


def test_same_seed_same_trajectories_other_seed_others():
    first, again, other = trajectory(5), trajectory(5), trajectory(6)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    assert any(x.shape != z.shape or not np.allclose(x, z) for x, z in zip(first, other))


# ---------------------------------------------------------------- observations


def test_frame_lifts_highway_env_lanes_to_the_right_of_the_driver():
    world = quiet_highway()
    ego = world.add_ego()
    obs = world.observe(ego)
    # highway-env numbers lanes from the left; its lane 0's outer edge is the leftmost line.
    edges = obs.map_lines.starts[obs.map_lines.kinds == MapKind.ROAD_EDGE][:, 1]
    lane0 = world._network.get_lane(("0", "1", 0))
    assert edges.max() == pytest.approx(lane0.width_at(0) / 2)  # y left: lane 0 at y = 0
    assert edges.min() == pytest.approx(-(3 * 4.0 + lane0.width_at(0) / 2))


@pytest.mark.parametrize("name", ALL_MAPS)
def test_every_map_shows_lane_lines_and_road_edges_near_the_ego(name):
    world = EmbeddedWorld(map=name, seed=0)
    ego = world.add_ego()
    obs = world.observe(ego)
    lines = obs.map_lines
    kinds = set(lines.kinds.tolist())
    assert {MapKind.LANE_LINE, MapKind.ROAD_EDGE} <= kinds
    assert lines.starts.shape == lines.ends.shape == (len(lines), 3)
    assert np.all(lines.starts[:, 2] == 0.0) and np.all(lines.ends[:, 2] == 0.0)
    origin = obs.ego_pose[:2, 3]
    near = np.minimum(
        np.linalg.norm(lines.starts[:, :2] - origin, axis=1),
        np.linalg.norm(lines.ends[:, :2] - origin, axis=1),
    )
    assert np.all(near <= world.view_range + 1e-9)
    assert obs.environment == MAPS[name].description
    # The ego starts on its lane: a lane line or edge lies within a lane width on either side.
    offsets = (lines.starts[:, :2] - origin) @ np.array([-obs.ego_pose[1, 0], obs.ego_pose[0, 0]])
    close = np.linalg.norm(lines.starts[:, :2] - origin, axis=1) < 15.0
    assert np.any(close & (offsets > 0) & (offsets < 4.5))
    assert np.any(close & (offsets < 0) & (offsets > -4.5))


def test_intersection_has_closed_crosswalks_at_its_approaches():
    world = EmbeddedWorld(map="intersection", seed=0, view_range=200.0)
    obs = world.observe(world.add_ego())
    walk = obs.map_lines.kinds == MapKind.CROSSWALK
    starts, ends = obs.map_lines.starts[walk], obs.map_lines.ends[walk]
    assert len(starts) == 16  # four rectangles of four sides
    for k in range(4):
        corners = starts[4 * k : 4 * k + 4]
        np.testing.assert_allclose(ends[4 * k + 3], corners[0])  # closing side back to the start
        np.testing.assert_allclose(ends[4 * k : 4 * k + 3], corners[1:])
        centre = corners.mean(axis=0)
        assert 10.0 < np.linalg.norm(centre[:2]) < 20.0  # just outside the junction box
        sides = np.linalg.norm(np.diff(np.concatenate([corners, corners[:1]]), axis=0), axis=1)
        assert sorted(np.round(sides, 3)) == [4.0, 4.0, 8.0, 8.0]  # 4 m deep, across 2 lanes


def test_boxes_show_nearby_traffic_with_category_sizes_and_never_the_ego():
    world = EmbeddedWorld(map="highway", seed=2, vehicles=12, truck_ratio=1.0)
    a, b = world.add_ego(), world.add_ego()
    drive(world, 5)
    obs_a, obs_b = world.observe(a), world.observe(b)
    boxes = obs_a.boxes
    assert len(boxes) >= 5 and boxes.categories.count("truck") >= 4
    for centre, size, cat in zip(boxes.centers, boxes.sizes, boxes.categories):
        assert cat in ("car", "truck")
        expected = (5.0, 2.0, 1.7) if cat == "car" else (7.0, 2.5, 2.9)
        np.testing.assert_allclose(size, expected)
        assert centre[2] == pytest.approx(size[2] / 2)
        assert np.linalg.norm(centre[:2] - obs_a.ego_pose[:2, 3]) <= world.view_range
    # The other ego is a car box whose centre is 1.5 m ahead of its rear axle; `a` itself is not.
    centre_b = obs_b.ego_pose[:2, 3] + REAR_AXLE_BEHIND_CENTRE_M * forward_of(obs_b.ego_pose)
    centre_a = obs_a.ego_pose[:2, 3] + REAR_AXLE_BEHIND_CENTRE_M * forward_of(obs_a.ego_pose)
    dist_b = np.linalg.norm(boxes.centers[:, :2] - centre_b, axis=1)
    if np.linalg.norm(centre_b - centre_a) <= world.view_range:
        k = int(np.argmin(dist_b))
        assert dist_b[k] < 1e-9 and boxes.categories[k] == "car"
        assert boxes.yaws[k] == pytest.approx(yaw_of(obs_b.ego_pose))
    assert np.all(np.linalg.norm(boxes.centers[:, :2] - centre_a, axis=1) > 1.0)


def test_removed_ego_disappears_from_the_others_view():
    world = quiet_highway(view_range=2000.0)
    a, b = world.add_ego(), world.add_ego()
    assert len(world.observe(a).boxes) == 1
    world.remove_ego(b)
    assert world.egos() == [a]
    assert len(world.observe(a).boxes) == 0
    with pytest.raises(UnknownEgoError):
        world.observe(b)


def test_traffic_stays_around_an_ego_driving_for_minutes():
    world = EmbeddedWorld(map="highway", seed=4)
    ego = world.add_ego()
    world.set_autopilot(ego, True)
    start = world.observe(ego).ego_pose[0, 3]
    for _ in range(3):
        drive(world, 200)  # 20 s, about 500 m
        assert len(world.observe(ego).boxes) >= 5
    assert world.observe(ego).ego_pose[0, 3] - start > 1200.0


def test_the_highway_does_not_end():
    world = EmbeddedWorld(map="highway", seed=0, vehicles=6)
    ego = world.add_ego()
    world.set_autopilot(ego, True)
    car = world._egos[ego].vehicle
    car.position[0] = car.lane.length - 400.0  # skip the first 9.6 km
    drive(world, 300)  # 30 s, far past the end
    obs = world.observe(ego)
    assert obs.ego_speed > 15.0
    ahead = (obs.map_lines.starts[:, :2] - obs.ego_pose[:2, 3]) @ forward_of(obs.ego_pose)
    assert ahead.max() > 0.9 * world.view_range  # the road goes on ahead
    assert len(obs.boxes) >= 3


@pytest.mark.parametrize("name", ["merge", "roundabout", "intersection"])
def test_traffic_keeps_flowing_without_pile_ups(name):
    world = EmbeddedWorld(map=name, seed=0)
    ego = world.add_ego()
    world.set_autopilot(ego, True)
    crashed, moved = 0, 0.0
    for _ in range(400):  # 40 s
        world.tick()
        crashed += sum(v.crashed for v in world._road.vehicles)
        moved += world.observe(ego).ego_speed * world.dt
    assert crashed == 0
    assert moved > 40.0  # the autopiloted ego gets through the junction traffic


# ---------------------------------------------------------------- configuration and bad input


def test_built_from_the_config_file_with_its_weather():
    cfg = OmegaConf.create({"seed": 3, "world": OmegaConf.load(CONF)})
    cfg.world.map = "roundabout"
    cfg.world.weather.precipitation = 80.0
    world = instantiate(cfg.world)
    obs = world.observe(world.add_ego())
    assert obs.weather == Weather(precipitation=80.0)
    assert obs.environment == MAPS["roundabout"].description  # environment: null -> the map's own
    assert world.dt == 0.1 and world.tick() == pytest.approx(0.1)
    cfg.world.environment = "A rainy village square."
    assert instantiate(cfg.world).environment == "A rainy village square."


def test_bad_inputs_say_what_is_allowed():
    with pytest.raises(ValueError, match="allowed maps: highway, merge, roundabout, intersection"):
        EmbeddedWorld(map="racetrack")
    with pytest.raises(ValueError, match="truck_ratio"):
        EmbeddedWorld(truck_ratio=1.5)
    with pytest.raises(ValueError, match="dt"):
        EmbeddedWorld(dt=0.0)
    with pytest.raises(ValueError, match="allowed: .*cloudiness"):
        EmbeddedWorld(weather={"rain": 50})
    world = quiet_highway()
    ego = world.add_ego("alice")
    with pytest.raises(ValueError, match="already exists"):
        world.add_ego("alice")
    with pytest.raises(UnknownEgoError, match="'bob'.*alice") as unknown:
        world.apply_control("bob", VehicleControl())
    # It crosses processes as itself (the Serve app's actors raise it to each other).
    again = pickle.loads(pickle.dumps(unknown.value))
    assert isinstance(again, UnknownEgoError) and (again.ego_id, again.known, str(again)) == (
        "bob", ["alice"], str(unknown.value))
    with pytest.raises(UnknownEgoError):
        world.set_autopilot("bob", True)
    with pytest.raises(UnknownEgoError):
        world.remove_ego("bob")
    with pytest.raises(ValueError, match=r"throttle=1.5 is outside the allowed range \[0.0, 1.0\]"):
        world.apply_control(ego, VehicleControl(throttle=1.5))
    with pytest.raises(ValueError, match="VehicleControl"):
        world.apply_control(ego, {"throttle": 1.0})
    assert world.observe(ego).control == VehicleControl()  # nothing bad was applied
