"""Hero cars of the Carla world: spawning them at the town's spawn points (with real cameras when
asked), their pose and velocity at a tick, their controls in both directions, their camera
pictures, and destroying them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from dwm.world.base import VehicleControl, WorldUnavailableError
from dwm.world.carla_client import quietly


@dataclass
class Hero:
    """One ego's car on the server, with what it is driven by and its cameras."""

    actor: object  # carla.Vehicle
    role: str  # its role_name
    control: VehicleControl = field(default_factory=VehicleControl)
    autopilot: bool = False
    spawn_transform: object = None  # pose until the first tick shows it
    cameras: list = field(default_factory=list)  # carla.Sensor
    camera_names: list[str] = field(default_factory=list)
    images: dict = field(default_factory=dict)  # camera name -> latest carla.Image

    def ids(self) -> set[int]:
        """Ids of the actors this hero is made of: the car and its cameras."""
        return {self.actor.id, *(c.id for c in self.cameras)}

    def state(self, world, carla):
        """(carla.Transform, carla.Vector3D velocity) at this tick; the spawn pose before the first."""
        found = world.get_snapshot().find(self.actor.id)
        if found is None:
            return self.spawn_transform, carla.Vector3D()
        return found.get_transform(), found.get_velocity()

    def pictures(self, frame: int, timeout: float) -> dict[str, np.ndarray]:
        """The camera pictures (H, W, 3) uint8 RGB of this frame, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while any(name not in self.images or self.images[name].frame < frame for name in self.camera_names):
            if time.monotonic() > deadline:
                raise WorldUnavailableError(f"Carla cameras sent no picture of frame {frame} within world.timeout")
            time.sleep(0.001)
        pictures = {}
        for name, image in self.images.items():
            bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
            pictures[name] = bgra[..., 2::-1].copy()
        return pictures

    def destroy(self, tm_port: int) -> None:
        """Cameras stopped first, the car off the traffic manager, then destroyed."""
        for sensor in self.cameras:
            quietly(sensor.stop)
            quietly(sensor.destroy)
        if self.autopilot:
            quietly(lambda: self.actor.set_autopilot(False, tm_port))
        quietly(self.actor.destroy)


class HeroSpawner:
    """Spawns heroes on one world (a reconnection makes a new one).

    blueprint: the hero's blueprint id; spawn_points: the town's carla.Transforms; first_index:
    the spawn point tried first (the reference's); rig: the camera rig config, or None for no
    cameras.
    """

    def __init__(self, carla, world, blueprint: str, tm_port: int, spawn_points: list, first_index: int,
                 rig: Mapping | None):
        self._carla, self._world, self._blueprint, self._tm_port = carla, world, blueprint, tm_port
        self._spawn_points, self._first_index, self._rig = spawn_points, first_index, rig

    def spawn(self, role: str, control: VehicleControl, autopilot: bool, taken: Iterable) -> Hero:
        """A hero at the first free spawn point (not one of the `taken` transforms), driving with
        `control` or on autopilot. RuntimeError when none is free."""
        library = self._world.get_blueprint_library()
        try:
            bp = library.find(self._blueprint)
        except (IndexError, RuntimeError):
            raise ValueError(f"world.hero_blueprint={self._blueprint!r} is not a blueprint of this server") from None
        bp.set_attribute("role_name", role)
        taken = {id(t) for t in taken}
        points = self._spawn_points
        places = [p for p in points if id(p) not in taken]
        first = self._first_index % len(points) if points else 0
        ordered = [p for p in places if p is points[first]] + [p for p in places if p is not points[first]]
        for place in ordered:
            actor = self._world.try_spawn_actor(bp, place)
            if actor is not None:
                break
        else:
            raise RuntimeError(f"no free spawn point for a hero car on {self._world.get_map().name}")
        hero = Hero(actor, role, control, autopilot, spawn_transform=place)
        if autopilot:
            actor.set_autopilot(True, self._tm_port)
        else:
            actor.apply_control(carla_control(self._carla, control))
        if self._rig is not None:
            self._attach_cameras(hero)
        return hero

    def _attach_cameras(self, hero: Hero) -> None:
        """Real RGB cameras at the rig's poses (Carla's vehicle frame), for side-by-side viewing."""
        carla, (width, height) = self._carla, self._rig["image_size"]
        for cam in self._rig["cameras"]:
            bp = self._world.get_blueprint_library().find("sensor.camera.rgb")
            bp.set_attribute("image_size_x", str(int(width)))
            bp.set_attribute("image_size_y", str(int(height)))
            bp.set_attribute("fov", str(float(cam["fov"])))
            bp.set_attribute("role_name", str(cam["name"]))
            pitch, yaw, roll = (float(v) for v in cam["rotation"])
            pose = carla.Transform(carla.Location(*(float(v) for v in cam["location"])), carla.Rotation(pitch, yaw, roll))
            sensor = self._world.spawn_actor(bp, pose, attach_to=hero.actor)
            sensor.listen(lambda image, name=str(cam["name"]), images=hero.images: images.__setitem__(name, image))
            hero.cameras.append(sensor)
            hero.camera_names.append(str(cam["name"]))


def carla_control(carla, control: VehicleControl):
    """Our VehicleControl -> carla.VehicleControl."""
    return carla.VehicleControl(throttle=control.throttle, steer=control.steer, brake=control.brake,
                                hand_brake=control.hand_brake, reverse=control.reverse)


def our_control(control) -> VehicleControl:
    """Carla's VehicleControl -> ours (its floats clamped into our ranges)."""
    clamp = lambda v, lo, hi: min(hi, max(lo, float(v)))  # noqa: E731
    return VehicleControl(throttle=clamp(control.throttle, 0, 1), steer=clamp(control.steer, -1, 1),
                          brake=clamp(control.brake, 0, 1), reverse=bool(control.reverse),
                          hand_brake=bool(control.hand_brake))
