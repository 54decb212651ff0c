"""Carla actors -> `Boxes`: what the layout draws of them (category, oriented box, origin).

Light on purpose: numpy only, no Carla server, no highway-env, so a Carla user can box their
own actors (`boxes_from_carla_actors(world.get_actors())`) and draw them with
`dwm.conditions`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from dwm.world.base import Boxes
from dwm.world.carla_pose import carla_transform_matrix, from_carla_points, from_carla_rotation

VEHICLE_BASE_TYPES = ("car", "van", "truck", "bus", "motorcycle", "bicycle")


def vehicle_category(attributes: Mapping[str, str]) -> str:
    """Box category of a vehicle from its blueprint attributes: `base_type` where Carla gives
    one, else two wheels make a motorcycle and more a car."""
    base = str(attributes.get("base_type", "")).lower()
    if base in VEHICLE_BASE_TYPES:
        return base
    return "motorcycle" if str(attributes.get("number_of_wheels", "4")) == "2" else "car"


def actor_category(type_id: str, attributes: Mapping[str, str]) -> str | None:
    """Box category of a Carla actor (vehicles by blueprint, walkers are pedestrians), None
    for actors that are not boxed (sensors, controllers, props)."""
    if type_id.startswith("vehicle."):
        return vehicle_category(attributes)
    if type_id.startswith("walker.pedestrian"):
        return "pedestrian"
    return None


def carla_boxes(
    locations: np.ndarray,
    rotations: np.ndarray,
    bbox_locations: np.ndarray,
    bbox_extents: np.ndarray,
    bbox_rotations: np.ndarray,
    categories: list[str],
) -> Boxes:
    """Boxes in our world frame from Carla's actor data, all in Carla's left-handed frames.

    locations (N, 3) m and rotations (N, 3) [pitch, yaw, roll] deg: the actors' world
    transforms; bbox_locations (N, 3) m, bbox_extents (N, 3) m (half sizes) and bbox_rotations
    (N, 3) deg: their `bounding_box` in the actor's frame. The full rotation is kept, so a car
    on a ramp is drawn pitched; the origin is the actor's location (the reference's range
    point).
    """
    n = len(categories)
    locations, rotations = np.reshape(locations, (n, 3)), np.reshape(rotations, (n, 3))
    world_from_actor = carla_transform_matrix(locations, rotations)  # (N, 4, 4) Carla frame
    centres = world_from_actor[:, :3, :3] @ np.reshape(bbox_locations, (n, 3, 1)) + world_from_actor[:, :3, 3:]
    actor_from_box = from_carla_rotation(np.reshape(bbox_rotations, (n, 3)))
    return Boxes(
        centers=from_carla_points(centres[..., 0]),
        sizes=2.0 * np.reshape(np.asarray(bbox_extents, dtype=np.float64), (n, 3)),
        rotations=from_carla_rotation(rotations) @ actor_from_box,
        origins=from_carla_points(locations),
        categories=list(categories),
    )


def boxes_from_carla_actors(actors: Iterable) -> Boxes:
    """Boxes of the vehicles and walkers among `carla.Actor`s, in the order given (others are
    skipped). Each actor's `get_transform()` is read, one client call per actor."""
    rows = []
    for actor in actors:
        category = actor_category(actor.type_id, actor.attributes)
        if category is None:
            continue
        t, bb = actor.get_transform(), actor.bounding_box
        rows.append((category, (t.location.x, t.location.y, t.location.z), (t.rotation.pitch, t.rotation.yaw, t.rotation.roll),
                     (bb.location.x, bb.location.y, bb.location.z), (bb.extent.x, bb.extent.y, bb.extent.z),
                     (bb.rotation.pitch, bb.rotation.yaw, bb.rotation.roll)))
    if not rows:
        return Boxes.empty()
    categories, *arrays = zip(*rows)
    return carla_boxes(*(np.array(a, dtype=np.float64) for a in arrays), list(categories))
