"""The embedded world: highway-env road networks and IDM/MOBIL traffic, lifted to 3D.

Runs in-process on the CPU with no downloads. Several egos share one road; each is driven by a
sticky Carla-style `VehicleControl` (`dwm.world.ego_car.EgoCar`) or, on autopilot, by the same
IDM/MOBIL driver as the traffic (`dwm.world.traffic.TrafficCar`), keeping its lane and
following a route.

Behaviour a user can rely on:
- Traffic stays around the egos: vehicles that leave the map through an exit, or (on the endless
  highway) drift farther than `view_range + 60 m` from every ego, re-enter at the map's
  entries or just beyond some ego's view; on the highway each ego gets its share of traffic.
  Traffic that has stood still for two minutes (a jam nothing resolves) is taken out too.
- The highway never ends: when an ego nears the end of the 10 km road, the whole scene (egos and
  traffic) is moved back along the road. Nothing changes relative to anything else, but ego
  poses jump back by a multiple of 100 m in world x at that tick.
- An ego that leaves the map (20 m past a road's end, or 20 m off every lane) is put back at a
  free spawn place, keeping its id, control and autopilot; on autopilot it is put back as it
  reaches the end of an exit road, like the traffic.
- Collisions: highway-env marks both vehicles crashed and brings them to a stop, ignoring their
  controls meanwhile; one second after standing still they are released and drive (or can be
  driven) away. Traffic still entangled with a released vehicle is cleared away.
- Traffic never drives into an ego on purpose: it brakes for anything in its path, and at
  junctions it waits for egos (egos are never held at stop lines).
- Determinism: the same seed and the same calls give the same trajectories for every vehicle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from highway_env import utils
from highway_env.road.lane import AbstractLane
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.base import (
    REAR_AXLE_BEHIND_CENTRE_M,
    Boxes,
    Observation,
    UnknownEgoError,
    VehicleControl,
    Weather,
    World,
)
from dwm.world.ego_car import EgoCar, control_from_motion
from dwm.world.maps import (
    SpawnArea,
    build_road,
    exit_roads,
    map_geometry,
    map_spec,
    to_world_xy,
    to_world_yaw,
)
from dwm.world.traffic import CATEGORY_SIZES, TrafficCar

RECYCLE_BEYOND_VIEW_M = 60.0  # endless map: traffic this far beyond every ego's view re-enters
ENTRY_EGO_CLEARANCE_M = 30.0  # re-entering traffic never appears closer than this to an ego
NEIGHBOURHOOD_M = 60.0  # traffic entering is no faster than the vehicles this close
OFF_MAP_M = 20.0  # an ego this far from every lane has left the map
TREADMILL_STEP_M = 100.0  # the endless road moves back by multiples of this
STOPPED_SPEED = 0.5  # m/s: a vehicle slower than this stands still
STUCK_S = 120.0  # traffic standing still this long is taken out (a jam nobody can resolve)
CRASH_HOLD_S = 1.0  # a crashed vehicle is released after standing still this long
INITIAL_SPAWN_TRIES = 30  # per traffic vehicle when the world starts
SPAWN_TRIES_PER_TICK = 3  # per missing traffic vehicle and tick
EGO_SPAWN_TRIES = 60
MAX_DT = 0.2  # s: highway-env's heading controller (time constant 0.2 s) oscillates beyond


def _overlap(a: Vehicle, b: Vehicle) -> bool:
    return utils.rotated_rectangles_intersect(
        (a.position, a.LENGTH, a.WIDTH, a.heading), (b.position, b.LENGTH, b.WIDTH, b.heading)
    )


def _blocking(
    vehicles: list[Vehicle], xy: np.ndarray, heading: float, category: str, speed: float
) -> np.ndarray:
    """Mask (N,) of the vehicles too close to place a vehicle of `category` at `xy`, `heading`
    (highway-env frame) moving at `speed` m/s: within its lane-wide box with a bumper gap of
    5 m + 0.6 s at that speed ahead and behind, or touching it whatever their lane."""
    if not vehicles:
        return np.zeros(0, dtype=bool)
    rel = np.array([v.position for v in vehicles]) - xy  # (N, 2)
    lengths = np.array([v.LENGTH for v in vehicles])
    widths = np.array([v.WIDTH for v in vehicles])
    lon = rel @ np.array([math.cos(heading), math.sin(heading)])
    lat = rel @ np.array([-math.sin(heading), math.cos(heading)])
    length, width, _ = CATEGORY_SIZES[category]
    half = (lengths + length) / 2
    in_box = (np.abs(lon) < half + 5.0 + 0.6 * abs(speed)) & (np.abs(lat) < (widths + width) / 2 + 1.0)
    return in_box | (np.hypot(lon, lat) < half + 3.0)


@dataclass
class _Ego:
    vehicle: Vehicle  # EgoCar, or TrafficCar while on autopilot
    control: VehicleControl  # the held manual control
    autopilot: bool = False


@dataclass
class _Snapshot:
    """Every vehicle's box at the current tick, world frame (N vehicles)."""

    index: dict[int, int]  # id(vehicle) -> row
    centres: np.ndarray  # (N, 2) m, vehicle centres on the ground
    yaws: np.ndarray  # (N,) rad
    sizes: np.ndarray  # (N, 3) m: length, width, height
    categories: list[str]


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"world {name}={value!r} must be a number")
    if value < lo or value > hi or (lo_open and value == lo):
        lo_bracket = "(" if lo_open else "["
        raise ValueError(f"world {name}={value!r} is outside the allowed range {lo_bracket}{lo}, {hi}]")
    return float(value)


def _integer(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"world {name}={value!r} must be an integer >= {lo}")
    return int(value)


def _weather(value) -> Weather:
    if value is None:
        return Weather()
    if isinstance(value, Weather):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"world weather={value!r} must be a mapping of Weather fields")
    allowed = set(Weather.__dataclass_fields__)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"unknown weather field(s) {unknown}; allowed: {sorted(allowed)}")
    return Weather(**{k: float(v) for k, v in value.items()})


class EmbeddedWorld(World):
    """highway-env traffic on one of its maps, observed in 3D by several egos.

    Arguments are the keys of `conf/world/embedded.yaml`:
    map: highway | merge | roundabout | intersection; vehicles: traffic besides the egos;
    truck_ratio: share of that traffic that is trucks; dt: s per tick; seed: int >= 0;
    view_range: m around an ego within which actors and map lines are observed;
    environment: caption scene description (None: the map's own); weather: `Weather` fields.
    """

    def __init__(
        self,
        map: str = "highway",
        vehicles: int = 20,
        truck_ratio: float = 0.15,
        dt: float = 0.1,
        seed: int = 0,
        view_range: float = 120.0,
        environment: str | None = None,
        weather: Mapping | Weather | None = None,
    ):
        self._spec = map_spec(map)
        count = _integer("vehicles", vehicles, 0)
        ratio = _number("truck_ratio", truck_ratio, 0.0, 1.0)
        self.dt = _number("dt", dt, 0.0, MAX_DT, lo_open=True)
        seed = _integer("seed", seed, 0)
        self.view_range = _number("view_range", view_range, 0.0, math.inf, lo_open=True)
        if environment is not None and not isinstance(environment, str):
            raise ValueError(f"world environment={environment!r} must be a text or null")
        self.environment = environment if environment is not None else self._spec.description
        self.weather = _weather(weather)

        # Separate streams: where things spawn, and highway-env's own behaviour randomness.
        spawn_seq, road_seq = np.random.SeedSequence(seed).spawn(2)
        self._rng = np.random.default_rng(spawn_seq)
        self._road = build_road(self._spec, np.random.default_rng(road_seq), self.dt)
        self._network = self._road.network
        self._lanes: list[AbstractLane] = self._network.lanes_list()
        self._exits = exit_roads(self._spec, self._network)
        self._geometry = map_geometry(self._spec.name)
        self._recycle_m = self.view_range + RECYCLE_BEYOND_VIEW_M

        self._egos: dict[str, _Ego] = {}
        self._next_ego = 1
        self._steps = 0
        self._crash_hold: dict[Vehicle, float] = {}  # s each crashed vehicle has stood still
        self._standing: dict[Vehicle, float] = {}  # s each traffic vehicle has stood still
        self._snapshot: _Snapshot | None = None
        # Trucks spread evenly over the traffic slots; a slot keeps its category for good.
        self._categories = [
            "truck" if math.floor((i + 1) * ratio) > math.floor(i * ratio) else "car" for i in range(count)
        ]
        self._traffic: list[TrafficCar | None] = [None] * count
        self._fill_traffic(INITIAL_SPAWN_TRIES, initial=True)

    # ------------------------------------------------------------------ egos

    def add_ego(self, ego_id: str | None = None) -> str:
        """Spawn an ego at a free place of the map's ego areas (traffic in the way makes room),
        rolling at the traffic's lower cruise speed with a neutral control; ids default to
        "ego-1", "ego-2", ... ValueError for an id in use; RuntimeError when egos fill every
        spawn place."""
        if ego_id is None:
            while f"ego-{self._next_ego}" in self._egos:
                self._next_ego += 1
            ego_id = f"ego-{self._next_ego}"
            self._next_ego += 1
        if not isinstance(ego_id, str) or not ego_id:
            raise ValueError(f"ego id {ego_id!r} must be a non-empty text")
        if ego_id in self._egos:
            raise ValueError(f"ego {ego_id!r} already exists; egos in this world: {', '.join(self._egos)}")
        control = VehicleControl()
        vehicle = self._make_ego_vehicle(self._place_ego(), control, autopilot=False)
        self._road.vehicles.append(vehicle)
        self._egos[ego_id] = _Ego(vehicle, control)
        self._snapshot = None
        return ego_id

    def remove_ego(self, ego_id: str) -> None:
        ego = self._ego(ego_id)
        self._drop_vehicle(ego.vehicle)
        del self._egos[ego_id]
        self._snapshot = None

    def egos(self) -> list[str]:
        return list(self._egos)

    def apply_control(self, ego_id: str, control: VehicleControl) -> None:
        """Hold `control` until the next call. On autopilot the autopilot drives, as in Carla,
        and hands back its own last control when it is switched off."""
        ego = self._ego(ego_id)
        if not isinstance(control, VehicleControl):
            raise ValueError(f"control must be a VehicleControl, got {type(control).__name__}")
        ego.control = control
        if not ego.autopilot:
            ego.vehicle.control = control

    def set_autopilot(self, ego_id: str, enabled: bool) -> None:
        ego = self._ego(ego_id)
        if not isinstance(enabled, bool):
            raise ValueError(f"autopilot must be true or false, got {enabled!r}")
        if enabled == ego.autopilot:
            return
        old = ego.vehicle
        if enabled:
            new = self._autopilot_car(old.position, old.heading, old.speed)
        else:
            # Carla keeps the autopilot's last control applied until the client sends another.
            ego.control = self._effective_control(ego)
            wheel = old.action["steering"]
            new = EgoCar(self._road, old.position, old.heading, old.speed, self.dt, ego.control, wheel)
        new.action = dict(old.action)
        new.crashed = old.crashed
        self._replace_vehicle(old, new)
        ego.vehicle, ego.autopilot = new, enabled

    # ------------------------------------------------------------------ time

    @property
    def sim_time(self) -> float:
        return self._steps * self.dt

    def tick(self) -> float:
        self._road.act()
        self._road.step(self.dt)
        self._steps += 1
        self._release_crashed()
        if self._spec.endless:
            self._move_scene_back()
        self._keep_egos_on_map()
        self._recycle_traffic()
        self._fill_traffic(SPAWN_TRIES_PER_TICK, initial=False)
        self._snapshot = None
        return self.sim_time

    # ------------------------------------------------------------------ observation

    def observe(self, ego_id: str) -> Observation:
        ego = self._ego(ego_id)
        snap = self._snapshot or self._take_snapshot()
        row = snap.index[id(ego.vehicle)]
        yaw = float(snap.yaws[row])
        forward = np.array([math.cos(yaw), math.sin(yaw)])
        rear_axle = snap.centres[row] - REAR_AXLE_BEHIND_CENTRE_M * forward
        pose = np.eye(4)
        pose[:2, :2] = [[forward[0], -forward[1]], [forward[1], forward[0]]]
        pose[:2, 3] = rear_axle

        near = np.sum((snap.centres - rear_axle) ** 2, axis=1) <= self.view_range**2
        near[row] = False
        rows = np.flatnonzero(near)
        sizes = snap.sizes[rows]
        boxes = Boxes(
            centers=np.concatenate([snap.centres[rows], sizes[:, 2:3] / 2], axis=1),
            sizes=sizes,
            yaws=snap.yaws[rows],
            categories=[snap.categories[r] for r in rows],
        )
        return Observation(
            ego_id=ego_id,
            sim_time=self.sim_time,
            ego_pose=pose,
            ego_speed=float(ego.vehicle.speed),
            boxes=boxes,
            map_lines=self._geometry.near(rear_axle, self.view_range),
            weather=self.weather,
            environment=self.environment,
            control=self._effective_control(ego),
            autopilot=ego.autopilot,
        )

    def close(self) -> None:
        self._road.vehicles.clear()
        self._egos.clear()
        self._traffic = [None] * len(self._traffic)
        self._snapshot = None

    # ------------------------------------------------------------------ internals: egos

    def _ego(self, ego_id: str) -> _Ego:
        try:
            return self._egos[ego_id]
        except (KeyError, TypeError):
            raise UnknownEgoError(ego_id, list(self._egos)) from None

    def _effective_control(self, ego: _Ego) -> VehicleControl:
        if not ego.autopilot:
            return ego.control
        v = ego.vehicle
        acceleration, wheel = float(v.action["acceleration"]), float(v.action["steering"])
        return control_from_motion(acceleration, wheel, float(v.speed))

    def _autopilot_car(self, position: np.ndarray, heading: float, speed: float) -> TrafficCar:
        car = TrafficCar(
            self._road,
            position,
            heading,
            speed,
            category="car",
            cruise_speed=self._spec.cruise_speed[1],
            keep_lane=True,  # keeps its lane, follows its route
        )
        self._plan_route(car)
        return car

    def _make_ego_vehicle(self, place: tuple, control: VehicleControl, autopilot: bool) -> Vehicle:
        lane, s, speed = place
        position, heading = lane.position(s, 0.0), lane.heading_at(s)
        if autopilot:
            return self._autopilot_car(position, heading, speed)
        return EgoCar(self._road, position, heading, speed, self.dt, control)

    def _place_ego(self, ignore: Vehicle | None = None) -> tuple[AbstractLane, float, float]:
        """A free place (lane, s, speed) in the map's ego areas. When traffic fills them all,
        the traffic around one place makes room (it re-enters elsewhere)."""
        speed = self._spec.cruise_speed[0]
        others = [v for v in self._road.vehicles if v is not ignore]
        egos = [e.vehicle for e in self._egos.values() if e.vehicle is not ignore]
        for blockers in (others, egos):
            for _ in range(EGO_SPAWN_TRIES):
                lane, s = self._random_place(self._spec.ego_areas)
                xy, heading = lane.position(s, 0.0), lane.heading_at(s)
                if not _blocking(blockers, xy, heading, "car", speed).any():
                    traffic = [v for v in others if v in self._traffic]
                    for v, blocks in zip(traffic, _blocking(traffic, xy, heading, "car", speed)):
                        if blocks:
                            self._recycle(v)
                    return lane, s, speed
        raise RuntimeError(
            f"no free place to spawn an ego on the {self._spec.name} map: its {len(self._egos)} egos fill it"
        )

    def _keep_egos_on_map(self) -> None:
        for ego in self._egos.values():
            v = ego.vehicle
            leaving = ego.autopilot and self._is_leaving(v)
            if leaving or min(lane.distance(v.position) for lane in self._lanes) > OFF_MAP_M:
                new = self._make_ego_vehicle(self._place_ego(ignore=v), ego.control, ego.autopilot)
                self._replace_vehicle(v, new)
                ego.vehicle = new

    def _move_scene_back(self) -> None:
        """Endless road: once an ego nears the end, move every vehicle back along the road."""
        if not self._egos:
            return
        xs = [e.vehicle.position[0] for e in self._egos.values()]
        margin = self._recycle_m + TREADMILL_STEP_M
        end = self._lanes[0].length
        if max(xs) < end - margin:
            return
        shift = math.floor((min(xs) - margin) / TREADMILL_STEP_M) * TREADMILL_STEP_M
        if shift <= 0:
            return  # egos spread over the whole road: the front one leaves it and is put back
        for v in self._road.vehicles:
            v.position[0] -= shift

    # ------------------------------------------------------------------ internals: traffic

    def _anchors(self) -> np.ndarray:
        """(A, 2) highway-env positions that traffic gathers around: the egos, or with none,
        the middle of the first ego area."""
        if self._egos:
            return np.array([e.vehicle.position for e in self._egos.values()])
        area = self._spec.ego_areas[0]
        lane = self._network.get_lane((area.from_node, area.to_node, 0))
        return lane.position((area.s_min + area.s_max) / 2, 0.0)[None]

    def _is_leaving(self, v: Vehicle) -> bool:
        if v.lane_index[:2] not in self._exits:
            return False
        return v.lane.local_coordinates(v.position)[0] >= v.lane.length - v.LENGTH

    def _recycle_traffic(self) -> None:
        """Take out traffic that leaves the map, and on the endless road traffic far from every
        ego or beyond an ego's share; `_fill_traffic` brings it back."""
        anchors = self._anchors()
        for v in self._traffic:
            if v is None:
                continue
            self._standing[v] = self._standing.get(v, 0.0) + self.dt if abs(v.speed) < STOPPED_SPEED else 0.0
            nearest_ego = np.min(np.linalg.norm(anchors - v.position, axis=1))
            far = self._spec.endless and nearest_ego > self._recycle_m
            if far or self._is_leaving(v) or self._standing[v] > STUCK_S:
                self._recycle(v)
        if not (self._spec.endless and len(anchors) > 1):
            return
        # Each ego keeps its share; extra vehicles out of every ego's view move to egos with few.
        present = [i for i, v in enumerate(self._traffic) if v is not None]
        if not present:
            return
        positions = np.array([self._traffic[i].position for i in present])
        dist = np.linalg.norm(positions[:, None] - anchors[None], axis=-1)  # (V, A)
        nearest = np.argmin(dist, axis=1)
        share = math.ceil(len(self._traffic) / len(anchors))
        for a in range(len(anchors)):
            mine = np.flatnonzero(nearest == a)
            hidden = mine[np.min(dist[mine], axis=1) > self.view_range]
            extra = len(mine) - share
            for k in hidden[np.argsort(-dist[hidden, a], kind="stable")][: max(extra, 0)]:
                self._recycle(self._traffic[present[k]])

    def _fill_traffic(self, tries: int, initial: bool) -> None:
        for i, v in enumerate(self._traffic):
            if v is None:
                self._traffic[i] = self._spawn_traffic(self._categories[i], tries, initial)

    def _spawn_traffic(self, category: str, tries: int, initial: bool) -> TrafficCar | None:
        length = CATEGORY_SIZES[category][0]
        vehicles = self._road.vehicles
        positions = np.array([v.position for v in vehicles]).reshape(-1, 2)
        speeds = np.array([max(v.speed, 0.0) for v in vehicles], dtype=np.float64)
        egos = np.array([e.vehicle.position for e in self._egos.values()]).reshape(-1, 2)
        for _ in range(tries):
            cruise = float(self._rng.uniform(*self._spec.cruise_speed))
            cruise *= 0.85 if category == "truck" else 1.0
            if self._spec.endless:
                lane, s = self._place_near_egos(initial)
            else:
                lane, s = self._random_place(self._spec.traffic_areas if initial else self._spec.entry_areas)
            if lane is None:
                continue
            xy = lane.position(s, 0.0)
            d2 = np.sum((positions - xy) ** 2, axis=1)
            # Enter no faster than the traffic around, so that nobody has to brake hard for it.
            speed = float(min([cruise, *speeds[d2 < NEIGHBOURHOOD_M**2]]))
            if _blocking(vehicles, xy, lane.heading_at(s), category, speed).any():
                continue
            if not initial and np.any(np.sum((egos - xy) ** 2, axis=1) < ENTRY_EGO_CLEARANCE_M**2):
                continue
            car = TrafficCar(self._road, xy, lane.heading_at(s), speed, category, cruise_speed=cruise)
            self._plan_route(car)
            car.randomize_behavior()
            vehicles.append(car)
            self._snapshot = None
            return car
        return None

    def _place_near_egos(self, initial: bool) -> tuple[AbstractLane | None, float]:
        """Endless road: a lane and s around the anchor with the least traffic; on entering,
        just beyond the view so that nobody sees the vehicle appear."""
        anchors = self._anchors()
        present = np.array([v.position for v in self._traffic if v is not None]).reshape(-1, 2)
        counts = np.zeros(len(anchors), dtype=int)
        if len(present) and len(anchors) > 1:
            nearest = np.argmin(np.linalg.norm(present[:, None] - anchors[None], axis=-1), axis=1)
            counts = np.bincount(nearest, minlength=len(anchors))
        fewest = np.flatnonzero(counts == counts.min())
        anchor = anchors[fewest[self._rng.integers(len(fewest))]]
        if initial:
            offset = self._rng.uniform(-1.0, 1.0) * (self._recycle_m - 10.0)
        else:
            side = self._rng.choice([-1.0, 1.0])
            offset = side * self._rng.uniform(self.view_range + 10.0, self._recycle_m - 10.0)
        road = self._network.graph[self._spec.ego_areas[0].from_node][self._spec.ego_areas[0].to_node]
        lane = road[self._rng.integers(len(road))]
        s = lane.local_coordinates(anchor)[0] + offset
        if not 0.0 <= s <= lane.length:
            return None, 0.0
        return lane, float(s)

    def _random_place(self, areas: tuple[SpawnArea, ...]) -> tuple[AbstractLane, float]:
        area = areas[self._rng.integers(len(areas))]
        road = self._network.graph[area.from_node][area.to_node]
        lane = road[self._rng.integers(len(road))]
        s = self._rng.uniform(area.s_min, min(area.s_max, lane.length))
        return lane, float(s)

    def _plan_route(self, car: TrafficCar) -> None:
        """Route to a random destination other than the road the car came from."""
        origin = car.lane_index[0]
        targets = [d for d in self._spec.destinations if d != origin]
        if targets:
            car.plan_route_to(targets[self._rng.integers(len(targets))])

    # ------------------------------------------------------------------ internals: bookkeeping

    def _release_crashed(self) -> None:
        """A crashed vehicle standing still for `CRASH_HOLD_S` drives (or is driven) on. Traffic
        still entangled with it is cleared away (it re-enters elsewhere); an ego entangled with
        another ego is moved back out of it."""
        for v in list(self._road.vehicles):
            if not v.crashed or v not in self._road.vehicles:
                continue
            if abs(v.speed) >= STOPPED_SPEED:
                self._crash_hold.pop(v, None)
                continue
            held = self._crash_hold.get(v, 0.0) + self.dt
            if held < CRASH_HOLD_S - 1e-9:
                self._crash_hold[v] = held
                continue
            v.crashed = False
            self._crash_hold.pop(v, None)
            for other in [o for o in self._road.vehicles if o is not v and _overlap(v, o)]:
                if other in self._traffic:
                    self._recycle(other)
                elif v in self._traffic:
                    self._recycle(v)
                    break
                else:
                    v.position -= (v.LENGTH + other.LENGTH) / 2 * v.direction

    def _recycle(self, v: TrafficCar) -> None:
        self._traffic[self._traffic.index(v)] = None
        self._drop_vehicle(v)

    def _drop_vehicle(self, v: Vehicle) -> None:
        self._road.vehicles.remove(v)
        self._crash_hold.pop(v, None)
        self._standing.pop(v, None)
        self._snapshot = None

    def _replace_vehicle(self, old: Vehicle, new: Vehicle) -> None:
        """Swap a vehicle in place, so that the stepping order (and determinism) is kept."""
        self._road.vehicles[self._road.vehicles.index(old)] = new
        held = self._crash_hold.pop(old, None)
        if held is not None:
            self._crash_hold[new] = held
        self._snapshot = None

    def _take_snapshot(self) -> _Snapshot:
        vehicles = self._road.vehicles
        centres = to_world_xy(np.array([v.position for v in vehicles]).reshape(-1, 2))
        yaws = np.asarray(to_world_yaw(np.array([v.heading for v in vehicles], dtype=np.float64))).reshape(-1)
        categories = [v.category for v in vehicles]
        sizes = np.array([CATEGORY_SIZES[c] for c in categories]).reshape(-1, 3)
        index = {id(v): i for i, v in enumerate(vehicles)}
        self._snapshot = _Snapshot(index, centres, yaws, sizes, categories)
        return self._snapshot
