"""The scene of the Carla world at one tick, read from the server's snapshot: every vehicle and
walker (spawned by anyone, any time) as a box in our frame, and the weather in caption words'
terms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwm.world.base import Boxes, Weather
from dwm.world.carla_actors import actor_category, carla_boxes


@dataclass
class _Kind:
    """What a seen actor is, read once: category (None: not boxed), box in the actor's frame."""

    category: str | None
    bbox_location: tuple = (0.0, 0.0, 0.0)  # Carla actor frame, m
    bbox_extent: tuple = (0.0, 0.0, 0.0)  # half sizes, m
    bbox_rotation: tuple = (0.0, 0.0, 0.0)  # pitch, yaw, roll in the actor's frame, deg


def _kind_of(actor) -> _Kind:
    category = actor_category(actor.type_id, actor.attributes)
    if category is None:
        return _Kind(None)
    bb = actor.bounding_box
    return _Kind(category, (bb.location.x, bb.location.y, bb.location.z), (bb.extent.x, bb.extent.y, bb.extent.z),
                 (bb.rotation.pitch, bb.rotation.yaw, bb.rotation.roll))


@dataclass
class CarlaScene:
    """Every boxed actor at the current tick, our frame (N actors, in the snapshot's order)."""

    ids: np.ndarray  # (N,) Carla actor ids
    boxes: Boxes
    frame: int  # the server's frame number
    weather: Weather

    def around(self, xy: np.ndarray, radius: float, exclude_id: int) -> Boxes:
        """Boxes whose centre lies within `radius` m of the world point `xy` (2,) on the ground
        plane, but the actor `exclude_id` (the ego's own car)."""
        near = np.sum((self.boxes.centers[:, :2] - xy) ** 2, axis=1) <= radius**2
        near &= self.ids != exclude_id
        return self.boxes.take(near)


class SceneReader:
    """Reads the scene of each tick from one world (a reconnection makes a new one); what each
    actor is (its category and bounding box) is asked of the server once per actor."""

    def __init__(self, world):
        self._world = world
        self._kinds: dict[int, _Kind] = {}

    def read(self) -> CarlaScene:
        world = self._world
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
        weather = world.get_weather()
        return CarlaScene(
            ids=np.array(ids, dtype=np.int64),
            boxes=carla_boxes(loc, rot, np.array([k.bbox_location for k in kinds]).reshape(-1, 3),
                              np.array([k.bbox_extent for k in kinds]).reshape(-1, 3),
                              np.array([k.bbox_rotation for k in kinds]).reshape(-1, 3), [k.category for k in kinds]),
            frame=int(snapshot.frame),
            weather=Weather(float(weather.sun_altitude_angle), float(weather.precipitation),
                            float(weather.fog_density), float(weather.cloudiness)),
        )
