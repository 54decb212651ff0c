"""The road of the embedded world's traffic: highway-env's `Road` with a junction controller
(stop lines, first come first served) and lane lookups narrowed to a vehicle's surroundings.

highway-env's own `RegulatedRoad` clogs its junction over minutes; `TrafficRoad` lets vehicles
in so that it does not. Everything here is in highway-env's screen frame (y down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from highway_env.road.road import LaneIndex, Road, RoadNetwork
from highway_env.vehicle.controller import ControlledVehicle
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.lane_network import LaneNetwork, PolylineLane


@dataclass(frozen=True)
class Junction:
    """A junction of the network: the roads inside it and how vehicles are let in.

    kind "box" (a crossroads): a vehicle waiting at its stop line goes when no vehicle inside,
    or already let in, takes a path that crosses its own. kind "ring" (a roundabout): a vehicle
    at the yield line goes when the ring is clear around the point where it joins.
    """

    inside: frozenset[tuple[str, str]]
    kind: str  # "box" | "ring"
    setback_m: float = 0.0  # the stop line lies this far before the end of the road in


class TrafficRoad(Road):
    """highway-env's road with a junction controller.

    Vehicles on a road into the junction stop at its end (the stop or yield line) until the
    controller lets them in, first come first served among the waiting ones; inside, they
    never wait for the controller. highway-env's own `RegulatedRoad` re-decides who yields
    every half second from short predictions; over minutes it clogs its junction with
    vehicles that stopped inside it.
    """

    CROSSING_M = 4.5  # paths whose centre lines come closer cross (turning trucks sweep wide)
    STOP_DEC = 3.0  # m/s^2: a vehicle let in that could stop this gently still may be held
    RING_MARGIN_S = 1.0  # a vehicle on the ring passes this long after one joining has cleared
    RING_CLEAR_M = 9.0  # and this far from the joining point at least

    def __init__(
        self,
        network: RoadNetwork,
        np_random: np.random.Generator,
        dt: float,
        junction: Junction | None = None,
        connected_lanes: bool = True,
    ):
        # connected_lanes: look for leaders and followers on the next and previous road too
        # (highway-env >= 1.12), so that a lane change near a road's end sees the car behind.
        super().__init__(
            network=network, np_random=np_random, neighbour_vehicles_connected_lanes=connected_lanes
        )
        self.dt = dt
        self.junction = junction
        inside = junction.inside if junction else frozenset()
        starts = {a for a, _ in inside}
        # Roads into the junction; their end is the stop (or yield) line.
        self.approach_roads = {
            (a, b) for a, tos in network.graph.items() for b in tos if b in starts and (a, b) not in inside
        }
        self._crossing = self._crossing_paths(network, inside) if junction and junction.kind == "box" else {}
        # Lanes that end in a merge: their road goes on with fewer lanes (the on-ramp).
        self.ending_lanes = {
            (a, b, i)
            for a, tos in network.graph.items()
            for b, lanes in tos.items()
            for i in range(len(lanes))
            if b in network.graph and all(len(nxt) <= i for nxt in network.graph[b].values())
        }
        if isinstance(network, LaneNetwork):
            # A map's lane that leads nowhere or gets too narrow for a car, beside one that goes on.
            def goes_on(index: LaneIndex) -> bool:
                lane = network.get_lane(index)
                return bool(network.graph.get(index[1])) and lane.usable_length == lane.length

            self.ending_lanes = {
                index for index, sides in network.sides.items()
                if not goes_on(index) and any(goes_on(side) for side in sides)
            }
        # Keyed by the vehicles themselves (identity): an id() may be reused by a new vehicle.
        self._arrival: dict[Vehicle, float] = {}  # when each waiting vehicle reached its line
        self._let_in: set[Vehicle] = set()  # waiting vehicles let into the junction
        self._time = 0.0
        self._index_lanes(network)
        self.state = SimpleNamespace(
            vehicles=None,
            positions=np.zeros((0, 2)),
            widths=np.zeros(0),
            directions=np.zeros((0, 2)),
            ids=np.zeros(0, dtype=np.int64),
            merging_into={},
            on_lane={},
            candidates={},
            held=np.zeros(0, dtype=bool),
        )

    # -------------------------------------------------------------- lane lookups
    # highway-env searches every lane of the map for a vehicle's lane, and projects every vehicle
    # on the candidate lanes to find its leader: most of a tick's cost. Both searches are
    # narrowed here to the lanes around the vehicle's road.

    LANE_SLACK_M = 8.0  # highway-env's on-lane test: half a width + 1 m across, 5 m past the ends

    def _index_lanes(self, network: RoadNetwork) -> None:
        roads = [(a, b) for a, tos in network.graph.items() for b in tos]
        boxes = {}
        for a, b in roads:
            for i, lane in enumerate(network.graph[a][b]):
                pts = np.array([lane.position(s, 0.0) for s in np.linspace(0.0, lane.length, 17)])
                slack = self.LANE_SLACK_M
                boxes[(a, b, i)] = np.concatenate([pts.min(axis=0) - slack, pts.max(axis=0) + slack])
        into: dict[str, list[tuple[str, str]]] = {}  # node -> roads ending there, in network order
        for z, tos in network.graph.items():
            for a in tos:
                into.setdefault(a, []).append((z, a))
        self._around: dict[tuple[str, str], list[LaneIndex]] = {}
        for a, b in roads:
            after = [(b, c) for c in network.graph.get(b, {})]
            before = into.get(a, [])
            # Lanes a car may change into that are roads of their own (a map from a file).
            beside = [side[:2] for i in range(len(network.graph[a][b])) for side in network.side_lanes((a, b, i))]
            near_roads = list(dict.fromkeys([(a, b), *after, *before, *beside]))
            self._around[(a, b)] = [(x, y, i) for x, y in near_roads for i in range(len(network.graph[x][y]))]
        self._search_boxes = {road: np.array([boxes[k] for k in ks]) for road, ks in self._around.items()}
        # highway-env's connected lanes of each lane (its `neighbour_vehicles`), found once.
        self._connected: dict[LaneIndex, list[tuple]] = {}
        for a, b in roads:
            for i, lane in enumerate(network.graph[a][b]):
                offsets = [(lane, 0.0)]
                for nxt in network.graph.get(b, {}).values():
                    offsets.append((nxt[i] if i < len(nxt) else nxt[0], lane.length))
                for z, _ in into.get(a, []):
                    prev = network.graph[z][a]
                    if prev:
                        p = prev[i] if i < len(prev) else prev[0]
                        offsets.append((p, -p.length))
                self._connected[(a, b, i)] = offsets

    KEEP_LANE_ANGLE = 0.5  # rad: on a map of single-lane roads a vehicle keeps a lane it is on and along

    def closest_lane_index(self, position: np.ndarray, heading: float, hint: LaneIndex | None,
                           target: LaneIndex | None = None) -> LaneIndex:
        """highway-env's closest lane (distance plus heading difference), looked for around
        `hint` first; the whole map only when nothing around fits.

        On a map of single-lane roads (`LaneNetwork`: a town's lanes overlap in its junctions) a
        vehicle stays on `hint`, or moves on to the lane it follows (`target`), while it is on
        that lane and drives along it."""
        if isinstance(self.network, LaneNetwork):
            for index in (hint, target):
                if index is not None and self._drives_on(self.network.get_lane(index), position, heading):
                    return index
        if hint is not None and hint[:2] in self._around:
            candidates = self._around[hint[:2]]
            lanes = [self.network.get_lane(k) for k in candidates]
            distances = [lane.distance_with_heading(position, heading) for lane in lanes]
            best = int(np.argmin(distances))
            if distances[best] < 1.0:  # on that lane and roughly along it: no other lane is closer
                return candidates[best]
        return self.network.get_closest_lane_index(position, heading)

    def _drives_on(self, lane, position: np.ndarray, heading: float) -> bool:
        s, lateral = lane.local_coordinates(position)
        return (0.0 <= s <= lane.length and abs(lateral) <= lane.width_at(s) / 2
                and abs(lane.local_angle(heading, s)) < self.KEEP_LANE_ANGLE)

    def neighbour_vehicles(self, vehicle: Vehicle, lane_index: LaneIndex | None = None) -> tuple:
        lane_index = lane_index or vehicle.lane_index
        positions = self.state.positions
        if not lane_index or self.state.vehicles is not self.vehicles or len(positions) != len(self.vehicles):
            return super().neighbour_vehicles(vehicle, lane_index)
        candidates = self.state.candidates.get(lane_index[:2])
        if candidates is None:
            self._find_candidates([lane_index[:2]])
            candidates = self.state.candidates[lane_index[:2]]
        return self._nearest_on(vehicle, lane_index, candidates)

    def _find_candidates(self, roads: list[tuple[str, str]]) -> None:
        """For each road: the vehicles inside the on-lane area of its lanes and of the lanes just
        before, after and beside them (only they can be found there), all roads in one pass."""
        positions = self.state.positions
        boxes = np.concatenate([self._search_boxes[r] for r in roads])  # (K, 4): x0, y0, x1, y1
        inside = (positions[:, None, 0] >= boxes[None, :, 0]) & (positions[:, None, 0] <= boxes[None, :, 2])
        inside &= (positions[:, None, 1] >= boxes[None, :, 1]) & (positions[:, None, 1] <= boxes[None, :, 3])
        ends = np.cumsum([len(self._search_boxes[r]) for r in roads])
        hits = np.logical_or.reduceat(inside, np.concatenate([[0], ends[:-1]]), axis=1) if len(positions) else \
            np.zeros((0, len(roads)), dtype=bool)
        vehicles = self.vehicles
        for road, column in zip(roads, hits.T):
            self.state.candidates[road] = [vehicles[k] for k in np.flatnonzero(column)]

    def _nearest_on(self, vehicle: Vehicle, lane_index: LaneIndex, candidates: list[Vehicle]) -> tuple:
        """highway-env's `Road.neighbour_vehicles` (connected lanes) among `candidates`, with
        the connected lanes found once: (vehicle ahead or None, vehicle behind or None)."""
        lanes_offsets = self._connected[lane_index] if self.neighbour_vehicles_connected_lanes else None
        if lanes_offsets is None:
            lanes_offsets = [(self.network.get_lane(lane_index), 0.0)]
        s = lanes_offsets[0][0].local_coordinates(vehicle.position)[0]
        s_front = s_rear = None
        v_front = v_rear = None
        on_lane = self.state.on_lane  # (lane, vehicle) -> s on it or None, while no one moves
        for v in candidates:
            if v is vehicle:
                continue
            for lane, offset in lanes_offsets:
                s_v = on_lane.get((lane, v), False)
                if s_v is False:
                    if isinstance(lane, PolylineLane) and not lane.may_hold(v.position):
                        s_v = None
                    else:
                        s_v, lat_v = lane.local_coordinates(v.position)
                        s_v = s_v if lane.on_lane(v.position, s_v, lat_v, margin=1) else None
                    on_lane[(lane, v)] = s_v
                if s_v is None:
                    continue
                s_v += offset
                if s <= s_v and (s_front is None or s_v <= s_front):
                    s_front, v_front = s_v, v
                if s_v < s and (s_rear is None or s_v > s_rear):
                    s_rear, v_rear = s_v, v
                break  # found on this lane: the next ones are not looked at
        return v_front, v_rear

    @classmethod
    def _crossing_paths(cls, network: RoadNetwork, inside: frozenset) -> set[tuple]:
        """Pairs of inside roads whose centre lines come closer than `CROSSING_M`, except those
        from the same approach (they follow each other)."""
        samples = {}
        for a, b in inside:
            lane = network.get_lane((a, b, 0))
            samples[(a, b)] = np.array([lane.position(s, 0.0) for s in np.linspace(0, lane.length, 25)])
        boxes = {r: (p.min(axis=0) - cls.CROSSING_M, p.max(axis=0) + cls.CROSSING_M) for r, p in samples.items()}
        crossing = set()
        for r1, p1 in samples.items():
            lo1, hi1 = boxes[r1]
            for r2, p2 in samples.items():
                if r1[0] == r2[0] or np.any(p2.max(axis=0) < lo1) or np.any(p2.min(axis=0) > hi1):
                    continue  # same approach, or too far apart to come close (a town's other junctions)
                closest = np.min(np.linalg.norm(p1[:, None] - p2[None], axis=-1))
                if closest < cls.CROSSING_M:
                    crossing.add((r1, r2))
        return crossing

    def act(self) -> None:
        vehicles = self.vehicles
        positions = np.array([v.position for v in vehicles]).reshape(-1, 2)
        # Where everyone is before anyone acts, for the corridor checks of `TrafficCar`.
        self.state = SimpleNamespace(
            vehicles=vehicles,
            positions=positions,
            widths=np.array([v.WIDTH for v in vehicles], dtype=np.float64),
            directions=np.array([v.direction for v in vehicles]).reshape(-1, 2),
            ids=np.array([id(v) for v in vehicles], dtype=np.int64),
            merging_into={},  # lane index -> rows of the cars changing into it
            on_lane={},  # (lane, vehicle) -> s (m) on the lane, or None when not on it
            corridors=None,  # every vehicle's corridor ahead, found by the first car that looks
            candidates={},  # road -> the vehicles that may be on its lanes or those around them
        )
        roads = list(dict.fromkeys(v.lane_index[:2] for v in vehicles if v.lane_index is not None))
        if roads:
            self._find_candidates(roads)
        for row, v in enumerate(vehicles):
            target = getattr(v, "target_lane_index", None)
            if target is not None and target != v.lane_index:
                self.state.merging_into.setdefault(target, []).append(row)
        self.state.held = np.zeros(len(vehicles), dtype=bool)
        if self.junction is not None:
            self._let_vehicles_in()
            self.state.held = np.array([self._held(v) for v in vehicles], dtype=bool)
        super().act()
        self.state.vehicles = None  # positions change in `step`: no longer usable for lookups

    def step(self, dt: float) -> None:
        """highway-env's step, with collisions checked only between vehicles close enough to
        touch (its own first test, for every pair at once)."""
        self._time += dt
        vehicles = self.vehicles
        for vehicle in vehicles:
            vehicle.step(dt)
        if len(vehicles) > 1:
            positions = np.array([v.position for v in vehicles])
            diagonals = np.array([v.diagonal for v in vehicles])
            speeds = np.array([v.speed for v in vehicles])
            gaps = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
            reach = (diagonals[:, None] + diagonals[None]) / 2 + speeds[:, None] * dt + 1e-6
            for i, j in zip(*np.nonzero(np.triu(gaps <= reach, 1))):
                vehicles[i].handle_collisions(vehicles[j], dt)
        for vehicle in vehicles:
            for other in self.objects:
                vehicle.handle_collisions(other, dt)

    # -------------------------------------------------------------- junction control

    def stop_line_distance(self, v: Vehicle) -> float | None:
        """Distance (m) from `v` to the stop line it must wait at, or None when it may go."""
        if v in self._let_in or v.lane_index[:2] not in self.approach_roads:
            return None
        return self.stop_line_distance_any(v)

    NO_CHANGE_BEFORE_LINE_M = 25.0  # no lane change into a road into the junction this close to its line

    def near_stop_line(self, lane_index: LaneIndex, position: np.ndarray, speed: float) -> bool:
        """A vehicle at `position` moving at `speed` m/s is too close to the stop line of lane
        `lane_index` to change into it: nearer than `NO_CHANGE_BEFORE_LINE_M` or than it
        needs to stop gently."""
        if self.junction is None or lane_index[:2] not in self.approach_roads:
            return False
        lane = self.network.get_lane(lane_index)
        to_line = lane.length - self.junction.setback_m - lane.local_coordinates(position)[0]
        return to_line < max(self.NO_CHANGE_BEFORE_LINE_M, speed * speed / (2.0 * self.STOP_DEC) + 10.0)

    def _held(self, v: Vehicle) -> bool:
        """`v` waits at (or queues behind) its stop line."""
        to_line = self.stop_line_distance(v)
        return to_line is not None and to_line > -1.0 and isinstance(v, ControlledVehicle)

    def stop_line_distance_any(self, v: Vehicle) -> float:
        """Distance (m) from `v`, on a road into the junction, to its stop line."""
        return v.lane.length - self.junction.setback_m - v.lane.local_coordinates(v.position)[0]

    def _let_vehicles_in(self) -> None:
        approaching = [v for v in self.vehicles if v.lane_index[:2] in self.approach_roads]
        self._arrival = {v: self._arrival[v] for v in approaching if v in self._arrival}
        # A vehicle let in that can still stop at its line waits again when the way is no longer
        # clear (the ring traffic sped up, an ego drove into the junction).
        self._let_in = {
            v
            for v in approaching
            if v in self._let_in
            and (self.stop_line_distance_any(v) < v.speed**2 / (2.0 * self.STOP_DEC) or self._may_enter(v))
        }
        # Per lane, only the first car not yet let in waits at the line; the ones behind it
        # queue (letting one in behind a waiting car would hold the junction for nothing).
        first: dict[LaneIndex, Vehicle] = {}
        for v in sorted(approaching, key=self.stop_line_distance_any):
            if v not in self._let_in:
                first.setdefault(v.lane_index, v)
        waiting = []
        for v in first.values():
            if not isinstance(v, ControlledVehicle):
                continue  # manual egos are never held: the controller works around them
            if self.stop_line_distance(v) <= v.speed * v.speed / 4.0 + 15.0:  # comfortable braking
                self._arrival.setdefault(v, self._time)
                waiting.append(v)
        waiting.sort(key=lambda v: self._arrival[v])  # stable: ties keep the road's order
        for v in waiting:
            if self._may_enter(v):
                self._let_in.add(v)

    def _next_inside_road(self, v: Vehicle) -> tuple[str, str] | None:
        _, to = v.lane_index[:2]
        for a, b, _ in getattr(v, "route", None) or []:
            if a == to and (a, b) in self.junction.inside:
                return a, b
        options = [(to, b) for b in self.network.graph.get(to, {}) if (to, b) in self.junction.inside]
        return options[0] if len(options) == 1 else None

    def _may_enter(self, v: Vehicle) -> bool:
        if self.junction.kind == "ring":
            return self._ring_clear(v.lane_index[1], v)
        path = self._next_inside_road(v)
        for other in self.vehicles:
            if other is v:
                continue
            if other.lane_index[:2] in self.junction.inside:
                # Where it drives, not the closest lane: at the junction's edge every path
                # from an approach starts at the same point. A manual ego could go anywhere.
                target = getattr(other, "target_lane_index", None)
                other_path = target[:2] if target is not None and target[:2] in self.junction.inside else None
            elif other in self._let_in:
                other_path = self._next_inside_road(other)
            else:
                continue
            if path is None or other_path is None or (path, other_path) in self._crossing:
                return False
        return True

    def _ring_clear(self, node: str, v: Vehicle) -> bool:
        """No vehicle on the ring reaches `node` before `v` has joined and cleared it, and none
        has just passed it."""
        # Time (s) for `v` to cross from where it is until its rear is past the ring's lane.
        across = self.stop_line_distance_any(v) + self.junction.setback_m + v.LENGTH + v.lane.width_at(0.0)
        v0, acc = max(v.speed, 0.0), v.COMFORT_ACC_MAX
        join_s = (math.sqrt(v0 * v0 + 2.0 * acc * across) - v0) / acc + self.RING_MARGIN_S
        for other in self.vehicles:
            if other is v:
                continue
            a, b = other.lane_index[:2]
            if (a, b) not in self.junction.inside and not (other in self._let_in and b == node):
                continue
            s = other.lane.local_coordinates(other.position)[0]
            if a == node:  # just past the joining point
                if s < self.RING_CLEAR_M + other.LENGTH:
                    return False
                continue
            to_node = self._along_ring(other.lane.length - s, b, node)
            if to_node is not None and to_node < self.RING_CLEAR_M + max(other.speed, 0.0) * join_s:
                return False
        return True

    def _along_ring(self, distance: float, at: str, node: str, segments: int = 4) -> float | None:
        """Distance (m) along the ring from a point `distance` before node `at` to `node`, or
        None when `node` is more than `segments` ring roads ahead."""
        for _ in range(segments):
            if at == node:
                return distance
            following = [b for b in self.network.graph.get(at, {}) if (at, b) in self.junction.inside]
            if not following:
                return None
            distance += self.network.graph[at][following[0]][0].length
            at = following[0]
        return distance if at == node else None
