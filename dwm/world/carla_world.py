"""The Carla world: a real Carla 0.9.15/0.9.16 server, one hero car per driving session.

We are the server's only ticking client (synchronous mode, `fixed_delta_seconds` per tick, the
traffic manager in sync mode on its own port). Observations are those of the embedded world:
actors within `view_range` of the ego as oriented boxes, the town's lane lines, road edges and
crosswalks within `map_range`, weather words for captions. Everything is turned into our
right-handed frame here, with `dwm.conditions.carla_pose` (Carla is left-handed).

Heroes are named `hero` while there is one, `hero-<ego id>` when others exist, so the
reference's keyboard client still finds a single hero. A server that goes away raises
`WorldUnavailableError` (the message says what happened) and later calls reconnect with
back-off; after reconnecting, traffic and heroes (same ids, controls, autopilot) are spawned
anew. Everything we spawned is destroyed and the world's settings restored on `close`, also at
interpreter exit (Ctrl-C, an exception).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import math
import random
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from dwm.conditions.carla_pose import carla_transform_matrix, from_carla_points, from_carla_yaw, world_from_carla_vehicle
from dwm.world.base import Boxes, Observation, UnknownEgoError, VehicleControl, Weather, World, WorldUnavailableError
from dwm.world.carla_client import (
    Backoff,
    CarlaConnection,
    import_carla,
    is_connection_error,
    server_address,
)
from dwm.world.carla_map import extract_map
from dwm.world.carla_traffic import Traffic, _quietly
from dwm.world.maps import MapGeometry

log = logging.getLogger(__name__)

VEHICLE_BASE_TYPES = ("car", "van", "truck", "bus", "motorcycle", "bicycle")
TOWN_DESCRIPTIONS = {  # caption scene descriptions; the reference's for Town10
    "Town10HD": "A downtown urban environment with skyscrapers, residential buildings and an ocean promenade.",
}
DEFAULT_DESCRIPTION = "A town with streets, buildings, sidewalks and trees."
_MAPS: dict[str, MapGeometry] = {}  # town name + OpenDRIVE digest -> its geometry, once per process


def vehicle_category(attributes: Mapping[str, str]) -> str:
    """Box category of a vehicle from its blueprint attributes: `base_type` where Carla gives
    one, else two wheels make a motorcycle and more a car."""
    base = str(attributes.get("base_type", "")).lower()
    if base in VEHICLE_BASE_TYPES:
        return base
    return "motorcycle" if str(attributes.get("number_of_wheels", "4")) == "2" else "car"


@dataclass
class _Kind:
    """What a seen actor is, read once: category (None: not boxed), box in the actor's frame."""

    category: str | None
    bbox_location: tuple = (0.0, 0.0, 0.0)  # Carla actor frame, m
    bbox_extent: tuple = (0.0, 0.0, 0.0)  # half sizes, m
    bbox_yaw: float = 0.0  # deg


@dataclass
class _Hero:
    actor: object
    role: str
    control: VehicleControl = field(default_factory=VehicleControl)
    autopilot: bool = False
    spawn_transform: object = None  # pose until the first tick shows it
    cameras: list = field(default_factory=list)
    images: dict = field(default_factory=dict)  # camera name -> (frame, (H, W, 3) uint8 RGB)


@dataclass
class _Scene:
    """Every boxed actor at the current tick, our frame (N actors)."""

    ids: np.ndarray  # (N,)
    centers: np.ndarray  # (N, 3) m, box centres
    sizes: np.ndarray  # (N, 3) m, full length, width, height
    yaws: np.ndarray  # (N,) rad
    categories: list[str]
    frame: int
    weather: Weather


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
        self._backoff = Backoff(**dict(reconnect or {}))

        self._carla = import_carla()
        self._conn = CarlaConnection(self._address, town, self.dt, self._counts["seed"])
        self._rng = random.Random(self._counts["seed"])
        self._heroes: dict[str, _Hero] = {}
        self._next_ego = 1
        self._steps = 0
        self._kinds: dict[int, _Kind] = {}
        self._orphans: set[int] = set()  # ids of our actors left on a server that went away
        self._scene: _Scene | None = None
        self._closed = False
        self._conn.connect()
        try:
            self._weather_config = self._resolve_weather(weather)
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
        if self._backoff.down:  # destroyed once the server is back
            self._orphans |= {hero.actor.id, *(c.id for c in hero.cameras)}
        else:
            with self._server_call():
                self._destroy_hero(hero)

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
                hero.actor.apply_control(self._carla_control(control))

    def set_autopilot(self, ego_id: str, enabled: bool) -> None:
        hero = self._hero(ego_id)
        if not isinstance(enabled, bool):
            raise ValueError(f"autopilot must be true or false, got {enabled!r}")
        if enabled == hero.autopilot:
            return
        with self._server_call():
            if not enabled:
                hero.control = _our_control(hero.actor.get_control())  # the autopilot's last stays applied
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
            scene = self._scene or self._take_scene()
            transform, velocity = self._hero_state(hero)
        loc, rot = transform.location, transform.rotation
        pose = world_from_carla_vehicle([loc.x, loc.y, loc.z], [rot.pitch, rot.yaw, rot.roll])
        forward = transform.get_forward_vector()
        speed = velocity.x * forward.x + velocity.y * forward.y + velocity.z * forward.z  # m/s, signed
        rear_axle = pose[:2, 3]
        near = np.sum((scene.centers[:, :2] - rear_axle) ** 2, axis=1) <= self.view_range**2
        near &= scene.ids != hero.actor.id
        rows = np.flatnonzero(near)
        boxes = Boxes(scene.centers[rows], scene.sizes[rows], scene.yaws[rows], [scene.categories[r] for r in rows])
        control = _our_control(hero.actor.get_control()) if hero.autopilot else hero.control
        return Observation(
            ego_id=ego_id,
            sim_time=self.sim_time,
            ego_pose=pose,
            ego_speed=float(speed),
            boxes=boxes,
            map_lines=self._geometry.near(rear_axle, self.map_range),
            weather=scene.weather,
            environment=self._description,
            control=control,
            autopilot=hero.autopilot,
            camera_images=self._camera_images(hero, scene.frame) if hero.cameras else None,
        )

    def close(self) -> None:
        """Destroy what we spawned and give the world its settings back; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._conn.world is None or self._backoff.down:
            return
        try:
            for hero in self._heroes.values():
                self._destroy_hero(hero)
            if hasattr(self, "_traffic"):
                self._traffic.destroy()
            self._conn.world.tick()  # let the server process the destructions in sync mode
        except RuntimeError as err:
            log.warning("Carla cleanup stopped: %s", err)
        finally:
            with contextlib.suppress(RuntimeError):
                self._conn.release()

    # ------------------------------------------------------------------ internals: server

    @contextlib.contextmanager
    def _server_call(self):
        """Reconnect first when the server was lost; turn a lost connection into a
        WorldUnavailableError with a message for the user."""
        if self._closed:
            raise WorldUnavailableError("the Carla world is closed")
        if self._backoff.down:
            self._reconnect()
        try:
            yield
        except RuntimeError as err:
            if isinstance(err, WorldUnavailableError) or not is_connection_error(err):
                raise
            self._backoff.lost()
            wait = self._backoff.wait()
            raise WorldUnavailableError(
                f"lost the Carla server at {self._address} ({err}); reconnecting in {wait:.0f} s", retry_in=wait
            ) from None

    def _reconnect(self) -> None:
        down_for = time.monotonic() - self._backoff.down_since
        if not self._backoff.due():
            wait = self._backoff.wait()
            raise WorldUnavailableError(
                f"the Carla server at {self._address} has been unreachable for {down_for:.0f} s; "
                f"next reconnection attempt in {wait:.0f} s", retry_in=wait)
        try:
            self._conn.connect()
            # A server that only dropped the connection still holds our actors: clear them.
            for actor in self._conn.world.get_actors(sorted(self._spawned_ids())):
                _quietly(actor.destroy)
            self._orphans.clear()
            self._set_up()
        except (WorldUnavailableError, RuntimeError) as err:
            delay = self._backoff.failed()
            raise WorldUnavailableError(
                f"the Carla server at {self._address} has been unreachable for {down_for:.0f} s; reconnection "
                f"attempt {self._backoff.attempts} failed ({err}); next one in {delay:.0f} s", retry_in=delay
            ) from None
        log.info("reconnected to the Carla server at %s after %.0f s", self._address, down_for)
        self._backoff.recovered()

    def _set_up(self) -> None:
        """Map geometry, weather, traffic and (after a reconnection) the heroes, anew."""
        world = self._conn.world
        try:
            world.get_blueprint_library().find(self._hero_blueprint)
        except IndexError:
            raise ValueError(f"world.hero_blueprint={self._hero_blueprint!r} is not a blueprint of this server") from None
        town = world.get_map()
        xodr = town.to_opendrive()
        key = f"{town.name}:{hashlib.sha1(xodr.encode()).hexdigest()}"
        if key not in _MAPS:
            _MAPS[key] = extract_map(town, self.map_step)
        self._geometry = _MAPS[key]
        short = town.name.rsplit("/", 1)[-1].removesuffix("_Opt")
        self._description = self._environment or TOWN_DESCRIPTIONS.get(short, DEFAULT_DESCRIPTION)
        if self._weather_config is not None:
            world.set_weather(self._weather_config)
        if hasattr(world, "set_pedestrians_seed"):
            world.set_pedestrians_seed(self._counts["seed"])
        self._spawn_points = list(town.get_spawn_points()) or _spawn_points_from_lanes(self._carla, town)
        self._kinds.clear()
        self._scene = None
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

    def _resolve_weather(self, weather):
        """null keeps the server's; a preset name (ClearNoon, WetCloudySunset, ...) or a mapping
        of carla.WeatherParameters fields."""
        if weather is None:
            return None
        presets = sorted(n for n in dir(self._carla.WeatherParameters) if n[0].isupper())
        if isinstance(weather, str):
            if weather not in presets:
                raise ValueError(f"world.weather={weather!r} is not a Carla weather preset; allowed: {', '.join(presets)}")
            return getattr(self._carla.WeatherParameters, weather)
        if not isinstance(weather, Mapping):
            raise ValueError(f"world.weather={weather!r} must be null, a preset name or a mapping of weather values")
        params = self._conn.world.get_weather()
        fields = sorted(n for n in dir(params) if not n.startswith("_") and isinstance(getattr(params, n), float))
        for key, value in weather.items():
            if key not in fields:
                raise ValueError(f"world.weather.{key}: no such Carla weather value; allowed: {', '.join(fields)}")
            setattr(params, key, float(value))
        return params

    # ------------------------------------------------------------------ internals: actors

    def _spawned_ids(self) -> set[int]:
        ids = set(self._orphans) | (self._traffic.ids() if hasattr(self, "_traffic") else set())
        for hero in self._heroes.values():
            ids |= {hero.actor.id, *(c.id for c in hero.cameras)}
        return ids

    def _hero(self, ego_id: str) -> _Hero:
        try:
            return self._heroes[ego_id]
        except (KeyError, TypeError):
            raise UnknownEgoError(ego_id, list(self._heroes)) from None

    def _spawn_hero(self, role: str, control: VehicleControl, autopilot: bool) -> _Hero:
        library = self._conn.world.get_blueprint_library()
        try:
            bp = library.find(self._hero_blueprint)
        except (IndexError, RuntimeError):
            raise ValueError(f"world.hero_blueprint={self._hero_blueprint!r} is not a blueprint of this server") from None
        bp.set_attribute("role_name", role)
        taken = {id(h.spawn_transform) for h in self._heroes.values()}
        places = [p for p in self._spawn_points if id(p) not in taken]
        first = self._counts["hero_spawn_index"] % len(self._spawn_points) if self._spawn_points else 0
        ordered = [p for p in places if p is self._spawn_points[first]] + [p for p in places if p is not self._spawn_points[first]]
        for place in ordered:
            actor = self._conn.world.try_spawn_actor(bp, place)
            if actor is not None:
                break
        else:
            raise RuntimeError(f"no free spawn point for a hero car on {self._conn.world.get_map().name}")
        hero = _Hero(actor, role, control, autopilot, spawn_transform=place)
        if autopilot:
            actor.set_autopilot(True, self._address.tm_port)
        else:
            actor.apply_control(self._carla_control(control))
        if self._rig is not None:
            self._attach_cameras(hero)
        self._scene = None
        return hero

    def _attach_cameras(self, hero: _Hero) -> None:
        """Real RGB cameras at the rig's poses (Carla's vehicle frame), for side-by-side viewing."""
        carla, (width, height) = self._carla, self._rig["image_size"]
        for cam in self._rig["cameras"]:
            bp = self._conn.world.get_blueprint_library().find("sensor.camera.rgb")
            bp.set_attribute("image_size_x", str(int(width)))
            bp.set_attribute("image_size_y", str(int(height)))
            bp.set_attribute("fov", str(float(cam["fov"])))
            bp.set_attribute("role_name", str(cam["name"]))
            pitch, yaw, roll = (float(v) for v in cam["rotation"])
            pose = carla.Transform(carla.Location(*(float(v) for v in cam["location"])), carla.Rotation(pitch, yaw, roll))
            sensor = self._conn.world.spawn_actor(bp, pose, attach_to=hero.actor)
            sensor.listen(lambda image, name=str(cam["name"]), images=hero.images: images.__setitem__(name, image))
            hero.cameras.append(sensor)

    def _camera_images(self, hero: _Hero, frame: int) -> dict[str, np.ndarray]:
        """The hero's camera pictures of this frame, waiting up to world.timeout for them."""
        deadline = time.monotonic() + self._address.timeout
        names = [str(cam["name"]) for cam in self._rig["cameras"]]
        while any(name not in hero.images or hero.images[name].frame < frame for name in names):
            if time.monotonic() > deadline:
                raise WorldUnavailableError(f"Carla cameras sent no picture of frame {frame} within world.timeout")
            time.sleep(0.001)
        pictures = {}
        for name, image in hero.images.items():
            bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
            pictures[name] = bgra[..., 2::-1].copy()
        return pictures

    def _destroy_hero(self, hero: _Hero) -> None:
        for sensor in hero.cameras:
            _quietly(sensor.stop)
            _quietly(sensor.destroy)
        if hero.autopilot:
            _quietly(lambda: hero.actor.set_autopilot(False, self._address.tm_port))
        _quietly(hero.actor.destroy)

    def _hero_state(self, hero: _Hero):
        """(carla.Transform, carla.Vector3D velocity) at this tick; the spawn pose before the first."""
        found = self._conn.world.get_snapshot().find(hero.actor.id)
        if found is None:
            return hero.spawn_transform, self._carla.Vector3D()
        return found.get_transform(), found.get_velocity()

    def _carla_control(self, control: VehicleControl):
        return self._carla.VehicleControl(throttle=control.throttle, steer=control.steer, brake=control.brake,
                                          hand_brake=control.hand_brake, reverse=control.reverse)

    def _take_scene(self) -> _Scene:
        """Boxes of every vehicle and walker at this tick (actors spawned by anyone, any time)."""
        world = self._conn.world
        snapshot = world.get_snapshot()
        states = {s.id: s for s in snapshot}
        new = [i for i in states if i not in self._kinds]
        if new:
            for actor in world.get_actors(new):
                self._kinds[actor.id] = _kind_of(actor)
            for i in new:
                self._kinds.setdefault(i, _Kind(None))  # gone again before we asked
        ids = [i for i in states if self._kinds[i].category is not None]
        kinds = [self._kinds[i] for i in ids]
        transforms = [states[i].get_transform() for i in ids]
        loc = np.array([(t.location.x, t.location.y, t.location.z) for t in transforms]).reshape(-1, 3)
        rot = np.array([(t.rotation.pitch, t.rotation.yaw, t.rotation.roll) for t in transforms]).reshape(-1, 3)
        bbox_loc = np.array([k.bbox_location for k in kinds]).reshape(-1, 3)
        centres = (carla_transform_matrix(loc, rot) @ np.concatenate([bbox_loc, np.ones((len(ids), 1))], axis=1)[..., None])
        weather = world.get_weather()
        return _Scene(
            ids=np.array(ids, dtype=np.int64),
            centers=from_carla_points(centres[:, :3, 0]),
            sizes=2.0 * np.array([k.bbox_extent for k in kinds]).reshape(-1, 3),
            yaws=from_carla_yaw(rot[:, 1] + np.array([k.bbox_yaw for k in kinds])),
            categories=[k.category for k in kinds],
            frame=int(snapshot.frame),
            weather=Weather(float(weather.sun_altitude_angle), float(weather.precipitation),
                            float(weather.fog_density), float(weather.cloudiness)),
        )


def _kind_of(actor) -> _Kind:
    type_id = actor.type_id
    if type_id.startswith("vehicle."):
        category = vehicle_category(actor.attributes)
    elif type_id.startswith("walker.pedestrian"):
        category = "pedestrian"
    else:
        return _Kind(None)
    bb = actor.bounding_box
    return _Kind(category, (bb.location.x, bb.location.y, bb.location.z), (bb.extent.x, bb.extent.y, bb.extent.z),
                 bb.rotation.yaw)


def _spawn_points_from_lanes(carla, town, spacing: float = 25.0) -> list:
    """Maps without recommended spawn points (bare OpenDRIVE): driving-lane points every
    `spacing` m, raised 0.5 m so that vehicles drop onto the road."""
    points = []
    for wp in town.generate_waypoints(spacing):
        t = wp.transform
        points.append(carla.Transform(t.location + carla.Location(z=0.5), t.rotation))
    return points


def _our_control(control) -> VehicleControl:
    """Carla's VehicleControl -> ours (its floats clamped into our ranges)."""
    clamp = lambda v, lo, hi: min(hi, max(lo, float(v)))  # noqa: E731
    return VehicleControl(throttle=clamp(control.throttle, 0, 1), steer=clamp(control.steer, -1, 1),
                          brake=clamp(control.brake, 0, 1), reverse=bool(control.reverse),
                          hand_brake=bool(control.hand_brake))


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
