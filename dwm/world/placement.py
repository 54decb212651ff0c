"""Where vehicles go on an embedded map: random places in its spawn areas, whether a place is
free, whether a vehicle is leaving the map by an exit, and random routes.

Shared by the egos and the traffic of `dwm.world.embedded`; every random draw comes from the
generator passed in, so that the caller decides the order of draws (and with it determinism).
Everything here is in highway-env's screen frame (y down).
"""

from __future__ import annotations

import math

import numpy as np
from highway_env.road.lane import AbstractLane
from highway_env.road.road import RoadNetwork
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.maps import SpawnArea
from dwm.world.traffic import CATEGORY_SIZES, TrafficCar


def random_place(
    network: RoadNetwork, areas: tuple[SpawnArea, ...], rng: np.random.Generator
) -> tuple[AbstractLane, float]:
    """A random lane of a random area and a random s (m) along it within the area."""
    area = areas[rng.integers(len(areas))]
    road = network.graph[area.from_node][area.to_node]
    lane = road[rng.integers(len(road))]
    s = rng.uniform(area.s_min, min(area.s_max, lane.length))
    return lane, float(s)


def blocking(
    vehicles: list[Vehicle], xy: np.ndarray, heading: float, category: str, speed: float
) -> np.ndarray:
    """Mask (N,) of the vehicles too close to place a vehicle of `category` at `xy`, `heading`
    moving at `speed` m/s: within its lane-wide box with a bumper gap of 5 m + 0.6 s at that
    speed ahead and behind (behind, 1.5 s more at the speed a vehicle coming on gains on it), or
    touching it whatever their lane."""
    if not vehicles:
        return np.zeros(0, dtype=bool)
    rel = np.array([v.position for v in vehicles]) - xy  # (N, 2)
    lengths = np.array([v.LENGTH for v in vehicles])
    widths = np.array([v.WIDTH for v in vehicles])
    forward = np.array([math.cos(heading), math.sin(heading)])
    lon = rel @ forward
    lat = rel @ np.array([-math.sin(heading), math.cos(heading)])
    coming = np.maximum(np.array([v.speed for v in vehicles]) * (np.array([v.direction for v in vehicles]) @ forward), 0.0)
    length, width, _ = CATEGORY_SIZES[category]
    half = (lengths + length) / 2
    closing = np.maximum(coming - abs(speed), 0.0)  # m/s a vehicle behind gains on the new one
    gap = 0.6 * abs(speed) + np.where(lon < 0.0, 1.5 * closing, 0.0)
    in_box = (np.abs(lon) < half + 5.0 + gap) & (np.abs(lat) < (widths + width) / 2 + 1.0)
    return in_box | (np.hypot(lon, lat) < half + 3.0)


def is_leaving(v: Vehicle, exits: set[tuple[str, str]]) -> bool:
    """`v` reaches the end of an exit road (`dwm.world.maps.exit_roads`): it leaves the map."""
    if v.lane_index[:2] not in exits:
        return False
    return v.lane.local_coordinates(v.position)[0] >= v.lane.length - v.LENGTH


def plan_route(car: TrafficCar, destinations: tuple[str, ...], rng: np.random.Generator) -> None:
    """Route `car` to a random destination node other than the road it came from (no route
    and no draw when there is none: it follows the road)."""
    origin = car.lane_index[0]
    targets = [d for d in destinations if d != origin]
    if targets:
        car.plan_route_to(targets[rng.integers(len(targets))])


ROUTE_AHEAD = 3  # lanes drawn ahead of a car's lane on maps with random routes


def extend_route(car: TrafficCar, network: RoadNetwork, rng: np.random.Generator) -> None:
    """Keep `car`'s route `ROUTE_AHEAD` lanes ahead of the lane it follows, each next lane drawn
    at random among those the last one leads to; a route that no longer starts at that lane
    (the car changed lanes) is drawn anew. A dead end ends the route."""
    lane = car.target_lane_index
    route = car.route if car.route and car.route[0][:2] == lane[:2] else [lane]
    while len(route) <= ROUTE_AHEAD:
        nexts = network.graph.get(route[-1][1], {})
        options = [(route[-1][1], b, i) for b, lanes in nexts.items() for i in range(len(lanes))]
        if not options:
            break
        route.append(options[int(rng.integers(len(options)))])
    car.route = route
