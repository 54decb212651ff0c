"""An OpenDRIVE file as a map of the embedded world: `world=embedded world.map=path/to/Town01.xodr`.

Carla's Python client builds the road network offline (`carla.Map(name, xodr)`: lanes, their
successors through junctions, lane changes), no server needed. Its driving lanes become a
`dwm.world.lane_network.LaneNetwork` on which the embedded world's traffic (IDM, MOBIL where the
marking allows), egos and junction controller run as on the built-in maps; its lines and
crosswalks are the Carla world's own extraction (`dwm.world.carla_map`).

Frames: Carla's x and y are highway-env's (y to the right seen from above, headings clockwise),
so waypoints are used as they come; `dwm.world.maps.to_world_xy` lifts both to the world frame.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from dwm.world.carla_map import extract_map
from dwm.world.carla_town import DEFAULT_DESCRIPTION, town_from_file
from dwm.world.lane_network import LaneNetwork, PolylineLane
from dwm.world.maps import MapSpec, SpawnArea
from dwm.world.traffic_road import Junction

log = logging.getLogger(__name__)

SAMPLE_M = 1.0  # lanes are sampled every metre along Carla's waypoints
SIMPLIFY_M = 0.02  # then thinned: no point is dropped that moves the line more than this
SPAWN_END_M = 5.0  # nothing spawns closer than this to a lane's ends
CRUISE_SPEED = (8.0, 12.0)  # m/s: the traffic's target speeds on a town's streets (29-43 km/h)
STOP_LINE_SETBACK_M = 1.5  # m before a junction's first lane: where cars wait
MAP_STEP_M = 1.0  # m between samples of the drawn lines
_NO_CHANGE_MARKS = {"Solid", "SolidSolid"}  # markings no car crosses, whatever the file allows


def _key(wp) -> tuple[int, int, int]:
    return wp.road_id, wp.section_id, wp.lane_id


def _simplify(points: np.ndarray, tol: float) -> np.ndarray:
    """Rows of `points` (n, 2) kept by Ramer-Douglas-Peucker within `tol` m (first and last kept)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    stack = [(0, len(points) - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = points[i], points[j]
        ab = b - a
        rel = points[i + 1:j] - a
        norm = np.hypot(*ab)
        d = np.abs(ab[0] * rel[:, 1] - ab[1] * rel[:, 0]) / norm if norm > 1e-9 else np.hypot(rel[:, 0], rel[:, 1])
        k = int(np.argmax(d))
        if d[k] > tol:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return np.flatnonzero(keep)


class _Lane:
    """One driving lane sampled from Carla: centre points, headings, widths, junction, and per
    sample the lanes beside it a car may change into."""

    def __init__(self, start, carla):
        walk = [start, *start.next_until_lane_end(SAMPLE_M)]
        walk = [w for w in walk if _key(w) == _key(start)]
        self.key = _key(start)
        self.junction = start.is_junction
        xy = np.array([[w.transform.location.x, w.transform.location.y] for w in walk])
        step = np.hypot(*np.diff(xy, axis=0).T) if len(xy) > 1 else np.zeros(0)
        self.s = np.concatenate([[0.0], np.cumsum(step)])
        self.xy = xy
        self.headings = np.radians([w.transform.rotation.yaw for w in walk])
        self.widths = np.array([w.lane_width for w in walk])
        self.end = walk[-1]
        self.changes: dict[tuple, np.ndarray] = {}  # lane beside -> (k,) allowed at each sample
        for flag, side, marking in ((carla.LaneChange.Left, "get_left_lane", "left_lane_marking"),
                                    (carla.LaneChange.Right, "get_right_lane", "right_lane_marking")):
            for i, w in enumerate(walk):
                other = getattr(w, side)()
                if other is None or other.lane_type != carla.LaneType.Driving or other.lane_id * w.lane_id <= 0:
                    continue
                mark = getattr(w, marking)
                allowed = bool(w.lane_change & flag) and (mark is None or str(mark.type) not in _NO_CHANGE_MARKS)
                self.changes.setdefault(_key(other), np.zeros(len(walk), dtype=bool))[i] = allowed


class OpenDriveMap:
    """The embedded world's map built from the OpenDRIVE file at `path` (see the module)."""

    def __init__(self, path: str, key: str = "world.map"):
        try:
            import carla
        except ImportError:
            raise ValueError(f"{key}={path!r}: an OpenDRIVE map needs Carla's Python client, which builds the "
                             "map offline (no server): pip install carla") from None
        town = town_from_file(carla, path, key)
        self.path = path
        starts = {}
        for a, _ in town.get_topology():
            if a.lane_type == carla.LaneType.Driving:
                starts.setdefault(_key(a), a)
        lanes = {k: _Lane(wp, carla) for k, wp in sorted(starts.items())}
        lanes = {k: lane for k, lane in lanes.items() if len(lane.xy) >= 2 and lane.s[-1] > 0.1}
        if not lanes:
            raise ValueError(f"{key}={path!r}: the file has no driving lane to drive on")
        successors = {k: [] for k in lanes}
        for a, b in town.get_topology():
            if _key(a) in lanes and _key(b) in lanes and _key(b) != _key(a) and _key(b) not in successors[_key(a)]:
                successors[_key(a)].append(_key(b))
        self.network, self.index = self._network(lanes, successors)
        inside = frozenset(self.index[k][:2] for k, lane in lanes.items() if lane.junction)
        roads = [self.index[k][:2] for k, lane in lanes.items()
                 if not lane.junction and lane.s[-1] > 2 * SPAWN_END_M + 1.0]
        if not roads:
            raise ValueError(f"{key}={path!r}: no driving lane outside junctions is long enough to start on "
                             f"(at least {2 * SPAWN_END_M + 1.0:.0f} m)")
        areas = tuple(SpawnArea(a, b, SPAWN_END_M, self.network.get_lane((a, b, 0)).length - SPAWN_END_M)
                      for a, b in roads)
        self.spec = MapSpec(
            name=Path(path).name,
            env=None,
            build_method="",
            env_config={},
            description=DEFAULT_DESCRIPTION,
            cruise_speed=CRUISE_SPEED,
            traffic_areas=areas,
            entry_areas=areas,
            ego_areas=areas,
            junction=Junction(inside, "box", setback_m=STOP_LINE_SETBACK_M) if inside else None,
            network=self.network,
            geometry=extract_map(town, MAP_STEP_M),
            random_routes=True,
        )

    @staticmethod
    def _network(lanes: dict, successors: dict) -> tuple[LaneNetwork, dict]:
        """Every lane a road from its start node to its end node; a lane's end node is the start
        node of each lane it leads to (union-find over the links)."""
        keys = list(lanes)
        parent = list(range(2 * len(keys)))  # node 2i: start of lane i; 2i + 1: its end

        def root(n: int) -> int:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        row = {k: i for i, k in enumerate(keys)}
        for k, nexts in successors.items():
            for n in nexts:
                a, b = root(2 * row[k] + 1), root(2 * row[n])
                parent[max(a, b)] = min(a, b)
        network = LaneNetwork()
        index = {}
        for k, lane in lanes.items():
            i = row[k]
            a, b = f"n{root(2 * i)}", f"n{root(2 * i + 1)}"
            kept = _simplify(lane.xy, SIMPLIFY_M)
            geometry = PolylineLane(lane.xy[kept], lane.headings[kept], lane.widths[kept])
            index[k] = (a, b, len(network.graph.get(a, {}).get(b, [])))
            network.add_lane(a, b, geometry)
        for k, lane in lanes.items():
            sides = {}
            for other, allowed in lane.changes.items():
                if other in index:
                    # The sample's s along the lane, where the allowed part starts or ends.
                    sides[index[other]] = (lane.s, allowed)
            if sides:
                network.sides[index[k]] = sides
        network.index_lanes()
        return network, index


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, key: str) -> OpenDriveMap:
    return OpenDriveMap(path, key)


def opendrive_map(path: str, key: str = "world.map") -> OpenDriveMap:
    """The map of the OpenDRIVE file at `path`, built once per process (and again when the file
    changes). ValueError naming `key` for a missing file or one Carla refuses."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{key}={path!r}: no such file (give the path of an OpenDRIVE .xodr file, or one of "
                         "the built-in maps: highway, merge, roundabout, intersection)")
    return _load(str(p.resolve()), p.stat().st_mtime_ns, key)


def is_opendrive_path(name: str) -> bool:
    """`name` names a file, not a built-in map: it ends in .xodr or has a directory part."""
    return isinstance(name, str) and (name.lower().endswith(".xodr") or "/" in name or "\\" in name)
