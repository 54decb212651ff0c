"""Map extraction from OpenDRIVE files the way real files are written, not only Carla's towns:
missing road marks, string ids, left-hand traffic, crosswalks in every layout, geometry Carla
cannot evaluate. Each file in tests/data/ was written for one case (its first comment says
which); each is loaded with the real `carla.Map`, as a Carla server or the offline client
loads it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

carla = pytest.importorskip("carla")

from dwm.world.base import MapKind  # noqa: E402
from dwm.world.carla_map import extract_map  # noqa: E402
from dwm.world.carla_town import town_from_file  # noqa: E402
from dwm.world.opendrive import carla_road_id  # noqa: E402

DATA = Path(__file__).parent / "data"
LANE = 3.5  # m, the lane width of every file here
SIDEWALK = 2.0


def extract(name: str):
    return extract_map(town_from_file(carla, DATA / name))


def segments(geometry, kind: MapKind) -> tuple[np.ndarray, np.ndarray]:
    keep = geometry.kinds == kind
    return geometry.starts[keep], geometry.ends[keep]


def near_y(geometry, kind: MapKind, y: float, x_range: tuple[float, float], tol: float = 0.05) -> float:
    """Length (m) of the segments of `kind` lying along y = `y` within x_range."""
    a, b = segments(geometry, kind)
    on = (np.abs(a[:, 1] - y) < tol) & (np.abs(b[:, 1] - y) < tol)
    lo = np.clip(np.minimum(a[:, 0], b[:, 0]), *x_range)
    hi = np.clip(np.maximum(a[:, 0], b[:, 0]), *x_range)
    return float((hi - lo)[on].sum())


def test_lanes_without_road_marks_have_no_line_there_and_the_rest_is_drawn():
    # Lane -1 has no <roadMark> (Carla: no marking object at all); lane 1's start at s = 30 m.
    g = extract("road_marks_missing.xodr")
    # The outer borders are road edges over the whole road, marks or not.
    assert near_y(g, MapKind.ROAD_EDGE, LANE, (0, 60)) > 59
    assert near_y(g, MapKind.ROAD_EDGE, -2 * LANE, (0, 60)) > 59
    # Between lanes -1 and -2 no line is painted: none is drawn.
    assert near_y(g, MapKind.LANE_LINE, -LANE, (0, 60)) == 0


def test_road_ids_that_are_not_numbers_are_matched_to_carlas_roads(caplog):
    assert [carla_road_id(i) for i in ("Kalle", "7", "12abc", "0x10", "-3", "99999999999")] == [0, 7, 12, 16, 0, 2**32 - 1]
    # Roads 'Kalle' (y = 0), '7' (y = 50) and 'Nils' (y = 100). Carla reads 'Kalle' and 'Nils'
    # both as road 0 and keeps one, 'Nils': the lines are where Carla's roads are.
    assert sorted({w.road_id for w in town_from_file(carla, DATA / "string_road_ids.xodr").generate_waypoints(5.0)}) == [0, 7]
    with caplog.at_level(logging.WARNING, logger="dwm.world.carla_map"):
        g = extract("string_road_ids.xodr")
    for y0, drawn in ((0.0, False), (50.0, True), (100.0, True)):
        for y in (y0 + LANE, y0 - 2 * LANE):
            assert (near_y(g, MapKind.ROAD_EDGE, y, (0, 40)) > 39) == drawn, y0
    said = [r.getMessage() for r in caplog.records if "read as road 0" in r.getMessage()]
    assert len(said) == 1 and "'Kalle'" in said[0] and "'Nils'" in said[0], said


def _midpoints(geometry, kind: MapKind, flip_y: bool = False) -> np.ndarray:
    a, b = segments(geometry, kind)
    mid = (a + b) / 2
    return mid * [1, -1, 1] if flip_y else mid


def _unmatched(points: np.ndarray, others: np.ndarray, tol: float) -> int:
    """How many of `points` have no point of `others` within `tol` m (in x, y)."""
    if len(others) == 0:
        return len(points)
    count = 0
    for chunk in np.array_split(points, max(1, len(points) // 256)):
        d = np.linalg.norm(chunk[:, None, :2] - others[None, :, :2], axis=-1)
        count += int((d.min(axis=1) > tol).sum())
    return count


def test_left_hand_traffic_is_the_mirror_image_of_right_hand_traffic():
    # junction_lht.xodr is junction_rht.xodr mirrored across the x axis and driven on the left.
    rht, lht = extract("junction_rht.xodr"), extract("junction_lht.xodr")
    for kind in (MapKind.ROAD_EDGE, MapKind.LANE_LINE, MapKind.CROSSWALK):
        right, left = _midpoints(rht, kind), _midpoints(lht, kind, flip_y=True)
        assert len(right) > 0, kind
        assert abs(len(right) - len(left)) <= 0.02 * len(right), (kind, len(right), len(left))
        assert _unmatched(left, right, 0.1) <= 0.02 * len(left), kind
        assert _unmatched(right, left, 0.1) <= 0.02 * len(right), kind
    # And the outer borders are road edges, not the centre line: an arm of the junction (road
    # 1 along +x from the origin) has its edges at the sidewalks, and its centre line at y = 0
    # is a lane line, on both.
    for g, sign in ((rht, 1), (lht, -1)):
        assert near_y(g, MapKind.ROAD_EDGE, sign * LANE, (0, 20)) > 19
        assert near_y(g, MapKind.ROAD_EDGE, -sign * LANE, (0, 20)) > 19
        assert near_y(g, MapKind.ROAD_EDGE, 0.0, (0, 20)) == 0
        assert near_y(g, MapKind.LANE_LINE, 0.0, (0, 20)) > 19


def test_every_crosswalk_of_the_file_is_its_own_closed_polygon():
    # Five crosswalks across a straight road, 4 m wide, centred at s = 20, 40, 60, 80, 88 m: two
    # as <outline> with an unrepeated first corner, one in <outlines>, one with cornerRoad
    # corners, and one as a two-corner line at s = 90 m with a 4 m marking on its left.
    g = extract("crosswalks_opendrive.xodr")
    a, b = segments(g, MapKind.CROSSWALK)
    assert len(a) == 20  # five closed quadrilaterals
    half = 2 * LANE + SIDEWALK
    for s in (20.0, 40.0, 60.0, 80.0, 88.0):
        here = (np.abs(a[:, 0] - s) <= 2.01) & (np.abs(b[:, 0] - s) <= 2.01)
        assert here.sum() == 4, s
        corners = np.unique(np.round(a[here, :2], 2), axis=0)
        expected = np.array([[s - 2, -half], [s - 2, half], [s + 2, -half], [s + 2, half]])
        np.testing.assert_allclose(corners[np.lexsort(corners.T[::-1])], expected[np.lexsort(expected.T[::-1])], atol=0.02)
    # No line from one crosswalk to the next.
    assert np.abs(b[:, 0] - a[:, 0]).max() <= 4.01


def test_geometry_carla_cannot_evaluate_leaves_a_gap_without_a_chord(caplog):
    # Road 1 along +x: line [0, 18], arc of curvature 0 [18, 36], line [36, 54], spiral of
    # constant curvature [54, 72], line [72, 90]. Carla gives NaN on the arc and the spiral.
    with caplog.at_level(logging.WARNING, logger="dwm.world.carla_map"):
        g = extract("nan_geometry.xodr")
    said = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
    assert len(said) == 1 and "1" in said[0], said
    for kind in (MapKind.ROAD_EDGE,):
        for x_range in ((0, 18), (36, 54), (72, 90)):
            assert near_y(g, kind, LANE, (x_range[0] + 1, x_range[1] - 1)) >= x_range[1] - x_range[0] - 2.01, x_range
    xs = np.stack([g.starts[:, 0], g.ends[:, 0]], 1)
    lo, hi = xs.min(1), xs.max(1)
    for gap in ((18.5, 35.5), (54.5, 71.5)):  # nothing inside a gap, nothing across one
        assert not ((hi > gap[0]) & (lo < gap[1])).any(), gap
    assert (hi - lo).max() < 1.5  # samples 1 m apart: no long chord


def test_a_file_carla_refuses_or_that_is_no_opendrive_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.xodr"
    with pytest.raises(ValueError, match=r"world\.map=.*nope\.xodr.*no such file"):
        town_from_file(carla, missing)
    broken = tmp_path / "broken.xodr"
    broken.write_text("<OpenDRIVE><road id='1'")
    with pytest.raises(ValueError, match=r"broken\.xodr.*XML cannot be read"):
        town_from_file(carla, broken)
    # A file that is OpenDRIVE, but that Carla's own map building fails on (its C++ raises).
    with pytest.raises(ValueError, match=r"direct_junction\.xodr.*Carla cannot build a map.*IndexError"):
        town_from_file(carla, DATA / "direct_junction.xodr")
    other = tmp_path / "page.xodr"
    other.write_text("<html><body/></html>")
    with pytest.raises(ValueError, match=r"page\.xodr.*not an OpenDRIVE file with roads"):
        town_from_file(carla, other)
