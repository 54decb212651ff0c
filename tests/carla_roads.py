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
