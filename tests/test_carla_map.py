"""Map extraction from real OpenDRIVE loaded into the real `carla.Map`: lines where the roads are."""

from __future__ import annotations

import math

import numpy as np
import pytest

carla = pytest.importorskip("carla")
pytest.importorskip("scenariogeneration")

from dwm.world.base import MapKind  # noqa: E402
from dwm.world.carla_map import extract_map  # noqa: E402
from tests import carla_roads  # noqa: E402


def kind(geometry, k: MapKind) -> tuple[np.ndarray, np.ndarray]:
    mask = geometry.kinds == k
    return geometry.starts[mask], geometry.ends[mask]


def points(geometry, k: MapKind) -> np.ndarray:
    a, b = kind(geometry, k)
    return np.concatenate([a, b])


def test_straight_road_lines_and_edges_lie_at_the_lane_borders():
    g = extract_map(carla.Map("straight", carla_roads.straight_road(length=100.0)))
    # Lane 1 spans y 0..3.5 (left of the reference line), lanes -1 and -2 y 0..-7.
    lines, edges = points(g, MapKind.LANE_LINE), points(g, MapKind.ROAD_EDGE)
    assert sorted(np.unique(np.round(lines[:, 1], 4))) == [-3.5, 0.0]  # centre line and lane divider
    assert sorted(np.unique(np.round(edges[:, 1], 4))) == [-7.0, 3.5]  # the outer borders
    for y in (-7.0, -3.5, 0.0, 3.5):  # each line runs the whole road, once
        on = np.abs(np.concatenate([lines, edges])[:, 1] - y) < 1e-4
        a, b = kind(g, MapKind.LANE_LINE if y in (-3.5, 0.0) else MapKind.ROAD_EDGE)
        seg = np.abs(a[:, 1] - y) < 1e-4
        assert np.sum(np.abs(b[seg, 0] - a[seg, 0])) == pytest.approx(100.0, abs=0.01)
        assert on.any()
    assert np.allclose(np.concatenate([lines, edges])[:, 2], 0.0)
    assert len(kind(g, MapKind.CROSSWALK)[0]) == 0


def test_sidewalks_make_road_edges_and_crosswalks_are_closed_polygons():
    g = extract_map(carla.Map("straight", carla_roads.straight_road(length=100.0, sidewalks=True, crosswalk_s=50.0)))
    edges = points(g, MapKind.ROAD_EDGE)
    assert sorted(np.unique(np.round(edges[:, 1], 4))) == [-7.0, 3.5]  # the kerb, not the sidewalk's far side
    a, b = kind(g, MapKind.CROSSWALK)
    assert len(a) == 4  # a rectangle: four sides, the last one back to the first corner
    np.testing.assert_allclose(b[-1], a[0], atol=1e-5)
    np.testing.assert_allclose(a[1:], b[:-1], atol=1e-5)
    # 4 m along the road at s = 50, from the far right sidewalk's edge (y = -9) to the left one's (5.5)
    assert sorted(np.unique(np.round(a[:, 0], 3))) == [48.0, 52.0]
    assert sorted(np.unique(np.round(a[:, 1], 3))) == [-9.0, 5.5]


def test_arc_lines_follow_circles_around_the_arc_centre():
    radius = 50.0
    g = extract_map(carla.Map("arc", carla_roads.arc_road(radius=radius, angle=math.pi / 2)))
    centre = np.array([0.0, radius])  # a left turn from the origin heading +x
    for k, radii in ((MapKind.LANE_LINE, [radius]), (MapKind.ROAD_EDGE, [radius - 3.5, radius + 3.5])):
        p = points(g, k)
        r = np.linalg.norm(p[:, :2] - centre, axis=1)
        assert sorted(np.unique(np.round(r, 2))) == radii
        angles = np.arctan2(p[:, 0], centre[1] - p[:, 1])  # 0 at the start, pi/2 at the end
        assert angles.min() == pytest.approx(0.0, abs=1e-3) and angles.max() == pytest.approx(math.pi / 2, abs=1e-3)
    # Sampled every metre along the lane: no segment longer than about 1.1 m.
    a, b = kind(g, MapKind.ROAD_EDGE)
    assert np.linalg.norm(b - a, axis=1).max() < 1.1


def test_junction_edges_stay_on_the_arms_and_crosswalks_close_each_approach():
    arm, radius = 60.0, 12.0
    g = extract_map(carla.Map("junction", carla_roads.junction(arm=arm, radius=radius, sidewalks=False)))
    centre = np.array([arm + radius, 0.0])  # the generator puts the first arm's start at the origin
    edges = points(g, MapKind.ROAD_EDGE)[:, :2] - centre
    # Road edges only where a road has nothing beside it: along the four arms, 3.5 m off their
    # axis, never inside the junction (its bare sides are open road).
    along, across = np.max(np.abs(edges), axis=1), np.min(np.abs(edges), axis=1)
    assert along.min() >= radius - 1e-3
    np.testing.assert_allclose(across, 3.5, atol=1e-3)
    # The junction's connecting roads carry the generator's painted lines: lane lines inside.
    lines = points(g, MapKind.LANE_LINE)[:, :2] - centre
    assert (np.max(np.abs(lines), axis=1) < radius - 1.0).any()
    # Four crosswalks, each closed, 3 m deep across both lanes of an arm's end.
    a, b = kind(g, MapKind.CROSSWALK)
    assert len(a) == 4 * 4
    for k in range(4):
        sides_a, sides_b = a[4 * k : 4 * k + 4], b[4 * k : 4 * k + 4]
        np.testing.assert_allclose(sides_b[-1], sides_a[0], atol=1e-4)
        lengths = sorted(np.round(np.linalg.norm(sides_b - sides_a, axis=1), 3))
        assert lengths == [3.0, 3.0, 7.0, 7.0]
        middle = sides_a.mean(axis=0)[:2] - centre
        assert np.max(np.abs(middle)) == pytest.approx(radius + 2.0, abs=1e-3)  # 2 m before the arm's end


def test_map_step_sets_the_sampling():
    text = carla_roads.straight_road(length=100.0)
    coarse = extract_map(carla.Map("straight", text), step=5.0)
    fine = extract_map(carla.Map("straight", text), step=1.0)
    assert len(fine.kinds) == 5 * len(coarse.kinds)
    with pytest.raises(ValueError, match="world.map_step"):
        extract_map(carla.Map("straight", text), step=0)


def test_culling_a_town_sized_map_keeps_exactly_the_segments_near_the_ego():
    g = extract_map(carla.Map("long", carla_roads.straight_road(length=3000.0)))
    assert len(g.kinds) > 10000  # culled through its grid
    rng = np.random.default_rng(0)
    for _ in range(50):
        xy, radius = rng.uniform([-100, -50], [3100, 50]), rng.uniform(5.0, 150.0)
        culled = g.near(xy, radius)
        every = (np.linalg.norm(g.starts[:, :2] - xy, axis=1) <= radius) | (np.linalg.norm(g.ends[:, :2] - xy, axis=1) <= radius)
        np.testing.assert_array_equal(culled.starts, g.starts[every])
        np.testing.assert_array_equal(culled.kinds, g.kinds[every])
