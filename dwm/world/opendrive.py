"""What the map extraction reads from an OpenDRIVE file's text itself: the lane layout of every
road (lane sections, lane types, junction roads), lane offsets, and crosswalk objects.

No geometry is evaluated here (Carla's `carla.Map` does that, as the server does); this is the
part of the file Carla does not give back, or gives back lossily: it keeps only
`<outline>`/`<cornerLocal>` crosswalks and reads road ids as numbers.

Road ids are strings (OpenDRIVE 1.6 allows any, e.g. `id="Kalle"`); `carla_road_id` is the
number Carla gives the same road. Lane ids are integers in every OpenDRIVE version.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

UINT32_MAX = 2**32 - 1
_LEADING_NUMBER = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|[0-9]*)")


def carla_road_id(road_id: str) -> int:
    """The id Carla gives a road whose OpenDRIVE id is `road_id`: Carla reads it as an unsigned
    32-bit number the way its XML parser does (leading digits, or a 0x number; none: 0; past
    the range: the largest). Two roads whose ids read as the same number are one road to Carla."""
    sign, digits = _LEADING_NUMBER.match(road_id).groups()
    if not digits or sign == "-":
        return 0
    value = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits)
    return min(value, UINT32_MAX)


@dataclass(frozen=True)
class LaneSection:
    """One lane section of a road: s range (m) and lane id -> lane type (lower case)."""

    road_id: str  # as written in the file
    carla_id: int  # the road's id in Carla (`carla_road_id`)
    in_junction: bool
    s_start: float
    s_end: float
    lanes: dict[int, str]


@dataclass(frozen=True)
class CrosswalkOutline:
    """One outline of a crosswalk object, its corners as written.

    kind "local": corners (k, 3) are (u, v, z) m in the object's frame (origin at the road's
    (s, t), turned by the road's heading + hdg); kind "road": corners (k, 3) are (s, t, dz) in
    road coordinates. s, t, hdg, z_offset: the object's placement on road `road_id`. k >= 3: a
    polygon; k = 2: a painted strip along a line (`strip_width`, `strip_side`).
    """

    road_id: str
    s: float
    t: float
    hdg: float
    z_offset: float
    kind: str
    corners: np.ndarray
    # An outline of two corners is a line the crosswalk's marking is painted along: its width
    # (m) and side ("left" / "right" of the line from the first corner to the second, or
    # "both": centred); 0 when the file gives none.
    strip_width: float = 0.0
    strip_side: str = "both"


@dataclass(frozen=True)
class OpenDrive:
    """The parts of one OpenDRIVE text the extraction reads (see the module docstring)."""

    sections: list[LaneSection]
    lane_offsets: dict[str, np.ndarray]  # road id -> (k, 5) rows (s, a, b, c, d), by s
    crosswalks: list[CrosswalkOutline]
    lht_roads: frozenset[str]  # roads with rule="LHT" (left-hand traffic)
    road_starts: dict[str, tuple[float, float]]  # road id -> (x, y) m where its reference line starts

    @classmethod
    def parse(cls, xodr: str, name: str = "the town") -> OpenDrive:
        try:
            root = ET.fromstring(xodr)
        except ET.ParseError as err:
            raise ValueError(f"the OpenDRIVE of {name} cannot be parsed: {err}") from None
        sections, offsets, crosswalks, lht, starts = [], {}, [], set(), {}
        for road in root.iter("road"):
            road_id = road.get("id", "")
            first = road.find("planView/geometry")
            if first is not None:
                starts[road_id] = (_num(first, "x"), _num(first, "y"))
            if road.get("rule", "RHT").upper() == "LHT":
                lht.add(road_id)
            sections += _sections(road, road_id)
            rows = [[_num(o, "s"), _num(o, "a"), _num(o, "b"), _num(o, "c"), _num(o, "d")]
                    for o in road.findall("lanes/laneOffset")]
            if rows:
                offsets[road_id] = np.array(sorted(rows), dtype=np.float64)
            crosswalks += _crosswalks(road, road_id)
        return cls(sections, offsets, crosswalks, frozenset(lht), starts)

    def lane_offset(self, road_id: str, s: float) -> float:
        """m the lanes are shifted left of the reference line at `s` (OpenDRIVE laneOffset)."""
        rows = self.lane_offsets.get(road_id)
        if rows is None:
            return 0.0
        k = max(int(np.searchsorted(rows[:, 0], s, side="right")) - 1, 0)
        s0, a, b, c, d = rows[k]
        ds = s - s0
        return float(a + b * ds + c * ds**2 + d * ds**3)

    def section_at(self, road_id: str, s: float) -> LaneSection | None:
        """The lane section of road `road_id` that holds `s` (the last one for s past its end)."""
        found = None
        for section in self.sections:
            if section.road_id == road_id and section.s_start <= s + 1e-9:
                found = section
        return found


def _num(element: ET.Element, key: str, default: float = 0.0) -> float:
    try:
        return float(element.get(key, default))
    except ValueError:
        return default


def _lane_id(text: str | None) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def _sections(road: ET.Element, road_id: str) -> list[LaneSection]:
    length = _num(road, "length")
    in_junction = road.get("junction", "-1").strip() not in ("-1", "")
    xml_sections = road.findall("lanes/laneSection")
    starts = [_num(s, "s") for s in xml_sections]
    out = []
    for i, section in enumerate(xml_sections):
        end = starts[i + 1] if i + 1 < len(starts) else length
        lanes = {}
        for side in ("left", "right"):
            for lane in section.findall(f"{side}/lane"):
                lane_id = _lane_id(lane.get("id"))
                if lane_id is not None and lane_id != 0:
                    lanes[lane_id] = lane.get("type", "none").lower()
        out.append(LaneSection(road_id, carla_road_id(road_id), in_junction, starts[i], end, lanes))
    return out


def _crosswalks(road: ET.Element, road_id: str) -> list[CrosswalkOutline]:
    """Every outline of every crosswalk object of a road: `<outline>` right under the object
    (OpenDRIVE 1.4) or under `<outlines>` (1.5+), corners `cornerLocal` or `cornerRoad`."""
    out = []
    for obj in road.findall("objects/object"):
        if obj.get("type", "").lower() != "crosswalk":
            continue
        placement = (_num(obj, "s"), _num(obj, "t"), _num(obj, "hdg"), _num(obj, "zOffset"))
        marking = obj.find("markings/marking")
        strip = (0.0, "both") if marking is None else (_num(marking, "width"), marking.get("side", "both").lower())
        for outline in [*obj.findall("outline"), *obj.findall("outlines/outline")]:
            local = [(_num(c, "u"), _num(c, "v"), _num(c, "z")) for c in outline.findall("cornerLocal")]
            on_road = [(_num(c, "s"), _num(c, "t"), _num(c, "dz")) for c in outline.findall("cornerRoad")]
            for kind, corners in (("local", local), ("road", on_road)):
                if len(corners) >= 3 or (len(corners) == 2 and strip[0] > 0):
                    out.append(CrosswalkOutline(road_id, *placement, kind, np.array(corners, dtype=np.float64), *strip))
    return out
