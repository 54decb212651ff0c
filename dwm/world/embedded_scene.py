"""What the egos of the embedded world see: every vehicle's box at one tick, lifted to the world
frame, and from it an ego's pose and the boxes within its view."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.base import REAR_AXLE_BEHIND_CENTRE_M, Boxes
from dwm.world.maps import to_world_xy, to_world_yaw
from dwm.world.traffic import CATEGORY_SIZES


@dataclass
class EmbeddedScene:
    """Every vehicle's box at the current tick, world frame (N vehicles, in stepping order)."""

    index: dict[int, int]  # id(vehicle) -> row
    centres: np.ndarray  # (N, 2) m, vehicle centres on the ground
    yaws: np.ndarray  # (N,) rad
    sizes: np.ndarray  # (N, 3) m: length, width, height
    categories: list[str]

    @classmethod
    def of(cls, vehicles: list[Vehicle]) -> EmbeddedScene:
        """The scene of the vehicles on a road (each with a box `category`)."""
        centres = to_world_xy(np.array([v.position for v in vehicles]).reshape(-1, 2))
        yaws = np.asarray(to_world_yaw(np.array([v.heading for v in vehicles], dtype=np.float64))).reshape(-1)
        categories = [v.category for v in vehicles]
        sizes = np.array([CATEGORY_SIZES[c] for c in categories]).reshape(-1, 3)
        index = {id(v): i for i, v in enumerate(vehicles)}
        return cls(index, centres, yaws, sizes, categories)

    def seen_by(self, vehicle: Vehicle, view_range: float) -> tuple[np.ndarray, Boxes, np.ndarray]:
        """(ego pose (4, 4): world <- rear-axle ego, boxes of the other vehicles within
        `view_range` m of its rear axle, the boxes' rows in the scene (their vehicles' places
        in the stepping order)) for the ego driving `vehicle`."""
        row = self.index[id(vehicle)]
        yaw = float(self.yaws[row])
        forward = np.array([math.cos(yaw), math.sin(yaw)])
        rear_axle = self.centres[row] - REAR_AXLE_BEHIND_CENTRE_M * forward
        pose = np.eye(4)
        pose[:2, :2] = [[forward[0], -forward[1]], [forward[1], forward[0]]]
        pose[:2, 3] = rear_axle

        near = np.sum((self.centres - rear_axle) ** 2, axis=1) <= view_range**2
        near[row] = False
        rows = np.flatnonzero(near)
        sizes = self.sizes[rows]
        # Yaw-only boxes standing on the flat ground; their origin is the ground point under
        # the centre, where Carla puts a vehicle's origin.
        boxes = Boxes.upright(
            centers=np.concatenate([self.centres[rows], sizes[:, 2:3] / 2], axis=1),
            sizes=sizes,
            yaws=self.yaws[rows],
            categories=[self.categories[r] for r in rows],
        )
        return pose, boxes, rows
