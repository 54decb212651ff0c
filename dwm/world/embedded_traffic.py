"""The traffic of the embedded world, kept around the egos: where it enters, and when a vehicle
is taken out to re-enter elsewhere.

- A fixed number of traffic slots, each keeping its category (car or truck) for good. A vehicle
  taken out empties its slot; every tick a few tries refill the empty slots at free places.
- On maps with entries, traffic first fills the map and later comes back at its entries; it is
  taken out as it reaches the end of an exit road.
- On the endless highway, traffic spawns around the ego with the least traffic, and re-enters
  just beyond an ego's view so that nobody sees it appear. A vehicle farther than
  `view_range + 60 m` from every ego is taken out, and so are vehicles beyond an ego's share
  that no ego sees, so that every ego keeps traffic around it.
- Traffic that has stood still for two minutes (a jam nothing resolves) is taken out.

Everything here is in highway-env's screen frame (y down); egos are passed in as their
positions (E, 2), m.
"""

from __future__ import annotations

import math

import numpy as np
from highway_env.road.lane import AbstractLane
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.maps import MapSpec
from dwm.world.placement import blocking, is_leaving, plan_route, random_place
from dwm.world.traffic import TrafficCar
from dwm.world.traffic_road import TrafficRoad

RECYCLE_BEYOND_VIEW_M = 60.0  # endless map: traffic this far beyond every ego's view re-enters
ENTRY_EGO_CLEARANCE_M = 30.0  # re-entering traffic never appears closer than this to an ego
NEIGHBOURHOOD_M = 60.0  # traffic entering is no faster than the vehicles this close
STOPPED_SPEED = 0.5  # m/s: a vehicle slower than this stands still
STUCK_S = 120.0  # traffic standing still this long is taken out (a jam nobody can resolve)


class EmbeddedTraffic:
    """The traffic vehicles on `road`, which they share with the egos.

    spec: the map; exits: its exit roads (`dwm.world.maps.exit_roads`); rng: spawn places,
    speeds and routes, the generator the egos' placement draws from too; count: traffic
    vehicles; truck_ratio: share of them that are trucks; view_range: m an ego sees;
    dt: s per tick.
    """

    def __init__(
        self,
        spec: MapSpec,
        road: TrafficRoad,
        exits: set[tuple[str, str]],
        rng: np.random.Generator,
        count: int,
        truck_ratio: float,
        view_range: float,
        dt: float,
    ):
        self._spec, self._road, self._exits, self._rng = spec, road, exits, rng
        self.view_range, self.dt = view_range, dt
        self.recycle_m = view_range + RECYCLE_BEYOND_VIEW_M  # m from every ego: taken out beyond
        self._standing: dict[Vehicle, float] = {}  # s each traffic vehicle has stood still
        # Trucks spread evenly over the slots; a slot keeps its category for good.
        self._categories = [
            "truck" if math.floor((i + 1) * truck_ratio) > math.floor(i * truck_ratio) else "car"
            for i in range(count)
        ]
        self._slots: list[TrafficCar | None] = [None] * count

    def holds(self, v: Vehicle) -> bool:
        """`v` is one of the traffic vehicles (not an ego)."""
        return v in self._slots

    def recycle(self, v: TrafficCar) -> None:
        """Take `v` off the road; its slot is refilled elsewhere by `fill`."""
        self._slots[self._slots.index(v)] = None
        self._road.vehicles.remove(v)
        self._standing.pop(v, None)

    def clear(self) -> None:
        """Forget every traffic vehicle (the road's vehicles are cleared by its owner)."""
        self._slots = [None] * len(self._slots)

    # ------------------------------------------------------------------ taking out

    def recycle_around(self, egos: np.ndarray) -> None:
        """Take out traffic that leaves the map or stood still too long, and on the endless road
        traffic far from every ego (egos (E, 2)) or beyond an ego's share; `fill` brings it
        back."""
        anchors = self._anchors(egos)
        for v in self._slots:
            if v is None:
                continue
            self._standing[v] = self._standing.get(v, 0.0) + self.dt if abs(v.speed) < STOPPED_SPEED else 0.0
            nearest_ego = np.min(np.linalg.norm(anchors - v.position, axis=1))
            far = self._spec.endless and nearest_ego > self.recycle_m
            if far or is_leaving(v, self._exits) or self._standing[v] > STUCK_S:
                self.recycle(v)
        if not (self._spec.endless and len(anchors) > 1):
            return
        # Each ego keeps its share; extra vehicles out of every ego's view move to egos with few.
        present = [i for i, v in enumerate(self._slots) if v is not None]
        if not present:
            return
        positions = np.array([self._slots[i].position for i in present])
        dist = np.linalg.norm(positions[:, None] - anchors[None], axis=-1)  # (V, A)
        nearest = np.argmin(dist, axis=1)
        share = math.ceil(len(self._slots) / len(anchors))
        for a in range(len(anchors)):
            mine = np.flatnonzero(nearest == a)
            hidden = mine[np.min(dist[mine], axis=1) > self.view_range]
            extra = len(mine) - share
            for k in hidden[np.argsort(-dist[hidden, a], kind="stable")][: max(extra, 0)]:
                self.recycle(self._slots[present[k]])

    # ------------------------------------------------------------------ entering

    def fill(self, egos: np.ndarray, tries: int, initial: bool) -> None:
        """Spawn a vehicle into each empty slot, with up to `tries` places tried each. initial:
        the world starts (traffic fills the map; no clearance to the egos (E, 2) needed)."""
        for i, v in enumerate(self._slots):
            if v is None:
                self._slots[i] = self._spawn(self._categories[i], egos, tries, initial)

    def _spawn(self, category: str, egos: np.ndarray, tries: int, initial: bool) -> TrafficCar | None:
        vehicles = self._road.vehicles
        positions = np.array([v.position for v in vehicles]).reshape(-1, 2)
        speeds = np.array([max(v.speed, 0.0) for v in vehicles], dtype=np.float64)
        for _ in range(tries):
            cruise = float(self._rng.uniform(*self._spec.cruise_speed))
            cruise *= 0.85 if category == "truck" else 1.0
            if self._spec.endless:
                lane, s = self._place_near_egos(egos, initial)
            else:
                areas = self._spec.traffic_areas if initial else self._spec.entry_areas
                lane, s = random_place(self._road.network, areas, self._rng)
            if lane is None:
                continue
            xy = lane.position(s, 0.0)
            d2 = np.sum((positions - xy) ** 2, axis=1)
            # Enter no faster than the traffic around, so that nobody has to brake hard for it.
            speed = float(min([cruise, *speeds[d2 < NEIGHBOURHOOD_M**2]]))
            if blocking(vehicles, xy, lane.heading_at(s), category, speed).any():
                continue
            if not initial and np.any(np.sum((egos - xy) ** 2, axis=1) < ENTRY_EGO_CLEARANCE_M**2):
                continue
            car = TrafficCar(self._road, xy, lane.heading_at(s), speed, category, cruise_speed=cruise)
            plan_route(car, self._spec.destinations, self._rng)
            car.randomize_behavior()
            vehicles.append(car)
            return car
        return None

    def _anchors(self, egos: np.ndarray) -> np.ndarray:
        """(A, 2) positions that traffic gathers around: the egos, or with none, the middle of
        the first ego area."""
        if len(egos):
            return egos
        area = self._spec.ego_areas[0]
        lane = self._road.network.get_lane((area.from_node, area.to_node, 0))
        return lane.position((area.s_min + area.s_max) / 2, 0.0)[None]

    def _place_near_egos(self, egos: np.ndarray, initial: bool) -> tuple[AbstractLane | None, float]:
        """Endless road: a lane and s around the anchor with the least traffic; on entering,
        just beyond the view so that nobody sees the vehicle appear."""
        anchors = self._anchors(egos)
        present = np.array([v.position for v in self._slots if v is not None]).reshape(-1, 2)
        counts = np.zeros(len(anchors), dtype=int)
        if len(present) and len(anchors) > 1:
            nearest = np.argmin(np.linalg.norm(present[:, None] - anchors[None], axis=-1), axis=1)
            counts = np.bincount(nearest, minlength=len(anchors))
        fewest = np.flatnonzero(counts == counts.min())
        anchor = anchors[fewest[self._rng.integers(len(fewest))]]
        if initial:
            offset = self._rng.uniform(-1.0, 1.0) * (self.recycle_m - 10.0)
        else:
            side = self._rng.choice([-1.0, 1.0])
            offset = side * self._rng.uniform(self.view_range + 10.0, self.recycle_m - 10.0)
        area = self._spec.ego_areas[0]
        road = self._road.network.graph[area.from_node][area.to_node]
        lane = road[self._rng.integers(len(road))]
        s = lane.local_coordinates(anchor)[0] + offset
        if not 0.0 <= s <= lane.length:
            return None, 0.0
        return lane, float(s)
