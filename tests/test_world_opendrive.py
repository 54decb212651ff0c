"""The embedded world on OpenDRIVE files: `world.map=FILE.xodr` with Carla's client building the
map offline, no server. Cars follow the file's lanes through its junctions, keep their distance,
change lanes only where the marking allows, and the egos see the file's lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("carla")

from dwm.conditions.builder import ConditionBuilder  # noqa: E402
from dwm.config import compose  # noqa: E402
from dwm.world.base import MapKind, VehicleControl  # noqa: E402
from dwm.world.embedded import EmbeddedWorld  # noqa: E402
from tests import carla_roads  # noqa: E402

DATA = Path(__file__).parent / "data"
GRID_RHT, GRID_LHT, RING = (str(DATA / n) for n in ("town_grid_rht.xodr", "town_grid_lht.xodr", "ring_road.xodr"))
TICKS_60_S = 600  # at the default 0.1 s per tick


def drive(world: EmbeddedWorld, ticks: int, each=None) -> None:
    for _ in range(ticks):
        world.tick()
        if each is not None:
            each(world)


class Watch:
    """What the vehicles of a world did, tick by tick: how far any strayed beyond its lane's
    edge, crashes, the closest bumper gap between cars on one lane, who went through a junction
    and who changed lanes."""

    def __init__(self, world: EmbeddedWorld):
        self.inside = world._spec.junction.inside if world._spec.junction else frozenset()
        self.network = world._network
        self.beyond_edge = 0.0
        self.crashed = 0
        self.closest_gap = np.inf
        self.through: set[int] = set()
        self.changes = 0
        self._lane: dict[int, tuple] = {}

    def __call__(self, world: EmbeddedWorld) -> None:
        vehicles = world._road.vehicles
        on = {}
        for v in vehicles:
            s, lateral = v.lane.local_coordinates(v.position)
            self.beyond_edge = max(self.beyond_edge, abs(lateral) - v.lane.width_at(s) / 2)
            self.crashed += bool(v.crashed)
            on.setdefault(v.lane_index, []).append((s, v.LENGTH))
            before = self._lane.get(id(v))
            if before is not None and before[:2] in self.inside and v.lane_index[:2] not in self.inside:
                self.through.add(id(v))
            if before is not None and v.lane_index in self.network.side_lanes(before):
                self.changes += 1
            self._lane[id(v)] = v.lane_index
        for cars in on.values():
            cars.sort()
            for (s0, l0), (s1, l1) in zip(cars, cars[1:]):
                self.closest_gap = min(self.closest_gap, s1 - s0 - (l0 + l1) / 2)


@pytest.mark.parametrize("path", [GRID_RHT, GRID_LHT, RING], ids=["junctions-rht", "junctions-lht", "ring"])
def test_cars_stay_on_lanes_for_a_minute_pass_junctions_and_keep_their_distance(path):
    world = EmbeddedWorld(map=path, vehicles=16, seed=3)
    ego = world.add_ego()
    world.set_autopilot(ego, True)
    watch = Watch(world)
    drive(world, TICKS_60_S, watch)
    assert len(world._road.vehicles) == 17  # every car still on the map
    assert watch.beyond_edge < 0.3  # m past a lane's edge at worst (highway-env's steering lag)
    assert watch.crashed == 0
    assert watch.closest_gap > 1.0  # m between bumpers of cars on one lane
    speeds = [v.speed for v in world._road.vehicles]
    assert np.mean(speeds) > 1.0  # traffic moves: not a jam
    if path != RING:
        assert len(watch.through) >= 10  # most cars went through a junction
        assert id(world._egos[ego].vehicle) in watch.through  # the ego's autopilot too, on a route of its own


def test_cars_change_lanes_where_the_line_is_broken_and_never_across_a_solid_one(tmp_path):
    counts = {}
    for line in ("broken", "solid"):
        path = tmp_path / f"ring_{line}.xodr"
        path.write_text(carla_roads.ring_road(lane_line=line))
        world = EmbeddedWorld(map=str(path), vehicles=16, seed=1)
        watch = Watch(world)
        drive(world, TICKS_60_S, watch)
        counts[line] = watch.changes
    assert counts["broken"] > 0
    assert counts["solid"] == 0


def test_the_manual_ego_drives_along_the_lane_and_steers_off_it():
    world = EmbeddedWorld(map=GRID_RHT, vehicles=0, seed=0)
    ego = world.add_ego()
    start = world.observe(ego)
    world.apply_control(ego, VehicleControl(throttle=0.6))
    drive(world, 20)
    ahead = world.observe(ego)
    forward = start.ego_pose[:2, 0]
    moved = ahead.ego_pose[:2, 3] - start.ego_pose[:2, 3]
    assert moved @ forward > 5.0  # m along its heading in 2 s
    assert abs(moved @ np.array([-forward[1], forward[0]])) < 0.5  # hands off the wheel: straight on
    world.apply_control(ego, VehicleControl(throttle=0.3, steer=0.5))
    drive(world, 10)
    turned = world.observe(ego)
    yaw = np.arctan2(turned.ego_pose[1, 0], turned.ego_pose[0, 0]) - np.arctan2(forward[1], forward[0])
    assert np.sin(yaw) < -0.1  # steering right turns right (yaw decreases about +z)


def test_same_seed_same_trajectories_on_a_file():
    def run(seed):
        world = EmbeddedWorld(map=GRID_RHT, vehicles=10, seed=seed)
        world.set_autopilot(world.add_ego(), True)
        drive(world, 200)
        return np.array([v.position for v in world._road.vehicles])

    a, b, c = run(5), run(5), run(6)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_the_conditions_of_a_frame_show_the_files_lines():
    world = EmbeddedWorld(map=GRID_RHT, vehicles=4, seed=0)
    ego = world.add_ego()
    obs = world.observe(ego)
    kinds = set(obs.map_lines.kinds.tolist())
    assert {MapKind.LANE_LINE, MapKind.ROAD_EDGE} <= kinds
    # The lines are where the ego is: a line within a lane width on its left and on its right.
    origin = obs.ego_pose[:2, 3]
    left = np.array([-obs.ego_pose[1, 0], obs.ego_pose[0, 0]])
    rel = obs.map_lines.starts[:, :2] - origin
    close = np.linalg.norm(rel, axis=1) < 12.0
    assert np.any(close & (rel @ left > 0.5) & (rel @ left < 4.5))
    assert np.any(close & (rel @ left < -0.5) & (rel @ left > -4.5))
    cfg = compose(["world=embedded", f"world.map={GRID_RHT}"])
    frame = ConditionBuilder.from_config(cfg).build(obs)
    assert frame.map_images.shape[0] == 3
    assert bool((frame.map_images > 0).any(dim=(1, 2, 3)).all())  # every camera sees lines


def test_a_missing_file_or_one_carla_refuses_is_a_clear_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"world\.map=.*no such file"):
        EmbeddedWorld(map=str(tmp_path / "Town99.xodr"))
    bad = tmp_path / "bad.xodr"
    bad.write_text("<OpenDRIVE><header/></OpenDRIVE>")
    with pytest.raises(ValueError, match=r"world\.map=.*bad\.xodr.*no roads|world\.map=.*bad\.xodr.*OpenDRIVE"):
        EmbeddedWorld(map=str(bad))
    with pytest.raises(ValueError, match=r"world\.map=.*direct_junction\.xodr.*Carla cannot build a map"):
        EmbeddedWorld(map=str(DATA / "direct_junction.xodr"))  # a file Carla itself refuses
    with pytest.raises(ValueError, match=r"unknown map 'townhall'.*highway.*OpenDRIVE"):
        EmbeddedWorld(map="townhall")


def test_a_junction_carla_leaves_unlinked_is_driven_through_and_its_dead_ends_let_cars_out():
    # The junction of the map extraction tests (written by scenariogeneration): Carla links no
    # lane into it, but lanes start where the arms' lanes end; the arms end at the map's border.
    world = EmbeddedWorld(map=str(DATA / "junction_rht.xodr"), vehicles=8, seed=2)
    ego = world.add_ego()
    world.set_autopilot(ego, True)
    watch = Watch(world)
    drive(world, TICKS_60_S, watch)
    assert watch.crashed == 0
    assert len(watch.through) >= 5
    assert len(world._road.vehicles) >= 8  # cars that left at a dead end came back


def test_a_lane_that_narrows_away_is_left_in_time_and_never_entered():
    path = str(DATA / "narrowing_lane.xodr")
    world = EmbeddedWorld(map=path, vehicles=14, seed=4)
    ending = world._road.ending_lanes
    assert len(ending) == 1  # the outer lane where it narrows
    (index,) = ending
    lane = world._network.get_lane(index)
    (beside,) = world._network.side_lanes(index)  # the lane that goes on
    going_on = world._network.get_lane(beside)
    assert lane.usable_length < lane.length - 30.0  # too narrow for a car well before its end
    outside = []  # m of car beyond the road's edge, past where the narrowing lane is too narrow
    came, into = [], []

    def look(w):
        for v in w._road.vehicles:
            s = lane.local_coordinates(v.position)[0]
            if v.lane_index == index:
                came.append(v)
            if lane.usable_length + 2.0 < s < lane.length and v.lane_index in (index, beside):
                s_on, lateral = going_on.local_coordinates(v.position)
                # The car's far side against the edge of what is left of the narrowing lane.
                beyond_line = abs(lateral) - going_on.width_at(s_on) / 2
                outside.append(beyond_line + v.WIDTH / 2 - lane.width_at(s))
            if getattr(v, "target_lane_index", None) == index and v.lane_index == beside:
                into.append(v.lane_index)  # a lane change into it (cars behind it follow their lane on)

    watch = Watch(world)
    drive(world, TICKS_60_S, lambda w: (watch(w), look(w)))
    assert watch.crashed == 0
    assert came and watch.changes > 0  # cars came onto the narrowing stretch and merged
    assert outside and max(outside) < 0.3  # past that point no car sticks out of the road
    assert into == []  # nobody changed into it


def test_lanes_carla_cannot_place_are_left_out_with_a_warning(caplog):
    # Two roads whose ids Carla reads as one number: their waypoints mix into no line.
    world = EmbeddedWorld(map=str(DATA / "string_road_ids.xodr"), vehicles=4, seed=0)
    assert "do not form one line" in caplog.text
    watch = Watch(world)
    drive(world, 300, watch)
    assert watch.crashed == 0 and watch.beyond_edge < 0.3
    with pytest.raises(ValueError, match=r"world\.map=.*nan_geometry\.xodr.*no driving lane.*cannot place"):
        EmbeddedWorld(map=str(DATA / "nan_geometry.xodr"))


def test_the_files_crosswalks_are_in_the_observation():
    world = EmbeddedWorld(map=str(DATA / "crosswalks_opendrive.xodr"), vehicles=0, view_range=200.0)
    obs = world.observe(world.add_ego())
    walks = obs.map_lines.kinds == MapKind.CROSSWALK
    assert walks.sum() >= 5 * 4  # the file's five crosswalks, closed outlines of four sides or more
