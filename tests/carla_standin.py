"""A stand-in for `carla.Client` and what it hands out (world, blueprint library, actors,
traffic manager), for tests where no Carla server can run. It records the calls made to it.

Everything else is the real `carla` package: transforms, locations, bounding boxes, weather,
world settings, `carla.VehicleControl`, and the town map, a real `carla.Map` built from
OpenDRIVE text. The server's state lives in `StandInServer`, so that a reconnecting client
finds it again (or finds it restarted and empty).
"""

from __future__ import annotations

import fnmatch
import math
import random

import carla

CATALOGUE = {  # blueprint id -> attributes and bounding box half sizes (m)
    "vehicle.lincoln.mkz_2017": ({"base_type": "car", "number_of_wheels": "4"}, (2.45, 1.06, 0.76)),
    "vehicle.audi.a2": ({"base_type": "car", "number_of_wheels": "4"}, (1.85, 0.9, 0.78)),
    "vehicle.mercedes.sprinter": ({"base_type": "van", "number_of_wheels": "4"}, (2.96, 0.99, 1.28)),
    "vehicle.carlamotors.carlacola": ({"base_type": "truck", "number_of_wheels": "4"}, (2.6, 1.3, 1.25)),
    "vehicle.mitsubishi.fusorosa": ({"base_type": "bus", "number_of_wheels": "4"}, (5.1, 1.4, 1.95)),
    "vehicle.yamaha.yzf": ({"base_type": "motorcycle", "number_of_wheels": "2"}, (1.1, 0.43, 0.63)),
    "vehicle.bh.crossbike": ({"base_type": "bicycle", "number_of_wheels": "2"}, (0.74, 0.43, 0.54)),
    "walker.pedestrian.0001": ({"speed": "1.4"}, (0.19, 0.19, 0.93)),
    "controller.ai.walker": ({}, None),
    "sensor.camera.rgb": ({"image_size_x": "800", "image_size_y": "600", "fov": "90"}, None),
}


class Attribute:
    def __init__(self, value: str):
        self.value = value

    def as_int(self) -> int:
        return int(self.value)

    def __str__(self) -> str:
        return self.value


class Blueprint:
    def __init__(self, bp_id: str):
        self.id = bp_id
        attributes, self.extent = CATALOGUE[bp_id]
        self.attributes = {"role_name": "autopilot" if bp_id.startswith("vehicle") else "", **attributes}

    def has_attribute(self, key: str) -> bool:
        return key in self.attributes

    def set_attribute(self, key: str, value: str) -> None:
        if key not in self.attributes:
            raise IndexError(f"no attribute {key}")
        self.attributes[key] = str(value)

    def get_attribute(self, key: str) -> Attribute:
        return Attribute(self.attributes[key])


class BlueprintLibrary:
    def filter(self, pattern: str) -> list[Blueprint]:
        return [Blueprint(i) for i in CATALOGUE if fnmatch.fnmatch(i, pattern)]

    def find(self, bp_id: str) -> Blueprint:
        if bp_id not in CATALOGUE:
            raise IndexError(f"blueprint {bp_id!r} not found")
        return Blueprint(bp_id)


class Actor:
    def __init__(self, server: "StandInServer", actor_id: int, bp: Blueprint, transform, parent=None):
        self._server = server
        self.id, self.type_id, self.parent = actor_id, bp.id, parent
        self.attributes = dict(bp.attributes)
        extent = bp.extent or (0.0, 0.0, 0.0)
        self.bounding_box = carla.BoundingBox(carla.Location(0, 0, extent[2]), carla.Vector3D(*extent))
        self.transform = carla.Transform(transform.location, transform.rotation)
        self.velocity = carla.Vector3D()
        self.control = carla.VehicleControl()
        self.autopilot = False
        self.target = None  # walker controller: where its walker goes
        self.started = False
        self.callback = None  # camera

    def _call(self, name, *args):
        self._server.call(name, self.id, *args)

    def get_transform(self):
        return self.transform

    def get_control(self):
        return self.control

    def apply_control(self, control) -> None:
        self._call("apply_control", control)
        self.control = control

    def set_autopilot(self, enabled: bool, tm_port: int = 8000) -> None:
        self._call("set_autopilot", enabled, tm_port)
        self.autopilot = enabled

    def destroy(self) -> bool:
        self._call("destroy")
        return self._server.actors.pop(self.id, None) is not None

    # walker controller
    def start(self) -> None:
        self._call("start")
        self.started = True

    def go_to_location(self, location) -> None:
        self._call("go_to_location", location)
        self.target = location

    def set_max_speed(self, speed: float) -> None:
        self._call("set_max_speed", speed)

    def stop(self) -> None:
        self._call("stop")
        self.callback = None

    # camera
    def listen(self, callback) -> None:
        self._call("listen")
        self.callback = callback


class Image:
    """What a camera callback receives: BGRA bytes, as Carla sends them."""

    def __init__(self, frame: int, width: int, height: int, bgr: tuple[int, int, int]):
        self.frame, self.width, self.height = frame, width, height
        self.raw_data = bytes([*bgr, 255]) * (width * height)


class ActorSnapshot:
    def __init__(self, actor: Actor):
        self.id = actor.id
        self._transform = carla.Transform(actor.transform.location, actor.transform.rotation)
        self._velocity = carla.Vector3D(actor.velocity.x, actor.velocity.y, actor.velocity.z)

    def get_transform(self):
        return self._transform

    def get_velocity(self):
        return self._velocity


class Snapshot:
    def __init__(self, frame: int, actors: dict[int, Actor]):
        self.frame = frame
        self._items = {i: ActorSnapshot(a) for i, a in actors.items()}

    def __iter__(self):
        return iter(list(self._items.values()))

    def find(self, actor_id: int):
        return self._items.get(actor_id)


class TrafficManager:
    def __init__(self, server: "StandInServer", port: int):
        self._server, self.port = server, port

    def set_synchronous_mode(self, enabled: bool) -> None:
        self._server.call("tm.set_synchronous_mode", self.port, enabled)
        self._server.tm_sync[self.port] = enabled

    def set_random_device_seed(self, seed: int) -> None:
        self._server.call("tm.set_random_device_seed", self.port, seed)


class World:
    def __init__(self, server: "StandInServer"):
        self._server = server

    def get_map(self):
        self._server.call("get_map")
        return self._server.map

    def get_settings(self):
        return _copy_settings(self._server.settings)

    def apply_settings(self, settings) -> int:
        self._server.call("apply_settings", settings.synchronous_mode, settings.fixed_delta_seconds)
        self._server.settings = _copy_settings(settings)
        return self._server.frame

    def get_blueprint_library(self):
        self._server.call("get_blueprint_library")
        return BlueprintLibrary()

    def get_weather(self):
        self._server.call("get_weather")
        return _copy_weather(self._server.weather)

    def set_weather(self, weather) -> None:
        self._server.call("set_weather", weather)
        self._server.weather = weather

    def set_pedestrians_seed(self, seed: int) -> None:
        self._server.call("set_pedestrians_seed", seed)

    def get_random_location_from_navigation(self):
        self._server.call("get_random_location_from_navigation")
        rng = self._server.rng
        return carla.Location(rng.uniform(0, 100), rng.uniform(-12, -8), 0.0)

    def try_spawn_actor(self, bp, transform, attach_to=None):
        self._server.call("try_spawn_actor", bp.id, bp.attributes.get("role_name"))
        if bp.id.startswith("vehicle"):
            for other in self._server.actors.values():
                if other.type_id.startswith("vehicle") and other.transform.location.distance(transform.location) < 2.0:
                    return None  # the place is taken
        return self._server.add(bp, transform, attach_to)

    def spawn_actor(self, bp, transform, attach_to=None):
        actor = self.try_spawn_actor(bp, transform, attach_to)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def get_actors(self, ids=None):
        self._server.call("get_actors")
        if ids is None:
            return list(self._server.actors.values())
        return [self._server.actors[i] for i in ids if i in self._server.actors]

    def get_snapshot(self):
        return Snapshot(self._server.frame, self._server.actors)

    def tick(self, seconds: float = 10.0) -> int:
        self._server.call("tick")
        self._server.step()
        return self._server.frame


class StandInServer:
    """A Carla server's state: its world, actors and settings. `up=False` makes every call time
    out, as a server that went away does; `restart()` empties it as a restarted server is."""

    def __init__(self, xodr: str, town: str = "Town10HD_Opt", server_version: str = "0.9.15"):
        self.xodr, self.server_version = xodr, server_version
        self.calls: list[tuple] = []
        self.up = True
        self.rng = random.Random(0)
        self._load(town)

    def _load(self, town: str) -> None:
        self.map = carla.Map(town, self.xodr)
        self.settings = carla.WorldSettings()
        self.weather = _copy_weather(carla.WeatherParameters.ClearNoon)
        self.actors: dict[int, Actor] = {}
        self.tm_sync: dict[int, bool] = {}
        self.frame = 1
        self._next_id = 100

    def restart(self) -> None:
        self._load(self.map.name)

    def call(self, name: str, *args) -> None:
        if not self.up:
            raise RuntimeError("time-out of 10000ms while waiting for the simulator, make sure the simulator "
                               "is ready and connected to 127.0.0.1:2000")
        self.calls.append((name, *args))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def add(self, bp: Blueprint, transform, parent=None) -> Actor:
        self._next_id += 1
        actor = Actor(self, self._next_id, bp, transform, parent)
        self.actors[actor.id] = actor
        return actor

    def spawn_other(self, bp_id: str, location, yaw: float = 0.0, extent=None) -> Actor:
        """An actor spawned by some other client (a scenario script), Carla coordinates;
        extent: its bounding box half sizes (m) when not the blueprint's."""
        bp = Blueprint(bp_id)
        bp.extent = extent or bp.extent
        return self.add(bp, carla.Transform(location, carla.Rotation(yaw=yaw)))

    def role(self, role: str) -> list[Actor]:
        return [a for a in self.actors.values() if a.attributes.get("role_name") == role]

    def step(self) -> None:
        """One tick: walkers walk 1.5 m towards their controllers' targets, cameras send a
        picture of the new frame."""
        self.frame += 1
        for actor in list(self.actors.values()):
            if actor.type_id == "controller.ai.walker" and actor.started and actor.target is not None:
                walker = actor.parent
                here, there = walker.transform.location, actor.target
                gap = math.hypot(there.x - here.x, there.y - here.y)
                k = min(1.0, 1.5 / gap) if gap > 0 else 1.0
                walker.transform = carla.Transform(
                    carla.Location(here.x + k * (there.x - here.x), here.y + k * (there.y - here.y), here.z),
                    walker.transform.rotation)
            if actor.callback is not None:
                w, h = int(actor.attributes["image_size_x"]), int(actor.attributes["image_size_y"])
                actor.callback(Image(self.frame, w, h, (10, 20, 30)))

    def client_class(self):
        server = self

        class Client:
            """Stands in for carla.Client(host, port, worker_threads)."""

            def __init__(self, host: str, port: int, worker_threads: int = 0):
                server.calls.append(("Client", host, port))
                self.host, self.port = host, port

            def set_timeout(self, seconds: float) -> None:
                server.calls.append(("set_timeout", seconds))

            def get_server_version(self) -> str:
                server.call("get_server_version")
                return server.server_version

            def get_client_version(self) -> str:
                return "0.9.16"

            def get_world(self):
                server.call("get_world")
                return World(server)

            def get_available_maps(self) -> list[str]:
                server.call("get_available_maps")
                return ["/Game/Carla/Maps/Town01", "/Game/Carla/Maps/Town10HD_Opt"]

            def load_world(self, name: str):
                server.call("load_world", name)
                server._load(name)
                return World(server)

            def get_trafficmanager(self, port: int = 8000):
                server.call("get_trafficmanager", port)
                return TrafficManager(server, port)

        return Client


def _copy_settings(settings):
    copy = carla.WorldSettings()
    for name in ("synchronous_mode", "fixed_delta_seconds", "no_rendering_mode"):
        setattr(copy, name, getattr(settings, name))
    return copy


def _copy_weather(weather):
    names = [n for n in dir(weather) if not n.startswith("_") and isinstance(getattr(weather, n), float)]
    return carla.WeatherParameters(**{n: getattr(weather, n) for n in names})


class FlaggedServer(StandInServer):
    """A stand-in server that is down while the file `down_flag` exists, so that a test can
    take it away from another process (a Ray actor's)."""

    def __init__(self, xodr: str, down_flag: str):
        self._flag = down_flag
        super().__init__(xodr)

    @property
    def up(self) -> bool:
        import os

        return not os.path.exists(self._flag)

    @up.setter
    def up(self, value: bool) -> None:  # the file decides
        pass


def world_on_standin(down_flag: str, **kwargs):
    """A `CarlaWorld` on a `FlaggedServer` in this process (config `_target_` for the Serve
    tests: the World actor builds it in its own process). kwargs: the world config."""
    from dwm.world.carla_world import CarlaWorld
    from tests import carla_roads

    server = FlaggedServer(carla_roads.straight_road(length=400.0, sidewalks=True), down_flag)
    carla.Client = server.client_class()
    return CarlaWorld(**kwargs)
