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
SIMPLIFY_M = 0.02  # then thinned: no point is dropped that moves the line (or the width) more than this
SPAWN_END_M = 5.0  # nothing spawns closer than this to a lane's ends
CRUISE_SPEED = (8.0, 12.0)  # m/s: the traffic's target speeds on a town's streets (29-43 km/h)
STOP_LINE_SETBACK_M = 1.5  # m before a junction's first lane: where cars wait
MAP_STEP_M = 1.0  # m between samples of the drawn lines
_NO_CHANGE_MARKS = {"Solid", "SolidSolid"}  # markings no car crosses, whatever the file allows


def _key(wp) -> tuple[int, int, int]:
    return wp.road_id, wp.section_id, wp.lane_id


def _simplify(points: np.ndarray, tol: float) -> np.ndarray:
    """Rows of `points` (n, d) kept by Ramer-Douglas-Peucker within `tol` (first and last kept):
    no dropped point is farther than `tol` from the line between the kept ones around it."""
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
        norm2 = float(ab @ ab)
        t = np.clip(rel @ ab / norm2, 0.0, 1.0) if norm2 > 1e-18 else np.zeros(len(rel))
        d = np.linalg.norm(rel - t[:, None] * ab, axis=1)
        k = int(np.argmax(d))
        if d[k] > tol:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return np.flatnonzero(keep)


def _tangents(xy: np.ndarray, yaws: np.ndarray) -> np.ndarray:
    """Headings (n,) rad of a lane's centre line through points xy (n, 2): the mean direction
    of the two steps at each point (one at the ends). Carla's waypoint yaw is its road's
    heading, which is not the lane's where the lane shifts sideways (a lane beside it widens
    or narrows); it is kept only where the points are too close to tell."""
    steps = np.diff(xy, axis=0)
    lengths = np.hypot(steps[:, 0], steps[:, 1])
    unit = np.divide(steps, lengths[:, None], out=np.zeros_like(steps), where=lengths[:, None] > 1e-3)
    ahead = np.concatenate([unit, unit[-1:]])
    behind = np.concatenate([unit[:1], unit])
    mean = ahead + behind
    norm = np.hypot(mean[:, 0], mean[:, 1])
    return np.where(norm > 1e-3, np.arctan2(mean[:, 1], mean[:, 0]), yaws)


def _gap(a, b) -> float:
    """Distance (m) between two waypoints."""
    return a.transform.location.distance(b.transform.location)


def _ordered(waypoints: list) -> list:
    """Waypoints of one lane in its driving direction (by s, and against s where the lane's
    heading says the lane runs against its road's reference line; a closed loop too)."""
    walk = sorted(waypoints, key=lambda w: w.s)
    if len(walk) >= 2:  # the first step by s goes along the first waypoint's heading, or not
        a, b = walk[0].transform, walk[1].transform
        forward = a.get_forward_vector()
        if (b.location.x - a.location.x) * forward.x + (b.location.y - a.location.y) * forward.y < 0.0:
            walk.reverse()
    return walk


class _Lane:
    """One driving lane sampled from Carla: centre points, headings, widths, junction, and per
    sample the lanes beside it a car may change into."""

    def __init__(self, walk: list, carla):
        start = walk[0]
        self.key = _key(start)
        self.junction = start.is_junction
        xy = np.array([[w.transform.location.x, w.transform.location.y] for w in walk])
        step = np.hypot(*np.diff(xy, axis=0).T) if len(xy) > 1 else np.zeros(0)
        self.s = np.concatenate([[0.0], np.cumsum(step)])
        # One line, driven one way: no jump between samples, no NaN (geometry Carla cannot evaluate).
        self.continuous = bool(np.all(np.isfinite(xy)) and np.all(step <= 2.5 * SAMPLE_M))
        self.xy = xy
        self.headings = _tangents(xy, np.radians([w.transform.rotation.yaw for w in walk]))
        self.widths = np.array([w.lane_width for w in walk])
        self.changes: dict[tuple, np.ndarray] = {}  # lane beside -> (k,) allowed at each sample
        for flag, side, marking in ((carla.LaneChange.Left, "get_left_lane", "left_lane_marking"),
                                    (carla.LaneChange.Right, "get_right_lane", "right_lane_marking")):
            for i, w in enumerate(walk):
                if _key(w) != self.key:
                    continue  # the end point taken from the next lane
                other = getattr(w, side)()
                if other is None or other.lane_type != carla.LaneType.Driving or other.lane_id * w.lane_id <= 0:
                    continue
                mark = getattr(w, marking)
                allowed = bool(w.lane_change & flag) and (mark is None or str(mark.type) not in _NO_CHANGE_MARKS)
                self.changes.setdefault(_key(other), np.zeros(len(walk), dtype=bool))[i] = allowed

    def extend_to(self, other: _Lane) -> None:
        """Append `other`'s first point: where this lane really ends."""
        step = float(np.hypot(*(other.xy[0] - self.xy[-1])))
        self.xy = np.concatenate([self.xy, other.xy[:1]])
        self.s = np.concatenate([self.s, [self.s[-1] + step]])
        self.headings = np.concatenate([self.headings, other.headings[:1]])
        self.widths = np.concatenate([self.widths, other.widths[:1]])
        self.changes = {k: np.concatenate([v, v[-1:]]) for k, v in self.changes.items()}


LINK_GAP_M = 1.5 * SAMPLE_M  # a lane starting this close to where another ends, heading on, follows it
LINK_ANGLE = 0.5  # rad


def _link_by_place(lanes: dict, successors: dict) -> None:
    """Lanes Carla gives no successor although lanes start where they end, heading on (Carla
    leaves out the links of some junctions, e.g. connections written at a connecting road's
    end): those lanes become their successors."""
    keys = list(lanes)
    starts = np.array([lanes[k].xy[0] for k in keys])
    start_headings = np.array([lanes[k].headings[0] for k in keys])
    for k in keys:
        if successors[k]:
            continue
        lane = lanes[k]
        gap = np.hypot(*(starts - lane.xy[-1]).T)
        turn = np.abs(np.angle(np.exp(1j * (start_headings - lane.headings[-1]))))
        found = [i for i in np.flatnonzero((gap < LINK_GAP_M) & (turn < LINK_ANGLE)) if keys[i] != k]
        successors[k] += [keys[i] for i in found]
        if found and gap[found[0]] > 0.05:  # the lane's last sample fell short of its end
            lane.extend_to(lanes[keys[found[0]]])


class OpenDriveMap:
    """The embedded world's map built from the OpenDRIVE file at `path` (see the module)."""

    def __init__(self, path: str, key: str = "world.map"):
        try:
            import carla
        except ImportError:
            raise ValueError(f"{key}={path!r}: an OpenDRIVE map needs Carla's Python client, which builds the "
                             "map offline (no server): pip install carla") from None
        town = town_from_file(carla, path, key)
        # Lanes from the map's waypoints, every SAMPLE_M m, with each lane's exact start and end
        # from Carla's topology: (start of a lane, start of each lane it leads to), or (start,
        # end) for a lane that leads nowhere. Walking lanes with Carla's `next_until_lane_end` or
        # `previous_until_lane_start` fails on some files, or crashes the client.
        topology = [(a, b) for a, b in town.get_topology() if a.lane_type == carla.LaneType.Driving]
        samples: dict[tuple, list] = {}
        for wp in town.generate_waypoints(SAMPLE_M):
            if wp.lane_type == carla.LaneType.Driving:
                samples.setdefault(_key(wp), []).append(wp)
        first, last = {}, {}
        for a, b in topology:
            first.setdefault(_key(a), a)
            last.setdefault(_key(a), b)
        walks = {}
        for k, wps in samples.items():
            walk = _ordered(wps)
            if k in first and _gap(first[k], walk[0]) > 0.05:
                walk.insert(0, first[k])
            # The lane's end is where the lanes it leads to start, unless they start elsewhere
            # (a lane that narrows away "leads" to the lane beside it).
            if k in last and 0.05 < _gap(walk[-1], last[k]) <= 1.5 * SAMPLE_M:
                walk.append(last[k])
            walks[k] = walk
        lanes = {k: _Lane(walk, carla) for k, walk in sorted(walks.items()) if walk}
        broken = sorted(k for k, lane in lanes.items() if not lane.continuous)
        if broken:  # e.g. two roads whose ids Carla reads as one number
            log.warning("%s: the waypoints of %d lane(s) do not form one line (road, section, lane: %s); "
                        "no car drives on them", path, len(broken), ", ".join(map(str, broken[:8])))
        lanes = {k: lane for k, lane in lanes.items()
                 if lane.continuous and len(lane.xy) >= 2 and lane.s[-1] > 0.1}
        if not lanes:
            why = f" ({len(broken)} whose geometry Carla cannot place)" if broken else ""
            raise ValueError(f"{key}={path!r}: the file has no driving lane to drive on{why}")
        successors = {k: [] for k in lanes}
        for wa, wb in topology:
            a, b = _key(wa), _key(wb)
            # (start, its own start again): a lane that closes on itself (a ring road).
            loop = b == a and _gap(wa, wb) < 0.05 and lanes.get(a) is not None and lanes[a].s[-1] > 1.0
            if a in lanes and b in lanes and (b != a or loop) and b not in successors[a]:
                successors[a].append(b)
        _link_by_place(lanes, successors)
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
            # Thinned where neither the line nor the width moves by more than SIMPLIFY_M.
            kept = _simplify(np.column_stack([lane.xy, lane.widths]), SIMPLIFY_M)
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
