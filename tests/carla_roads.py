"""Small OpenDRIVE road networks for the Carla tests and benchmark, written with
scenariogeneration's OpenDRIVE generator and loaded with the real `carla.Map`.

Geometry in OpenDRIVE's own frame, which is ours (right-handed, x east, y north, metres);
Carla mirrors y when it loads a map.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from scenariogeneration import xodr

LANE_WIDTH = 3.5  # m
SIDEWALK_WIDTH = 2.0  # m


def _with_sidewalks(lanes: xodr.Lanes) -> xodr.Lanes:
    for section in lanes.lanesections:
        section.add_left_lane(xodr.Lane(lane_type=xodr.LaneType.sidewalk, a=SIDEWALK_WIDTH))
        section.add_right_lane(xodr.Lane(lane_type=xodr.LaneType.sidewalk, a=SIDEWALK_WIDTH))
    return lanes


def _text(odr: xodr.OpenDrive, crosswalks: dict[int, list[tuple[float, float, float, list]]] | None = None) -> str:
    """The OpenDRIVE text; crosswalks: road id -> [(s, t, hdg, [(u, v), ...])] written as Carla's
    towns write them (OpenDRIVE 1.4 `object/outline/cornerLocal`, the first corner repeated)."""
    root = odr.get_element()
    for road_id, items in (crosswalks or {}).items():
        road = next(r for r in root.iter("road") if r.get("id") == str(road_id))
        objects = road.find("objects") or ET.SubElement(road, "objects")
        for k, (s, t, hdg, corners) in enumerate(items):
            obj = ET.SubElement(objects, "object", id=f"{road_id}{k}", name="crosswalk", type="crosswalk",
                                s=str(s), t=str(t), zOffset="0", hdg=str(hdg), orientation="none")
            outline = ET.SubElement(obj, "outline")
            for u, v in [*corners, corners[0]]:
                ET.SubElement(outline, "cornerLocal", u=str(u), v=str(v), z="0", height="0")
    # The generator writes circular pieces of junction turns as spirals of constant curvature,
    # which Carla evaluates to NaN; the same curve written as an arc.
    for geometry in root.iter("geometry"):
        spiral = geometry.find("spiral")
        if spiral is not None and float(spiral.get("curvStart")) == float(spiral.get("curvEnd")):
            geometry.remove(spiral)
            ET.SubElement(geometry, "arc", curvature=spiral.get("curvStart"))
    return ET.tostring(root, encoding="unicode")


def straight_road(length: float = 100.0, sidewalks: bool = False, crosswalk_s: float | None = None) -> str:
    """One road along +x from the origin: lane 1 (left, y 0..3.5), lanes -1 and -2 (right,
    y 0..-7); optionally 2 m sidewalks beyond, and a 4 m crosswalk across at crosswalk_s."""
    road = xodr.create_road(xodr.Line(length), id=1, left_lanes=1, right_lanes=2, lane_width=LANE_WIDTH)
    if sidewalks:
        _with_sidewalks(road.lanes)
    odr = xodr.OpenDrive("straight")
    odr.add_road(road)
    odr.adjust_roads_and_lanes()
    crosswalks = None
    if crosswalk_s is not None:
        half = LANE_WIDTH * 2 + (SIDEWALK_WIDTH if sidewalks else 0.0)
        corners = [(-2.0, -half), (2.0, -half), (2.0, half - LANE_WIDTH), (-2.0, half - LANE_WIDTH)]
        crosswalks = {1: [(crosswalk_s, 0.0, 0.0, corners)]}
    return _text(odr, crosswalks)


def arc_road(radius: float = 50.0, angle: float = math.pi / 2) -> str:
    """A left-turning arc from the origin heading +x, reference line of `radius` m about
    (0, radius): one lane each side."""
    road = xodr.create_road(xodr.Arc(1.0 / radius, angle=angle), id=1, left_lanes=1, right_lanes=1, lane_width=LANE_WIDTH)
    odr = xodr.OpenDrive("arc")
    odr.add_road(road)
    odr.adjust_roads_and_lanes()
    return _text(odr)


def junction(arm: float = 60.0, radius: float = 12.0, sidewalks: bool = True, crosswalks: bool = True) -> str:
    """Four straight arms (one lane each way, sidewalks) meeting at a junction centred on the
    origin; each arm ends `radius` m from the centre, with a crosswalk across its end."""
    roads = [xodr.create_road(xodr.Line(arm), id=i + 1, left_lanes=1, right_lanes=1, lane_width=LANE_WIDTH) for i in range(4)]
    if sidewalks:
        for road in roads:
            _with_sidewalks(road.lanes)
    creator = xodr.CommonJunctionCreator(id=100, name="junction", startnum=100)
    for i, road in enumerate(roads):
        creator.add_incoming_road_circular_geometry(road, radius, i * math.pi / 2, "successor")
    for i in range(4):
        for j in range(i + 1, 4):
            creator.add_connection(i + 1, j + 1)
    odr = xodr.OpenDrive("junction")
    for road in roads:
        odr.add_road(road)
    odr.add_junction_creator(creator)
    odr.adjust_roads_and_lanes()
    walks = None
    if crosswalks:
        half = LANE_WIDTH + (SIDEWALK_WIDTH if sidewalks else 0.0)
        corners = [(-1.5, -half), (1.5, -half), (1.5, half), (-1.5, half)]
        walks = {i + 1: [(arm - 2.0, 0.0, 0.0, corners)] for i in range(4)}
    return _text(odr, walks)


def highway(length: float = 1000.0, lanes: int = 4, width: float = 4.0) -> str:
    """The embedded world's highway as OpenDRIVE: `lanes` lanes of `width` m driving along +x,
    lane k centred at y = -k * width (the reference line on the left border, y = width / 2)."""
    plan = xodr.PlanView(0.0, width / 2, 0.0)
    plan.add_geometry(xodr.Line(length))
    section = xodr.LaneSection(0, xodr.standard_lane(rm=xodr.std_roadmark_solid()))
    for k in range(lanes):
        mark = xodr.std_roadmark_broken() if k < lanes - 1 else xodr.std_roadmark_solid()
        section.add_right_lane(xodr.standard_lane(width, rm=mark))
    road_lanes = xodr.Lanes()
    road_lanes.add_lanesection(section)
    odr = xodr.OpenDrive("highway")
    odr.add_road(xodr.Road(1, plan, road_lanes))
    odr.adjust_roads_and_lanes()
    return _text(odr)


# ---------------------------------------------------------------------------- towns
# Road networks written as Carla's towns are: two-way roads between junctions, and inside each
# junction one single-lane connecting road per movement (incoming lane -> outgoing lane), linked
# by the junction's <connection>s. Written directly as XML so that every link is explicit.

_ARM_ANGLES = {"E": 0.0, "N": math.pi / 2, "W": math.pi, "S": 3 * math.pi / 2}


def _lane(parent: ET.Element, lane_id: int, width: float, mark: str, kind: str = "driving",
          links: tuple[int | None, int | None] = (None, None)) -> None:
    lane = ET.SubElement(parent, "lane", id=str(lane_id), type=kind, level="false")
    if any(k is not None for k in links):
        link = ET.SubElement(lane, "link")
        for tag, k in zip(("predecessor", "successor"), links):
            if k is not None:
                ET.SubElement(link, tag, id=str(k))
    ET.SubElement(lane, "width", sOffset="0", a=str(width), b="0", c="0", d="0")
    ET.SubElement(lane, "roadMark", sOffset="0", type=mark, weight="standard", color="standard", width="0.15")


def _road(root: ET.Element, road_id: int, x: float, y: float, hdg: float, length: float, rule: str,
          curvature: float = 0.0, junction: int = -1) -> ET.Element:
    road = ET.SubElement(root, "road", name=f"road {road_id}", id=str(road_id), length=f"{length:.6f}",
                         junction=str(junction), rule=rule)
    ET.SubElement(road, "link")
    plan = ET.SubElement(road, "planView")
    geometry = ET.SubElement(plan, "geometry", s="0", x=f"{x:.6f}", y=f"{y:.6f}", hdg=f"{hdg:.9f}",
                             length=f"{length:.6f}")
    if curvature:
        ET.SubElement(geometry, "arc", curvature=f"{curvature:.9f}")
    else:
        ET.SubElement(geometry, "line")
    return road


def _road_link(road: ET.Element, tag: str, kind: str, element: int, contact: str | None = None) -> None:
    attrs = {"elementType": kind, "elementId": str(element)}
    if contact:
        attrs["contactPoint"] = contact
    ET.SubElement(road.find("link"), tag, **attrs)


def _two_way_lanes(road: ET.Element, lanes: int, width: float) -> None:
    """`lanes` lanes each way, broken lines between lanes of one direction, solid in the middle
    and at the edges."""
    section = ET.SubElement(ET.SubElement(road, "lanes"), "laneSection", s="0")
    for side, sign in (("left", 1), ("right", -1)):
        part = ET.SubElement(section, side)
        for k in (range(lanes, 0, -1) if sign > 0 else range(1, lanes + 1)):
            _lane(part, sign * k, width, "solid" if k == lanes else "broken")
        if side == "left":
            centre = ET.SubElement(section, "center")
            ET.SubElement(ET.SubElement(centre, "lane", id="0", type="none", level="false"), "roadMark",
                          sOffset="0", type="solid", weight="standard", color="standard", width="0.15")


def town_grid(columns: int = 3, rows: int = 2, spacing: float = 60.0, lanes: int = 2, rule: str = "RHT",
              radius: float = 10.0, width: float = LANE_WIDTH) -> str:
    """A closed grid of `columns` x `rows` junctions `spacing` m apart (centres at (i, j) *
    spacing), joined by straight two-way roads of `lanes` lanes each way; no dead ends. Roads end
    `radius` m from a junction's centre. In each junction: every lane goes straight on; turns to
    the right from the outermost lane, to the left from the innermost (mirrored for LHT), each
    to the same lane of the road it turns into; no U-turns. Junctions at the border are T-junctions
    or corners (where every lane turns)."""
    if rule not in ("RHT", "LHT"):
        raise ValueError(rule)
    right = 1.0 if rule == "RHT" else -1.0  # which side of its heading a car drives on
    root = ET.Element("OpenDRIVE")
    ET.SubElement(root, "header", revMajor="1", revMinor="4", name="town grid", version="1",
                  north="0", south="0", east="0", west="0")
    centres = {(i, j): (i * spacing, j * spacing) for i in range(columns) for j in range(rows)}
    # Arms: road id -> (junction at its start, junction at its end, heading)
    roads: dict[int, tuple] = {}
    arms: dict[tuple, dict[str, tuple[int, str]]] = {key: {} for key in centres}  # junction -> arm -> (road, "start"|"end")
    next_id = 1
    for (i, j), (x, y) in centres.items():
        for di, dj, out_arm, in_arm in ((1, 0, "E", "W"), (0, 1, "N", "S")):
            other = (i + di, j + dj)
            if other not in centres:
                continue
            hdg = _ARM_ANGLES[out_arm]
            road = _road(root, next_id, x + radius * math.cos(hdg), y + radius * math.sin(hdg), hdg,
                         spacing - 2 * radius, rule)
            _two_way_lanes(road, lanes, width)
            roads[next_id] = ((i, j), other)
            arms[(i, j)][out_arm] = (next_id, "start")
            arms[other][in_arm] = (next_id, "end")
            next_id += 1
    junction_ids = {key: 1000 + n for n, key in enumerate(centres)}
    for road_id, (a, b) in roads.items():
        road = root.find(f"road[@id='{road_id}']")
        _road_link(road, "predecessor", "junction", junction_ids[a])
        _road_link(road, "successor", "junction", junction_ids[b])

    # Lane ids: along s drive the right lanes (RHT) or the left lanes (LHT).
    def lane_id(contact: str, k: int, into_junction: bool) -> int:
        along_s = (contact == "end") == into_junction  # a road ending here drives into it along s
        sign = -1 if along_s else 1
        return int(sign * right * (k + 1))

    connecting_id = 10000
    for key, (cx, cy) in centres.items():
        junction = ET.Element("junction", id=str(junction_ids[key]), name=f"junction {key}")
        for arm_in, (road_in, contact_in) in arms[key].items():
            heading = _ARM_ANGLES[arm_in] + math.pi  # driving into the junction
            for arm_out, (road_out, contact_out) in arms[key].items():
                if arm_out == arm_in:
                    continue
                turn = math.remainder(_ARM_ANGLES[arm_out] - heading, 2 * math.pi)  # 0, +-pi/2
                turn_side = 0 if abs(turn) < 0.1 else (1 if turn * right < 0 else -1)  # 1: to the driving side
                if turn_side == 0 or len(arms[key]) == 2:  # a corner: every lane turns
                    ks = range(lanes)
                else:
                    ks = [lanes - 1] if turn_side == 1 else [0]
                for k in ks:
                    # Reference line on the lane's inner border (towards the road's middle).
                    inner = k * width
                    px = cx - radius * math.cos(heading) + right * inner * math.sin(heading)
                    py = cy - radius * math.sin(heading) - right * inner * math.cos(heading)
                    if turn_side == 0:
                        length, curvature = 2 * radius, 0.0
                    else:
                        r = radius - inner if turn_side == 1 else radius + inner
                        length, curvature = r * math.pi / 2, math.copysign(1.0 / r, turn)
                    road = _road(root, connecting_id, px, py, heading, length, rule, curvature, junction_ids[key])
                    _road_link(road, "predecessor", "road", road_in, contact_in)
                    _road_link(road, "successor", "road", road_out, contact_out)
                    l_in = lane_id(contact_in, k, into_junction=True)
                    l_out = lane_id(contact_out, k, into_junction=False)
                    own = int(-right)  # the connecting road's one lane
                    section = ET.SubElement(ET.SubElement(road, "lanes"), "laneSection", s="0")
                    side_left = ET.SubElement(section, "left")
                    centre = ET.SubElement(section, "center")
                    ET.SubElement(centre, "lane", id="0", type="none", level="false")
                    side_right = ET.SubElement(section, "right")
                    _lane(side_right if own < 0 else side_left, own, width, "none", links=(l_in, l_out))
                    for part in (side_left, side_right):
                        if not len(part):
                            section.remove(part)
                    connection = ET.SubElement(junction, "connection", id=str(connecting_id - 10000),
                                               incomingRoad=str(road_in), connectingRoad=str(connecting_id),
                                               contactPoint="start")
                    ET.SubElement(connection, "laneLink", **{"from": str(l_in), "to": str(own)})
                    connecting_id += 1
        root.append(junction)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def ring_road(radius: float = 40.0, lanes: int = 2, width: float = LANE_WIDTH, lane_line: str = "broken") -> str:
    """A closed ring of two half-circle roads linked to each other (a curve with no end),
    centred on the origin, `lanes` lanes each way with `lane_line` marks between the lanes of
    one direction (broken: cars may change lanes; solid: they may not)."""
    root = ET.Element("OpenDRIVE")
    ET.SubElement(root, "header", revMajor="1", revMinor="4", name="ring", version="1",
                  north="0", south="0", east="0", west="0")
    for road_id, (x, y, hdg) in ((1, (radius, 0.0, math.pi / 2)), (2, (-radius, 0.0, -math.pi / 2))):
        road = _road(root, road_id, x, y, hdg, math.pi * radius, "RHT", curvature=1.0 / radius)
        other = 3 - road_id
        _road_link(road, "predecessor", "road", other, "end")
        _road_link(road, "successor", "road", other, "start")
        _two_way_lanes(road, lanes, width)
        for mark in road.iter("roadMark"):
            if mark.get("type") == "broken":
                mark.set("type", lane_line)
        for lane in road.iter("lane"):
            k = int(lane.get("id"))
            if k:
                link = ET.Element("link")
                ET.SubElement(link, "predecessor", id=str(k))
                ET.SubElement(link, "successor", id=str(k))
                lane.insert(0, link)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def narrowing_road(length: float = 300.0, narrow_from: float = 120.0, narrow_over: float = 50.0,
                   width: float = LANE_WIDTH) -> str:
    """A straight road along +x: two lanes in the direction of travel (lanes -1 and -2 under
    right-hand traffic) and one against it; from `narrow_from` m the outer lane -2 narrows to
    nothing over `narrow_over` m, and the road goes on with one lane each way. Broken line
    between -1 and -2; both ends of the road end the map."""
    root = ET.Element("OpenDRIVE")
    ET.SubElement(root, "header", revMajor="1", revMinor="4", name="narrowing", version="1",
                  north="0", south="0", east="0", west="0")
    road = _road(root, 1, 0.0, 0.0, 0.0, length, "RHT")
    lanes = ET.SubElement(road, "lanes")
    sections = ((0.0, 2, None), (narrow_from, 2, narrow_over), (narrow_from + narrow_over, 1, None))
    for k, (s0, right_lanes, narrowing) in enumerate(sections):
        section = ET.SubElement(lanes, "laneSection", s=str(s0))
        links = (k > 0 or None, k < len(sections) - 1 or None)
        left = ET.SubElement(section, "left")
        _lane(left, 1, width, "solid", links=tuple(1 if x else None for x in links))
        centre = ET.SubElement(section, "center")
        ET.SubElement(ET.SubElement(centre, "lane", id="0", type="none", level="false"), "roadMark",
                      sOffset="0", type="solid", weight="standard", color="standard", width="0.15")
        right = ET.SubElement(section, "right")
        for lane_id in range(1, right_lanes + 1):
            mark = "broken" if lane_id < right_lanes else "solid"
            pred = -lane_id if k > 0 else None
            succ = -lane_id if k < len(sections) - 1 and not (narrowing and lane_id == 2) else None
            _lane(right, -lane_id, width, mark, links=(pred, succ))
            if narrowing and lane_id == 2:
                w = right[-1].find("width")
                w.set("b", str(-width / narrowing))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")
