"""Lane lines, road edges and crosswalks of a Carla town, from its OpenDRIVE, in our world frame.

The geometry comes from Carla's own OpenDRIVE implementation (`carla.Map`: waypoints at given
`s`, lane widths, lane markings, crosswalk zones), so every reference-line geometry Carla knows
(lines, arcs, spirals, cubic polynomials) is handled as the server handles it, and the lines
fall exactly where the server's roads are. Only the road/section/lane layout (which lanes
exist, their type, which roads lie in junctions) is read from the OpenDRIVE text itself.

What is drawn, per lane section, for each drivable lane (driving, bidirectional, entry/exit,
on/off ramp), sampled every `step` metres along the lane:
- the border between two drivable lanes: a lane line where Carla reports a painted marking
  of a kept type (the reference's: solid, broken and their doubles), a road edge for a curb;
- the border between a drivable lane and anything else (sidewalk, shoulder, median, ...), or
  nothing at all outside junctions: a road edge (nuScenes' drivable-area border). In
  junctions a connecting road's bare side is open road, so only painted markings count there.
- crosswalk outlines (OpenDRIVE objects of type crosswalk) as closed polygons.

Computed once per town (a town takes about a second); `MapGeometry.near` culls per frame.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from dwm.world.carla_pose import from_carla_points
from dwm.world.base import MapKind
from dwm.world.map_geometry import MapGeometry

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
CLOSED_TOL_M = 0.01  # a crosswalk corner this close to the polygon's first corner closes it


@dataclass(frozen=True)
class LaneSection:
    """One lane section of the OpenDRIVE: s range (m) and lane id -> lane type (lower case)."""

    road_id: int
    in_junction: bool
    s_start: float
    s_end: float
    lanes: dict[int, str]


def lane_sections(xodr: str) -> list[LaneSection]:
    """The lane sections of every road of an OpenDRIVE text, in document order."""
    try:
        root = ET.fromstring(xodr)
    except ET.ParseError as err:
        raise ValueError(f"the town's OpenDRIVE cannot be parsed: {err}") from None
    sections = []
    for road in root.iter("road"):
        road_id, length = int(road.get("id")), float(road.get("length"))
        in_junction = road.get("junction", "-1") != "-1"
        xml_sections = road.findall("lanes/laneSection")
        starts = [float(s.get("s", 0.0)) for s in xml_sections]
        for i, section in enumerate(xml_sections):
            end = starts[i + 1] if i + 1 < len(starts) else length
            lanes = {
                int(lane.get("id")): lane.get("type", "none").lower()
                for side in ("left", "right")
                for lane in section.findall(f"{side}/lane")
            }
            sections.append(LaneSection(road_id, in_junction, starts[i], end, lanes))
    return sections


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


def _sample_lane(carla_map, section: LaneSection, lane_id: int, step: float):
    """Points along one lane: (n, 3) centres, (n, 3) right unit vectors, (n,) widths, in Carla's
    frame, and the right / left marking type names; None when Carla has no such lane."""
    length = section.s_end - section.s_start
    if length <= SECTION_END_MARGIN_M:
        return None
    count = max(1, math.ceil(length / step - 1e-9))
    s_values = section.s_start + np.arange(count + 1) * (length / count)  # evenly, `step` m at most
    s_values[-1] = section.s_end - SECTION_END_MARGIN_M
    centres, rights, widths, right_marks, left_marks = [], [], [], [], []
    for s in s_values:
        wp = carla_map.get_waypoint_xodr(section.road_id, lane_id, float(s))
        if wp is None:
            continue
        loc, right = wp.transform.location, wp.transform.get_right_vector()
        if not all(math.isfinite(v) for v in (loc.x, loc.y, loc.z, right.x, right.y)):
            continue  # a geometry Carla cannot evaluate here; the polyline bridges the gap
        centres.append((loc.x, loc.y, loc.z))
        rights.append((right.x, right.y, right.z))
        widths.append(wp.lane_width)
        right_marks.append(wp.right_lane_marking.type.name)
        left_marks.append(wp.left_lane_marking.type.name)
    if len(centres) < 2:
        return None
    return np.array(centres), np.array(rights), np.array(widths), right_marks, left_marks


def _segments(points: np.ndarray, kinds: np.ndarray):
    """Segments of a polyline (n, 3) whose start sample has a drawn kind: starts, ends, kinds."""
    keep = kinds[:-1] >= 0
    return points[:-1][keep], points[1:][keep], kinds[:-1][keep]


def crosswalk_polygons(carla_map) -> list[np.ndarray]:
    """Crosswalk outlines, our world frame, each a closed (m + 1, 3) polygon.

    Carla returns all corners of all crosswalks in one list, each polygon closed by repeating
    its first corner (its towns' outlines are written that way); an outline whose corners never
    return to the first is closed here.
    """
    points = np.array([(p.x, p.y, p.z) for p in carla_map.get_crosswalks()], dtype=np.float64).reshape(-1, 3)
    polygons, start = [], 0
    for i in range(1, len(points)):
        if i > start + 1 and np.linalg.norm(points[i] - points[start]) <= CLOSED_TOL_M:
            polygons.append(points[start : i + 1])
            start = i + 1
    if len(points) - start >= 3:  # corners left that never closed: one more polygon
        polygons.append(np.concatenate([points[start:], points[start : start + 1]]))
    return [from_carla_points(p) for p in polygons]


def extract_map(carla_map, step: float = 1.0) -> MapGeometry:
    """All lane lines, road edges and crosswalks of a town (`carla.Map`), our world frame.

    step: m between samples along each lane (the reference samples every 1.0 m).
    """
    if not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"world.map_step={step!r} must be a positive number of metres")
    starts, ends, kinds = [], [], []
    for section in lane_sections(carla_map.to_opendrive()):
        for lane_id, lane_type in section.lanes.items():
            if lane_type not in DRIVABLE_LANE_TYPES:
                continue
            sampled = _sample_lane(carla_map, section, lane_id, float(step))
            if sampled is None:
                continue
            centres, rights, widths, right_marks, left_marks = sampled
            half = (widths / 2.0)[:, None] * rights  # (n, 3) from the centre to the right border
            for outer, border, marks in ((True, centres + half, right_marks), (False, centres - half, left_marks)):
                border_kinds = _border_kinds(section, lane_id, marks, outer)
                if border_kinds is not None:
                    a, b, k = _segments(from_carla_points(border), border_kinds)
                    starts.append(a)
                    ends.append(b)
                    kinds.append(k)
    for polygon in crosswalk_polygons(carla_map):
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
