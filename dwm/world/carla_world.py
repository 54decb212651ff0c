"""The Carla world: a real Carla 0.9.15/0.9.16 server, one hero car per driving session.

We are the server's only ticking client (synchronous mode, `fixed_delta_seconds` per tick, the
traffic manager in sync mode on its own port). Observations are those of the embedded world:
actors within `view_range` of the ego as oriented boxes, the town's lane lines, road edges and
crosswalks within `map_range`, weather words for captions. Everything is turned into our
right-handed frame with `dwm.world.carla_pose` (Carla is left-handed).

Heroes are named `hero` while there is one, `hero-<ego id>` when others exist, so the
reference's keyboard client still finds a single hero. A server that goes away raises
`WorldUnavailableError` (the message says what happened) and later calls reconnect with
back-off; after reconnecting, traffic and heroes (same ids, controls, autopilot) are spawned
anew. Everything we spawned is destroyed and the world's settings restored on `close`, also at
interpreter exit (Ctrl-C, an exception).

This class holds the egos and the order of things; the parts live beside it: the connection
and reconnection in `carla_client`, the heroes and their cameras in `carla_heroes`, the scene of
a tick in `carla_scene`, the town's map, description and spawn points in `carla_town`, the NPCs
in `carla_traffic`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import random
import weakref
from collections.abc import Mapping

from dwm.world.base import Observation, UnknownEgoError, VehicleControl, World
from dwm.world.carla_client import Backoff, CarlaConnection, ServerLink, import_carla, quietly, server_address
from dwm.world.carla_heroes import Hero, HeroSpawner, carla_control, our_control
from dwm.world.carla_pose import world_from_carla_vehicle
from dwm.world.carla_scene import CarlaScene, SceneReader
from dwm.world.carla_town import carla_weather, spawn_points, town_description, town_geometry
from dwm.world.carla_traffic import Traffic

log = logging.getLogger(__name__)


class CarlaWorld(World):
    """Arguments are the keys of `conf/world/carla.yaml` (see there for units and defaults)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2000, timeout: float = 10.0, town: str | None = None,
                 fixed_delta_seconds: float = 0.1, tm_port: int = 8000, vehicles: int = 20, walkers: int = 10,
                 seed: int = 0, view_range: float = 80.0, map_range: float = 100.0, map_step: float = 1.0,
                 weather: str | Mapping | None = None, environment: str | None = None,
                 hero_blueprint: str = "vehicle.lincoln.mkz_2017", hero_spawn_index: int = 1,
                 vehicle_filter: str = "vehicle.*", walker_filter: str = "walker.pedestrian.*",
                 walker_speed: float = 1.4, attach_cameras: bool = False, rig: Mapping | None = None,
                 reconnect: Mapping | None = None):
        self._address = server_address(host, port, tm_port, timeout)
        self.dt = _positive("fixed_delta_seconds", fixed_delta_seconds, upper=1.0)
        self.view_range = _positive("view_range", view_range)
        self.map_range = _positive("map_range", map_range)
        self.map_step = _positive("map_step", map_step)
        self.walker_speed = _positive("walker_speed", walker_speed)
        self._counts = {k: _count(k, v) for k, v in (("vehicles", vehicles), ("walkers", walkers), ("seed", seed),
                                                      ("hero_spawn_index", hero_spawn_index))}
        if town is not None and not isinstance(town, str):
            raise ValueError(f"world.town={town!r} must be a map name such as Town10HD_Opt, or null")
        if environment is not None and not isinstance(environment, str):
            raise ValueError(f"world.environment={environment!r} must be a text or null")
        if not isinstance(attach_cameras, bool):
            raise ValueError(f"world.attach_cameras={attach_cameras!r} must be true or false")
        if attach_cameras and not (isinstance(rig, Mapping) and rig.get("cameras")):
            raise ValueError("world.attach_cameras=true needs world.rig (the camera rig, ${rig})")
        self._environment, self._weather_config = environment, weather
        self._hero_blueprint, self._vehicle_filter, self._walker_filter = hero_blueprint, vehicle_filter, walker_filter
        self._rig = rig if attach_cameras else None
        backoff = Backoff(**dict(reconnect or {}))

        self._carla = import_carla()
        self._conn = CarlaConnection(self._address, town, self.dt, self._counts["seed"])
        self._link = ServerLink(self._conn, backoff)
        self._rng = random.Random(self._counts["seed"])
        self._heroes: dict[str, Hero] = {}
        self._next_ego = 1
        self._steps = 0
        self._orphans: set[int] = set()  # ids of our actors left on a server that went away
        self._scene: CarlaScene | None = None
        self._conn.connect()
        try:
            self._weather_config = carla_weather(self._carla, self._conn.world, weather)
            self._set_up()
        except BaseException:
            self.close()
            raise
        atexit.register(_close_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ egos

    def add_ego(self, ego_id: str | None = None) -> str:
        if ego_id is None:
            while f"ego-{self._next_ego}" in self._heroes:
                self._next_ego += 1
            ego_id, self._next_ego = f"ego-{self._next_ego}", self._next_ego + 1
        if not isinstance(ego_id, str) or not ego_id:
            raise ValueError(f"ego id {ego_id!r} must be a non-empty text")
        if ego_id in self._heroes:
            raise ValueError(f"ego {ego_id!r} already exists; egos in this world: {', '.join(self._heroes)}")
        with self._server_call():
            role = "hero" if not self._heroes else f"hero-{ego_id}"
            self._heroes[ego_id] = self._spawn_hero(role, VehicleControl(), autopilot=False)
        return ego_id

    def remove_ego(self, ego_id: str) -> None:
        hero = self._hero(ego_id)
        del self._heroes[ego_id]
        self._scene = None
        if self._link.down:  # destroyed once the server is back
            self._orphans |= hero.ids()
        else:
            with self._server_call():
                hero.destroy(self._address.tm_port)

    def egos(self) -> list[str]:
        return list(self._heroes)

    def apply_control(self, ego_id: str, control: VehicleControl) -> None:
        """Held until the next call (Carla's controls are sticky); on autopilot only kept."""
        hero = self._hero(ego_id)
        if not isinstance(control, VehicleControl):
            raise ValueError(f"control must be a VehicleControl, got {type(control).__name__}")
        hero.control = control
        if not hero.autopilot:
            with self._server_call():
                hero.actor.apply_control(carla_control(self._carla, control))

    def set_autopilot(self, ego_id: str, enabled: bool) -> None:
        hero = self._hero(ego_id)
        if not isinstance(enabled, bool):
            raise ValueError(f"autopilot must be true or false, got {enabled!r}")
        if enabled == hero.autopilot:
            return
        with self._server_call():
            if not enabled:
                hero.control = our_control(hero.actor.get_control())  # the autopilot's last stays applied
            hero.actor.set_autopilot(enabled, self._address.tm_port)
            hero.autopilot = enabled

    # ------------------------------------------------------------------ time

    @property
    def sim_time(self) -> float:
        return self._steps * self.dt

    def tick(self) -> float:
        with self._server_call():
            self._conn.world.tick()
            self._steps += 1
            self._scene = None
            snapshot = self._conn.world.get_snapshot()
            self._traffic.update({s.id: s.get_transform().location for s in snapshot})
        return self.sim_time

    # ------------------------------------------------------------------ observation

    def observe(self, ego_id: str) -> Observation:
        hero = self._hero(ego_id)
        with self._server_call():
            scene = self._scene or self._scene_reader.read()
            transform, velocity = hero.state(self._conn.world, self._carla)
        loc, rot = transform.location, transform.rotation
        pose = world_from_carla_vehicle([loc.x, loc.y, loc.z], [rot.pitch, rot.yaw, rot.roll])
        forward = transform.get_forward_vector()
        speed = velocity.x * forward.x + velocity.y * forward.y + velocity.z * forward.z  # m/s, signed
        rear_axle = pose[:2, 3]
        control = our_control(hero.actor.get_control()) if hero.autopilot else hero.control
        return Observation(
            ego_id=ego_id,
            sim_time=self.sim_time,
            ego_pose=pose,
            ego_speed=float(speed),
            boxes=scene.around(rear_axle, self.view_range, hero.actor.id),
            map_lines=self._geometry.near(rear_axle, self.map_range),
            weather=scene.weather,
            environment=self._description,
            control=control,
            autopilot=hero.autopilot,
            camera_images=hero.pictures(scene.frame, self._address.timeout) if hero.cameras else None,
        )

    def close(self) -> None:
        """Destroy what we spawned and give the world its settings back; safe to call twice."""
        if self._link.closed:
            return
        self._link.closed = True
        if self._conn.world is None or self._link.down:
            return
        try:
            for hero in self._heroes.values():
                hero.destroy(self._address.tm_port)
            if hasattr(self, "_traffic"):
                self._traffic.destroy()
            self._conn.world.tick()  # let the server process the destructions in sync mode
        except RuntimeError as err:
            log.warning("Carla cleanup stopped: %s", err)
        finally:
            with contextlib.suppress(RuntimeError):
                self._conn.release()

    # ------------------------------------------------------------------ internals

    def _server_call(self):
        """Context for client calls: reconnects first when the server was lost; a lost
        connection becomes a WorldUnavailableError with a message for the user."""
        return self._link.call(self._reconnected)

    def _reconnected(self) -> None:
        # A server that only dropped the connection still holds our actors: clear them.
        for actor in self._conn.world.get_actors(sorted(self._spawned_ids())):
            quietly(actor.destroy)
        self._orphans.clear()
        self._set_up()

    def _set_up(self) -> None:
        """Map geometry, weather, traffic and (after a reconnection) the heroes, anew."""
        world = self._conn.world
        try:
            world.get_blueprint_library().find(self._hero_blueprint)
        except IndexError:
            raise ValueError(f"world.hero_blueprint={self._hero_blueprint!r} is not a blueprint of this server") from None
        town = world.get_map()
        self._geometry = town_geometry(town, self.map_step)
        self._description = self._environment or town_description(town)
        if self._weather_config is not None:
            world.set_weather(self._weather_config)
        if hasattr(world, "set_pedestrians_seed"):
            world.set_pedestrians_seed(self._counts["seed"])
        self._spawn_points = spawn_points(self._carla, town)
        self._scene_reader = SceneReader(world)
        self._scene = None
        self._spawner = HeroSpawner(self._carla, world, self._hero_blueprint, self._address.tm_port,
                                    self._spawn_points, self._counts["hero_spawn_index"], self._rig)
        old = list(self._heroes.items())
        self._heroes = {}
        for ego_id, hero in old:  # after a reconnection: the same egos, at new places
            self._heroes[ego_id] = self._spawn_hero(hero.role, hero.control, hero.autopilot)
        self._traffic = Traffic(self._carla, world, self._address.tm_port, self._rng, self._vehicle_filter,
                                self._walker_filter, self.walker_speed)
        # The first hero's place (hero_spawn_index) and those of heroes already back stay free.
        reserved = {id(h.spawn_transform) for h in self._heroes.values()}
        if self._spawn_points:
            reserved.add(id(self._spawn_points[self._counts["hero_spawn_index"] % len(self._spawn_points)]))
        free = [p for p in self._spawn_points if id(p) not in reserved]
        self._traffic.spawn(self._counts["vehicles"], self._counts["walkers"], free)

    def _spawn_hero(self, role: str, control: VehicleControl, autopilot: bool) -> Hero:
        taken = [h.spawn_transform for h in self._heroes.values()]
        hero = self._spawner.spawn(role, control, autopilot, taken)
        self._scene = None
        return hero

    def _spawned_ids(self) -> set[int]:
        ids = set(self._orphans) | (self._traffic.ids() if hasattr(self, "_traffic") else set())
        for hero in self._heroes.values():
            ids |= hero.ids()
        return ids

    def _hero(self, ego_id: str) -> Hero:
        try:
            return self._heroes[ego_id]
        except (KeyError, TypeError):
            raise UnknownEgoError(ego_id, list(self._heroes)) from None


def _positive(name: str, value, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= upper:
        raise ValueError(f"world.{name}={value!r} must be a number in (0, {upper:g}]")
    return float(value)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"world.{name}={value!r} must be an integer >= 0")
    return value


def _close_at_exit(ref) -> None:
    world = ref()
    if world is not None:
        world.close()
