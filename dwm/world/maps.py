"""Maps of the embedded world: highway-env's own road networks, where traffic enters and leaves
them, and their lane lines, road edges and crosswalks lifted into the world frame.

highway-env works in a screen frame: its y grows downwards, so driving along +x a higher lane
index lies to the driver's right. The world frame (`dwm.world.base`) is right-handed, x forward,
y left, z up. `to_world_xy` and `to_world_yaw` are the one place where the two frames meet: y and
the heading change sign. Flipping y keeps the picture (a roundabout that turns counter-clockwise
on highway-env's screen turns counter-clockwise seen from above in the world).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from highway_env.envs.highway_env import HighwayEnv
from highway_env.envs.intersection_env import IntersectionEnv
from highway_env.envs.merge_env import MergeEnv
from highway_env.envs.roundabout_env import RoundaboutGenericEnv
from highway_env.road.lane import AbstractLane, LineType, StraightLane
from highway_env.road.road import RoadNetwork

from dwm.world.base import MapKind
from dwm.world.map_geometry import MapGeometry
from dwm.world.traffic_road import Junction, TrafficRoad

CURVE_STEP_M = 1.0  # curved lanes are sampled about every metre
STRAIGHT_STEP_M = 5.0  # straight lines are cut into short pieces so that culling can keep them
SHARED_LINE_TOL_M = 0.3  # a line within this of one already drawn is the same painted line
CROSSWALK_WIDTH_M = 4.0  # along the road
CROSSWALK_GAP_M = 1.0  # between the crosswalk and the junction


def to_world_xy(xy: np.ndarray) -> np.ndarray:
    """highway-env positions (..., 2) -> world positions (..., 2), metres (y flips sign)."""
    xy = np.asarray(xy, dtype=np.float64)
    return np.stack([xy[..., 0], -xy[..., 1]], axis=-1)


def to_world_yaw(heading: float | np.ndarray) -> float | np.ndarray:
    """highway-env heading (rad, clockwise on its screen) -> world yaw (rad about +z), in (-pi, pi]."""
    yaw = -np.asarray(heading, dtype=np.float64)
    wrapped = np.pi - np.mod(np.pi - yaw, 2.0 * np.pi)
    return float(wrapped) if wrapped.ndim == 0 else wrapped


@dataclass(frozen=True)
class SpawnArea:
    """Where vehicles may be placed: any lane of the road `from_node -> to_node`, between
    `s_min` and `s_max` metres along the lane (clipped to the lane's length)."""

    from_node: str
    to_node: str
    s_min: float
    s_max: float


@dataclass(frozen=True)
class MapSpec:
    """One map: the highway-env env whose road it reuses and how traffic lives on it."""

    name: str
    env: type  # highway-env env class; its road construction builds the network
    build_method: str  # the env's method that builds `self.road`
    env_config: dict  # changes to the env's default config
    description: str  # default scene description for captions
    cruise_speed: tuple[float, float]  # m/s, range of the traffic's target speeds
    traffic_areas: tuple[SpawnArea, ...]  # where the first traffic is placed
    entry_areas: tuple[SpawnArea, ...]  # where traffic that left the map comes back
    ego_areas: tuple[SpawnArea, ...]  # where egos are spawned
    destinations: tuple[str, ...] = ()  # route targets (nodes); empty: follow the road
    # Roads whose end leaves the map; None: roads ending at a node that leads nowhere.
    exit_roads: tuple[tuple[str, str], ...] | None = None
    # A straight road that is translated back as a whole when the egos near its end, so that
    # driving on it never ends (highway).
    endless: bool = False
    junction: Junction | None = None  # how traffic is let into the junction
    # Car following across road ends (`TrafficRoad`). Off where an exit road ends at the start
    # of the incoming road beside it (the intersection): cars just arrived on the incoming road
    # would count as leaders of the cars leaving.
    connected_lanes: bool = True
    crosswalk_roads: tuple[tuple[str, str], ...] = ()  # approaches that get a zebra crossing
    # A map from a file (`dwm.world.opendrive_map`): its road network (shared, never changed by
    # a world) and its drawn lines, instead of an env's road and `map_geometry`.
    network: RoadNetwork | None = None
    geometry: MapGeometry | None = None
    # Routes are drawn a few lanes ahead at random as cars go (no destinations on a town).
    random_routes: bool = False


def _areas(roads, s_min: float, s_max: float) -> tuple[SpawnArea, ...]:
    return tuple(SpawnArea(a, b, s_min, s_max) for a, b in roads)


_ROUNDABOUT_ENTRIES = (("ser", "ses"), ("eer", "ees"), ("ner", "nes"), ("wer", "wes"))
_ROUNDABOUT_NODES = ("se", "ex", "ee", "nx", "ne", "wx", "we", "sx")
_ROUNDABOUT_RING = tuple(zip(_ROUNDABOUT_NODES, _ROUNDABOUT_NODES[1:] + _ROUNDABOUT_NODES[:1]))
_INTERSECTION_ENTRIES = tuple((f"o{k}", f"ir{k}") for k in range(4))
_INTERSECTION_INSIDE = tuple((f"ir{a}", f"il{b}") for a in range(4) for b in range(4) if a != b)

MAPS: dict[str, MapSpec] = {
    "highway": MapSpec(
        name="highway",
        env=HighwayEnv,
        build_method="_create_road",  # 4 straight lanes, 10 km, 30 m/s
        env_config={},
        description="A multi-lane highway with guard rails and green fields on both sides.",
        cruise_speed=(22.0, 29.0),
        traffic_areas=_areas([("0", "1")], 300.0, 700.0),
        entry_areas=(),  # endless: traffic re-enters around the egos instead
        ego_areas=_areas([("0", "1")], 450.0, 550.0),
        endless=True,
    ),
    "merge": MapSpec(
        name="merge",
        env=MergeEnv,
        build_method="_make_road",
        env_config={},
        description="A highway with an on-ramp joining from the right, guard rails and open fields.",
        cruise_speed=(17.0, 20.0),  # the env's lanes are limited to 20 m/s
        traffic_areas=_areas([("a", "b"), ("b", "c"), ("c", "d"), ("j", "k")], 0.0, 220.0),
        entry_areas=_areas([("a", "b"), ("j", "k")], 0.0, 30.0),
        ego_areas=_areas([("a", "b")], 20.0, 60.0),
    ),
    "roundabout": MapSpec(
        name="roundabout",
        env=RoundaboutGenericEnv,
        build_method="_make_road",
        # One lane on the ring: highway-env's drivers cannot cross the outer lane to exit.
        env_config={"roundabout_lanes": 1},
        description="A suburban roundabout with a grassy central island, trees and low houses around.",
        cruise_speed=(9.0, 13.0),
        traffic_areas=_areas([*_ROUNDABOUT_RING, *_ROUNDABOUT_ENTRIES], 3.0, 80.0),
        entry_areas=_areas(_ROUNDABOUT_ENTRIES, 0.0, 30.0),
        ego_areas=_areas(_ROUNDABOUT_ENTRIES, 40.0, 75.0),
        destinations=("exr", "sxr", "nxr", "wxr"),
        junction=Junction(frozenset(_ROUNDABOUT_RING), "ring", setback_m=5.0),
    ),
    "intersection": MapSpec(
        name="intersection",
        env=IntersectionEnv,
        build_method="_make_road",
        env_config={},
        description=(
            "A four-way urban intersection with zebra crossings, sidewalks, shops and apartment buildings."
        ),
        cruise_speed=(7.0, 10.0),
        traffic_areas=_areas(_INTERSECTION_ENTRIES, 0.0, 85.0),
        entry_areas=_areas(_INTERSECTION_ENTRIES, 0.0, 30.0),
        ego_areas=_areas(_INTERSECTION_ENTRIES, 40.0, 70.0),
        destinations=tuple(f"o{k}" for k in range(4)),
        exit_roads=tuple((f"il{k}", f"o{k}") for k in range(4)),
        junction=Junction(frozenset(_INTERSECTION_INSIDE), "box"),
        connected_lanes=False,
        crosswalk_roads=_INTERSECTION_ENTRIES,
    ),
}


def map_spec(name: str) -> MapSpec:
    """The map called `name`, or the map of the OpenDRIVE file at path `name` (a name ending in
    .xodr or with a directory part); ValueError naming the allowed maps otherwise."""
    from dwm.world.opendrive_map import is_opendrive_path, opendrive_map  # it builds on this module

    if is_opendrive_path(name):
        return opendrive_map(name).spec
    if name not in MAPS:
        raise ValueError(f"unknown map {name!r}; allowed maps: {', '.join(MAPS)}, or the path of an OpenDRIVE "
                         "file (.xodr)")
    return MAPS[name]


def build_road(spec: MapSpec, np_random: np.random.Generator, dt: float) -> TrafficRoad:
    """A fresh road (no vehicles) on the map's network, or on the network built by the env's
    own road construction."""
    if spec.network is not None:
        return TrafficRoad(spec.network, np_random, dt, spec.junction, spec.connected_lanes)
    # The env methods only read `config` and `np_random` and set `road`.
    config = {**spec.env.default_config(), **spec.env_config}
    env_like = SimpleNamespace(config=config, np_random=np_random)
    getattr(spec.env, spec.build_method)(env_like)
    # The env's road objects (the merge's obstacle at the end of the on-ramp) are left out: a
    # user cannot see them (no box category), and the ramp's traffic merges on its own.
    return TrafficRoad(env_like.road.network, np_random, dt, spec.junction, spec.connected_lanes)


def exit_roads(spec: MapSpec, network: RoadNetwork) -> set[tuple[str, str]]:
    """Roads whose end leaves the map."""
    if spec.exit_roads is not None:
        return set(spec.exit_roads)
    return {(a, b) for a, tos in network.graph.items() for b in tos if b not in network.graph}


def _line_kind(line_type: int) -> MapKind | None:
    if line_type == LineType.STRIPED:
        return MapKind.LANE_LINE
    if line_type in (LineType.CONTINUOUS, LineType.CONTINUOUS_LINE):
        return MapKind.ROAD_EDGE
    return None  # LineType.NONE: nothing painted


def _side_polyline(lane: AbstractLane, side: int) -> np.ndarray:
    """Points (n, 2), highway-env frame, along one side of a lane (side 0 at -width/2)."""
    straight = type(lane) is StraightLane  # SineLane derives from StraightLane but curves
    step = STRAIGHT_STEP_M if straight else CURVE_STEP_M
    n = max(1, math.ceil(lane.length / step))
    s = np.linspace(0.0, lane.length, n + 1)
    return np.array([lane.position(si, (side - 0.5) * lane.width_at(si)) for si in s])


def road_surface(network: RoadNetwork) -> np.ndarray:
    """The drivable surface of a road network as ground quads (Q, 4, 3), world frame, m:
    every lane cut along its length (every metre on curves, every 5 m on straights) into
    quads between its two sides, corners in a cycle (left start, left end, right end, right
    start). Lanes that overlap (in a junction) give overlapping quads."""
    quads = []
    for lane in network.lanes_list():
        right, left = _side_polyline(lane, 0), _side_polyline(lane, 1)
        quads.append(np.stack([left[:-1], left[1:], right[1:], right[:-1]], axis=1))
    xy = to_world_xy(np.concatenate(quads)) if quads else np.zeros((0, 4, 2))
    return np.concatenate([xy, np.zeros(xy.shape[:2] + (1,))], axis=-1)


def _point_segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (P,) from each of points (P, 2) to the nearest of the segments a -> b (M, 2)."""
    ab = b - a  # (M, 2)
    ap = points[:, None, :] - a[None]  # (P, M, 2)
    t = np.clip(np.sum(ap * ab, axis=-1) / np.maximum(np.sum(ab * ab, axis=-1), 1e-12), 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.sqrt(np.min(np.sum((points[:, None, :] - closest) ** 2, axis=-1), axis=1))


def _new_segments(points: np.ndarray, kept_a: np.ndarray, kept_b: np.ndarray) -> np.ndarray:
    """Mask (n-1,) of the segments of polyline points (n, 2) that no kept segment already draws."""
    a, b = points[:-1], points[1:]
    keep = np.ones(len(a), dtype=bool)
    if len(kept_a) == 0:
        return keep
    lo, hi = points.min(axis=0) - 1.0, points.max(axis=0) + 1.0
    near = np.all((np.minimum(kept_a, kept_b) <= hi) & (np.maximum(kept_a, kept_b) >= lo), axis=1)
    if not near.any():
        return keep
    probes = np.concatenate([a, (a + b) / 2, b])  # (3(n-1), 2): both ends and the middle
    d = _point_segment_distance(probes, kept_a[near], kept_b[near]).reshape(3, -1)
    return ~np.all(d <= SHARED_LINE_TOL_M, axis=0)


def _crosswalk_outline(lane: AbstractLane) -> np.ndarray:
    """Closed outline (5, 2), highway-env frame, of a crosswalk across the two-way road of an
    incoming `lane`, just before the junction: from its right edge to the far edge of the
    opposite lane."""
    w = lane.width_at(lane.length)
    s1 = lane.length - CROSSWALK_GAP_M
    s0 = s1 - CROSSWALK_WIDTH_M
    corners = [lane.position(s, t) for s, t in ((s0, 0.5 * w), (s1, 0.5 * w), (s1, -1.5 * w), (s0, -1.5 * w))]
    return np.array(corners + corners[:1])


@functools.lru_cache(maxsize=None)
def map_geometry(name: str) -> MapGeometry:
    """Lane lines, road edges and crosswalks of a map, computed once per process."""
    spec = map_spec(name)
    network = build_road(spec, np.random.default_rng(0), dt=0.1).network
    # Road edges first, so that a lane line painted over an edge is dropped, not the edge.
    lines: list[tuple[MapKind, np.ndarray]] = []
    for lane in network.lanes_list():
        for side in (0, 1):
            kind = _line_kind(lane.line_types[side])
            if kind is not None:
                lines.append((kind, _side_polyline(lane, side)))
    lines.sort(key=lambda kl: kl[0] != MapKind.ROAD_EDGE)  # stable: keeps network order

    starts, ends, kinds = [], [], []
    kept_a, kept_b = np.zeros((0, 2)), np.zeros((0, 2))
    for kind, points in lines:
        keep = _new_segments(points, kept_a, kept_b)
        a, b = points[:-1][keep], points[1:][keep]
        kept_a, kept_b = np.concatenate([kept_a, a]), np.concatenate([kept_b, b])
        starts.append(a)
        ends.append(b)
        kinds.append(np.full(len(a), kind, dtype=np.int8))
    for road in spec.crosswalk_roads:
        outline = _crosswalk_outline(network.get_lane((*road, 0)))
        starts.append(outline[:-1])
        ends.append(outline[1:])
        kinds.append(np.full(len(outline) - 1, MapKind.CROSSWALK, dtype=np.int8))

    def lift(parts: list[np.ndarray]) -> np.ndarray:
        xy = to_world_xy(np.concatenate(parts))
        xyz = np.concatenate([xy, np.zeros((len(xy), 1))], axis=1)
        xyz.flags.writeable = False  # shared by every world of this map
        return xyz

    kind_codes = np.concatenate(kinds)
    kind_codes.flags.writeable = False
    return MapGeometry(lift(starts), lift(ends), kind_codes)
