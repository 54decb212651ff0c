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

This class holds the egos and the order of a tick; the parts live beside it: the traffic in
`embedded_traffic`, crashes in `collisions`, the endless highway's shift in `endless_road`,
places and routes in `placement`, what an ego sees in `embedded_scene`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from highway_env.road.lane import AbstractLane
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.base import Observation, UnknownEgoError, VehicleControl, Weather, World
from dwm.world.camera import SceneCamera
from dwm.world.collisions import CrashRelease
from dwm.world.ego_car import EgoCar, control_from_motion
from dwm.world.embedded_scene import EmbeddedScene
from dwm.world.embedded_traffic import EmbeddedTraffic
from dwm.world.endless_road import scene_shift
from dwm.world.maps import build_road, exit_roads, map_geometry, map_spec, road_surface
from dwm.world.placement import blocking, extend_route, is_leaving, plan_route, random_place
from dwm.world.rig import CameraRig
from dwm.world.traffic import TrafficCar

OFF_MAP_M = 20.0  # an ego this far from every lane has left the map
INITIAL_SPAWN_TRIES = 30  # per traffic vehicle when the world starts
SPAWN_TRIES_PER_TICK = 3  # per missing traffic vehicle and tick
EGO_SPAWN_TRIES = 60
MAX_DT = 0.2  # s: highway-env's heading controller (time constant 0.2 s) oscillates beyond


@dataclass
class _Ego:
    vehicle: Vehicle  # EgoCar, or TrafficCar while on autopilot
    control: VehicleControl  # the held manual control
    autopilot: bool = False


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
    map: highway | merge | roundabout | intersection, or the path of an OpenDRIVE file (needs
    Carla's client package, `dwm.world.opendrive_map`); vehicles: traffic besides the egos;
    truck_ratio: share of that traffic that is trucks; dt: s per tick; seed: int >= 0;
    view_range: m around an ego within which actors and map lines are observed;
    environment: caption scene description (None: the map's own); weather: `Weather` fields;
    attach_cameras: every observation carries a rasterised picture from each camera of `rig`
    (a rig config node, `conf/rig/*.yaml`) at its native size (`dwm.world.camera`), as Carla's
    RGB cameras do with the same keys.
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
        attach_cameras: bool = False,
        rig: Mapping | None = None,
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
        if not isinstance(attach_cameras, bool):
            raise ValueError(f"world.attach_cameras={attach_cameras!r} must be true or false")
        if attach_cameras and not (isinstance(rig, Mapping) and rig.get("cameras")):
            raise ValueError("world.attach_cameras=true needs world.rig (the camera rig, ${rig})")

        # Separate streams: where things spawn, and highway-env's own behaviour randomness.
        spawn_seq, road_seq = np.random.SeedSequence(seed).spawn(2)
        self._rng = np.random.default_rng(spawn_seq)
        self._road = build_road(self._spec, np.random.default_rng(road_seq), self.dt)
        self._network = self._road.network
        self._lanes: list[AbstractLane] = self._network.lanes_list()
        self._exits = exit_roads(self._spec, self._network)
        self._geometry = self._spec.geometry or map_geometry(self._spec.name)
        self.camera = SceneCamera(CameraRig.from_config(rig)) if attach_cameras else None
        self._road_surface = road_surface(self._network) if attach_cameras else None
        self._road_centres = self._road_surface[:, :, :2].mean(axis=1) if attach_cameras else None
        self._paints = itertools.count()  # each vehicle's paint, in the order they are first seen

        self._egos: dict[str, _Ego] = {}
        self._next_ego = 1
        self._steps = 0
        self._crashes = CrashRelease(self.dt)
        self._scene: EmbeddedScene | None = None  # taken at the first observation of a tick
        self._traffic = EmbeddedTraffic(self._spec, self._road, self._exits, self._rng, count, ratio, self.view_range,
                                        self.dt)
        self._traffic.fill(self._ego_positions(), INITIAL_SPAWN_TRIES, initial=True)

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
        self._scene = None
        return ego_id

    def remove_ego(self, ego_id: str) -> None:
        ego = self._ego(ego_id)
        self._road.vehicles.remove(ego.vehicle)
        del self._egos[ego_id]
        self._scene = None

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
        self._scene = None

    # ------------------------------------------------------------------ time

    @property
    def sim_time(self) -> float:
        return self._steps * self.dt

    def tick(self) -> float:
        if self._spec.random_routes:
            for v in self._road.vehicles:
                if isinstance(v, TrafficCar):
                    extend_route(v, self._network, self._rng)
        self._road.act()
        self._road.step(self.dt)
        self._steps += 1
        self._crashes.release(self._road.vehicles, self._traffic)
        if self._spec.endless:
            self._move_scene_back()
        self._keep_egos_on_map()
        egos = self._ego_positions()
        self._traffic.recycle_around(egos)
        self._traffic.fill(egos, SPAWN_TRIES_PER_TICK, initial=False)
        self._scene = None
        return self.sim_time

    # ------------------------------------------------------------------ observation

    def observe(self, ego_id: str) -> Observation:
        ego = self._ego(ego_id)
        if self._scene is None:
            self._scene = EmbeddedScene.of(self._road.vehicles)
        pose, boxes, rows = self._scene.seen_by(ego.vehicle, self.view_range)
        map_lines = self._geometry.near(pose[:2, 3], self.view_range)
        return Observation(
            ego_id=ego_id,
            sim_time=self.sim_time,
            ego_pose=pose,
            ego_speed=float(ego.vehicle.speed),
            boxes=boxes,
            map_lines=map_lines,
            weather=self.weather,
            environment=self.environment,
            control=self._effective_control(ego),
            autopilot=ego.autopilot,
            lane_offset=self._lane_offset(ego.vehicle),
            camera_images=self._pictures(pose, boxes, rows, map_lines) if self.camera else None,
        )

    def _pictures(self, pose: np.ndarray, boxes, rows: np.ndarray, map_lines) -> dict[str, np.ndarray]:
        """Each camera's picture (H, W, 3) uint8 of what an ego at `pose` sees: `boxes` (the
        vehicles at scene `rows`) and `map_lines`, on the road surface around it."""
        for v in self._road.vehicles:
            if not hasattr(v, "paint"):
                v.paint = next(self._paints)
        paints = np.array([self._road.vehicles[r].paint for r in rows], dtype=np.int64)
        near = np.sum((self._road_centres - pose[:2, 3]) ** 2, axis=1) <= (self.view_range + 10.0) ** 2
        images = self.camera.render(pose, boxes, paints, map_lines, self._road_surface[near], self.weather)
        return dict(zip(self.camera.rig.names, images))

    def close(self) -> None:
        self._road.vehicles.clear()
        self._egos.clear()
        self._traffic.clear()
        self._scene = None

    # ------------------------------------------------------------------ internals

    def _ego(self, ego_id: str) -> _Ego:
        try:
            return self._egos[ego_id]
        except (KeyError, TypeError):
            raise UnknownEgoError(ego_id, list(self._egos)) from None

    def _ego_positions(self) -> np.ndarray:
        """(E, 2) highway-env positions of the egos' vehicles, m (copies)."""
        return np.array([e.vehicle.position for e in self._egos.values()]).reshape(-1, 2)

    @staticmethod
    def _lane_offset(v: Vehicle) -> float:
        """m from the centre of the lane highway-env puts `v` on (the nearest), positive left.
        highway-env's lateral axis points right of the lane's direction in the world frame
        (its y is the world's -y), hence the sign."""
        return 0.0 - float(v.lane.local_coordinates(v.position)[1])  # never -0.0

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
        plan_route(car, self._spec.destinations, self._rng)
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
                lane, s = random_place(self._network, self._spec.ego_areas, self._rng)
                xy, heading = lane.position(s, 0.0), lane.heading_at(s)
                if not blocking(blockers, xy, heading, "car", speed).any():
                    traffic = [v for v in others if self._traffic.holds(v)]
                    for v, blocks in zip(traffic, blocking(traffic, xy, heading, "car", speed)):
                        if blocks:
                            self._traffic.recycle(v)
                    return lane, s, speed
        raise RuntimeError(
            f"no free place to spawn an ego on the {self._spec.name} map: its {len(self._egos)} egos fill it"
        )

    def _keep_egos_on_map(self) -> None:
        for ego in self._egos.values():
            v = ego.vehicle
            leaving = ego.autopilot and is_leaving(v, self._exits)
            off_map = v.lane.distance(v.position) > OFF_MAP_M and min(
                lane.distance(v.position) for lane in self._lanes) > OFF_MAP_M
            if leaving or off_map:
                new = self._make_ego_vehicle(self._place_ego(ignore=v), ego.control, ego.autopilot)
                self._replace_vehicle(v, new)
                ego.vehicle = new

    def _move_scene_back(self) -> None:
        """Endless road: once an ego nears the end, move every vehicle back along the road."""
        ego_xs = [e.vehicle.position[0] for e in self._egos.values()]
        shift = scene_shift(ego_xs, self._lanes[0].length, self._traffic.recycle_m)
        if shift:
            for v in self._road.vehicles:
                v.position[0] -= shift

    def _replace_vehicle(self, old: Vehicle, new: Vehicle) -> None:
        """Swap a vehicle in place, so that the stepping order (and determinism) is kept."""
        self._road.vehicles[self._road.vehicles.index(old)] = new
        if hasattr(old, "paint"):
            new.paint = old.paint
        self._crashes.moved(old, new)
