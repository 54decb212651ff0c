"""Lane lines, road edges and crosswalks of a Carla town, from its OpenDRIVE, in our world frame.

The geometry comes from Carla's own OpenDRIVE implementation (`carla.Map`: waypoints at given
`s`, lane widths, lane markings), so every reference-line geometry Carla knows (lines, arcs,
spirals, cubic polynomials) is handled as the server handles it, and the lines fall exactly
where the server's roads are. The road/section/lane layout (which lanes exist, their type,
which roads lie in junctions) and the crosswalk objects are read from the OpenDRIVE text
itself (`dwm.world.opendrive`).

What is drawn, per lane section, for each drivable lane (driving, bidirectional, entry/exit,
on/off ramp), sampled every `step` metres along the lane:
- the border between two drivable lanes: a lane line where Carla reports a painted marking
  of a kept type (the reference's: solid, broken and their doubles), a road edge for a curb;
- the border between a drivable lane and anything else (sidewalk, shoulder, median, ...), or
  nothing at all outside junctions: a road edge (nuScenes' drivable-area border). In
  junctions a connecting road's bare side is open road, so only painted markings count there.
- crosswalk outlines (OpenDRIVE objects of type crosswalk, every outline of each) as closed
  polygons.

Which of a lane's two borders is its outer one (away from the reference line) is read from the
lane layout around it (Carla's neighbouring lanes), so right- and left-hand traffic (`rule="LHT"`)
come out as mirror images. Where Carla cannot evaluate a road's geometry (NaN: an arc of
curvature 0, a spiral of constant curvature) the lines stop and start again after the gap;
no chord is drawn across it.

Computed once per town (a town takes about a second); `MapGeometry.near` culls per frame.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from dwm.world.base import MapKind
from dwm.world.carla_pose import from_carla_points
from dwm.world.map_geometry import MapGeometry
from dwm.world.opendrive import CrosswalkOutline, LaneSection, OpenDrive

log = logging.getLogger(__name__)

DRIVABLE_LANE_TYPES = frozenset({"driving", "bidirectional", "entry", "exit", "onramp", "offramp"})
# Carla's LaneMarkingType names -> our kind; the rest (NONE, Other, BottsDots, Grass) is not drawn.
MARKING_KINDS = {
    "Solid": MapKind.LANE_LINE,
    "Broken": MapKind.LANE_LINE,
    "SolidSolid": MapKind.LANE_LINE,
    "SolidBroken": MapKind.LANE_LINE,
    "BrokenSolid": MapKind.LANE_LINE,
    "BrokenBroken": MapKind.LANE_LINE,
    "Curb": MapKind.ROAD_EDGE,
}
SECTION_END_MARGIN_M = 1e-3  # sample this short of a section's end, where the next one begins
CLOSED_TOL_M = 0.01  # a crosswalk's last corner this close to its first already closes it
HEADING_DS_M = 0.05  # s step for the reference line's heading at a crosswalk


def _neighbours(lane_id: int) -> tuple[int, int]:
    """(outer, inner) neighbour ids of a lane: outer is away from the reference line (the
    lane's right in its driving direction), inner towards it, across it for |id| = 1."""
    sign = 1 if lane_id > 0 else -1
    inner = -lane_id if abs(lane_id) == 1 else lane_id - sign
    return lane_id + sign, inner


def _border_kinds(section: LaneSection, lane_id: int, markings: list[str], outer: bool) -> np.ndarray | None:
    """Kind per sample (n,) of one border of a drivable lane, or None when another lane draws
    it or nothing is drawn. markings: Carla's marking type name at each sample."""
    outer_id, inner_id = _neighbours(lane_id)
    neighbour = section.lanes.get(outer_id if outer else inner_id)
    if neighbour in DRIVABLE_LANE_TYPES:
        # A shared border is drawn once: by the lane inside it (its outer border), and the
        # centre line between the two directions by lane -1.
        if not outer and not (abs(lane_id) == 1 and lane_id < 0):
            return None
        kinds = np.array([MARKING_KINDS.get(m, -1) for m in markings], dtype=np.int8)
        return kinds if (kinds >= 0).any() else None
    if neighbour is None and section.in_junction:
        kinds = np.array([MARKING_KINDS.get(m, -1) for m in markings], dtype=np.int8)
        return kinds if (kinds >= 0).any() else None
    return np.full(len(markings), MapKind.ROAD_EDGE, dtype=np.int8)


@dataclass(frozen=True)
class LaneRun:
    """A stretch of one lane that Carla evaluates, sampled: (n, 3) centres, (n, 3) right unit
    vectors, (n,) widths, Carla's frame; the right and left marking type names per sample."""

    centres: np.ndarray
    rights: np.ndarray
    widths: np.ndarray
    right_marks: list[str]
    left_marks: list[str]


def _marking(marking) -> str:
    """Carla's marking type name; no marking where the lane is sampled (no <roadMark>, or one
    that starts further on) is None in Carla, and here "NONE"."""
    return "NONE" if marking is None else marking.type.name


def _sample_lane(carla_map, section: LaneSection, lane_id: int, step: float) -> tuple[list[LaneRun], bool, object]:
    """One lane, sampled every `step` m at most: its runs (split where Carla's geometry is NaN,
    so no line bridges a gap), whether any sample was NaN, and a waypoint of it (or None)."""
    length = section.s_end - section.s_start
    if length <= SECTION_END_MARGIN_M:
        return [], False, None
    count = max(1, math.ceil(length / step - 1e-9))
    s_values = section.s_start + np.arange(count + 1) * (length / count)  # evenly, `step` m at most
    s_values[-1] = section.s_end - SECTION_END_MARGIN_M
    runs: list[LaneRun] = []
    run: list[tuple] = []
    nan, first = False, None

    def close_run() -> None:
        if len(run) >= 2:
            c, r, w, rm, lm = zip(*run)
            runs.append(LaneRun(np.array(c), np.array(r), np.array(w), list(rm), list(lm)))
        run.clear()

    for s in s_values:
        wp = carla_map.get_waypoint_xodr(section.carla_id, lane_id, float(s))
        if wp is None:
            close_run()
            continue
        loc, right = wp.transform.location, wp.transform.get_right_vector()
        if not all(math.isfinite(v) for v in (loc.x, loc.y, loc.z, right.x, right.y, right.z, wp.lane_width)):
            nan = True  # a geometry Carla cannot evaluate here: the line stops
            close_run()
            continue
        first = first or wp
        run.append(((loc.x, loc.y, loc.z), (right.x, right.y, right.z), wp.lane_width,
                    _marking(wp.right_lane_marking), _marking(wp.left_lane_marking)))
    close_run()
    return runs, nan, first


def _right_is_outer(wp, lane_id: int, lht: bool) -> bool:
    """Whether a lane's right side (in its driving direction, Carla's right vector) is its
    outer side, away from the reference line: read from the lanes next to it. Without
    neighbours, from the traffic rule: right-hand traffic drives with the outer side on the
    right, left-hand traffic with the inner side."""
    for neighbour, on_right in ((wp.get_right_lane(), True), (wp.get_left_lane(), False)):
        if neighbour is None or neighbour.lane_id == 0:
            continue
        n = neighbour.lane_id
        outward = (n > 0) == (lane_id > 0) and abs(n) > abs(lane_id)
        return outward if on_right else not outward
    return not lht


def _segments(points: np.ndarray, kinds: np.ndarray):
    """Segments of a polyline (n, 3) whose start sample has a drawn kind: starts, ends, kinds."""
    keep = kinds[:-1] >= 0
    return points[:-1][keep], points[1:][keep], kinds[:-1][keep]


def _left_of(heading: float) -> np.ndarray:
    """(3,) unit vector to the left of a heading (rad), our frame."""
    return np.array([-math.sin(heading), math.cos(heading), 0.0])


def _reference_pose(carla_map, drive: OpenDrive, road_id: str, s: float) -> tuple[np.ndarray, float] | None:
    """The road's reference line at `s`, our frame: (3,) point m and heading rad; None where
    Carla has no lane there. Carla gives lanes, not the reference line: it is the inner border
    of the innermost lane, moved back by the lane offset."""
    section = drive.section_at(road_id, s)
    if section is None:
        return None
    lht = road_id in drive.lht_roads
    s = min(max(s, section.s_start), section.s_end - SECTION_END_MARGIN_M)
    # Two points a little apart along the road give the heading: after s, or before it at the
    # section's end.
    ahead = s + HEADING_DS_M < section.s_end
    pair = (s, s + HEADING_DS_M) if ahead else (s - HEADING_DS_M, s)
    for lane_id in (-1, 1):
        if lane_id not in section.lanes:
            continue
        points = []
        for at in pair:
            wp = carla_map.get_waypoint_xodr(section.carla_id, lane_id, float(at))
            if wp is None:
                break
            loc, right = wp.transform.location, wp.transform.get_right_vector()
            inner = -1.0 if _right_is_outer(wp, lane_id, lht) else 1.0
            half = wp.lane_width / 2.0 * inner
            points.append((loc.x + half * right.x, loc.y + half * right.y, loc.z + half * right.z))
        if len(points) < 2 or not np.isfinite(points).all():
            continue
        before, after = from_carla_points(np.array(points))
        heading = math.atan2(after[1] - before[1], after[0] - before[0])
        left = _left_of(heading)
        here = before if ahead else after
        return here - drive.lane_offset(road_id, s) * left, heading
    return None


def _crosswalk_polygon(carla_map, drive: OpenDrive, outline: CrosswalkOutline) -> np.ndarray | None:
    """One crosswalk outline as a closed polygon (k + 1, 3), our frame; None off the roads."""
    if outline.kind == "local":
        pose = _reference_pose(carla_map, drive, outline.road_id, outline.s)
        if pose is None:
            return None
        ref, heading = pose
        left = _left_of(heading)
        origin = ref + outline.t * left + np.array([0.0, 0.0, outline.z_offset])
        yaw = heading + outline.hdg
        u, v, z = outline.corners.T
        corners = origin + np.stack([u * math.cos(yaw) - v * math.sin(yaw), u * math.sin(yaw) + v * math.cos(yaw), z], 1)
    else:
        corners = []
        for s, t, dz in outline.corners:
            pose = _reference_pose(carla_map, drive, outline.road_id, float(s))
            if pose is None:
                return None
            ref, heading = pose
            corners.append(ref + t * _left_of(heading) + [0.0, 0.0, dz])
        corners = np.array(corners)
    if len(corners) == 2:  # a line with the marking's width: the strip it paints
        a, b = corners
        along = (b - a)[:2] / max(float(np.linalg.norm((b - a)[:2])), 1e-9)
        left = np.array([-along[1], along[0], 0.0]) * outline.strip_width
        near, far = {"left": (0.0, 1.0), "right": (-1.0, 0.0)}.get(outline.strip_side, (-0.5, 0.5))
        corners = np.array([a + near * left, b + near * left, b + far * left, a + far * left])
    elif np.linalg.norm(corners[-1] - corners[0]) <= CLOSED_TOL_M:
        corners = corners[:-1]  # written closed (Carla's towns repeat the first corner)
    return np.concatenate([corners, corners[:1]])


def crosswalk_polygons(carla_map, drive: OpenDrive, roads: set[str] | None = None) -> list[np.ndarray]:
    """Every outline of every crosswalk object of the OpenDRIVE (of `roads`, None: all), each
    its own closed (k + 1, 3) polygon in our world frame."""
    outlines = [o for o in drive.crosswalks if roads is None or o.road_id in roads]
    polygons = (_crosswalk_polygon(carla_map, drive, outline) for outline in outlines)
    return [p for p in polygons if p is not None and np.isfinite(p).all()]


def _roads_carla_holds(carla_map, drive: OpenDrive) -> set[str]:
    """The roads of the file that Carla has: all but those whose id reads as the same number as
    another's (`carla_road_id`), of which Carla keeps one. Which one: the road whose reference
    line starts nearest to Carla's lane at s = 0 of that number (logged)."""
    by_number: dict[int, list[str]] = {}
    for section in drive.sections:
        roads = by_number.setdefault(section.carla_id, [])
        if section.road_id not in roads:
            roads.append(section.road_id)
    held = set()
    for number, roads in by_number.items():
        if len(roads) == 1:
            held.add(roads[0])
            continue
        found = None
        for lane_id in (-1, 1, -2, 2):
            wp = carla_map.get_waypoint_xodr(number, lane_id, 0.0)
            if wp is not None:
                found = from_carla_points(np.array([[wp.transform.location.x, wp.transform.location.y, 0.0]]))[0, :2]
                break
        if found is None:
            continue
        kept = min(roads, key=lambda r: float(np.linalg.norm(np.subtract(drive.road_starts.get(r, (np.inf, np.inf)), found))))
        held.add(kept)
        log.warning("roads %s all read as road %d in Carla, which keeps one of them (%s): the others are not drawn",
                    ", ".join(repr(r) for r in roads), number, kept)
    return held


def extract_map(carla_map, step: float = 1.0) -> MapGeometry:
    """All lane lines, road edges and crosswalks of a town (`carla.Map`), our world frame.

    step: m between samples along each lane (the reference samples every 1.0 m).
    """
    if not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"world.map_step={step!r} must be a positive number of metres")
    drive = OpenDrive.parse(carla_map.to_opendrive(), getattr(carla_map, "name", "the town"))
    starts, ends, kinds = [], [], []
    nan_roads: set[str] = set()
    held = _roads_carla_holds(carla_map, drive)
    for section in drive.sections:
        if section.road_id not in held:
            continue
        lht = section.road_id in drive.lht_roads
        for lane_id, lane_type in section.lanes.items():
            if lane_type not in DRIVABLE_LANE_TYPES:
                continue
            runs, nan, wp = _sample_lane(carla_map, section, lane_id, float(step))
            if nan:
                nan_roads.add(section.road_id)
            if not runs:
                continue
            right_outer = _right_is_outer(wp, lane_id, lht)
            for run in runs:
                half = (run.widths / 2.0)[:, None] * run.rights  # (n, 3) from the centre to the right border
                for border, marks, on_right in ((run.centres + half, run.right_marks, True),
                                                (run.centres - half, run.left_marks, False)):
                    border_kinds = _border_kinds(section, lane_id, marks, outer=on_right == right_outer)
                    if border_kinds is not None:
                        a, b, k = _segments(from_carla_points(border), border_kinds)
                        starts.append(a)
                        ends.append(b)
                        kinds.append(k)
    if nan_roads:
        log.warning("%s: Carla cannot evaluate the geometry of part of road(s) %s (NaN: e.g. an arc of "
                    "curvature 0 or a spiral of constant curvature); their lines stop there",
                    getattr(carla_map, "name", "the town"), ", ".join(sorted(nan_roads)))
    for polygon in crosswalk_polygons(carla_map, drive, held):
        starts.append(polygon[:-1])
        ends.append(polygon[1:])
        kinds.append(np.full(len(polygon) - 1, MapKind.CROSSWALK, dtype=np.int8))

    def world(parts: list[np.ndarray]) -> np.ndarray:
        xyz = np.concatenate(parts) if parts else np.zeros((0, 3))
        xyz.flags.writeable = False  # shared by every observation of this town
        return xyz

    codes = np.concatenate(kinds) if kinds else np.zeros(0, dtype=np.int8)
    codes.flags.writeable = False
    return MapGeometry(world(starts), world(ends), codes)


def main(argv: list[str] | None = None) -> int:
    """`python -m dwm.world.carla_map FILE.xodr ...`: extract each file's map (Carla's client
    builds the map offline, no server) and print what came out, or why it could not."""
    import argparse

    import carla

    from dwm.world.carla_town import town_from_file

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--step", type=float, default=1.0, help="m between samples along each lane")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    failed = 0
    print("| file | roads | lane lines | road edges | crosswalk sides | error |")
    print("|---|---|---|---|---|---|")
    for path in args.files:
        try:
            town = town_from_file(carla, path, key="file")
            g = extract_map(town, args.step)
            roads = len({s.road_id for s in OpenDrive.parse(town.to_opendrive()).sections})
            counts = [int((g.kinds == k).sum()) for k in (MapKind.LANE_LINE, MapKind.ROAD_EDGE, MapKind.CROSSWALK)]
            print(f"| {path} | {roads} | {counts[0]} | {counts[1]} | {counts[2]} | |")
        except Exception as err:  # report and go on with the next file
            failed += 1
            print(f"| {path} | | | | | {type(err).__name__}: {err} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
