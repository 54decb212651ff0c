"""Carla poses -> our frames, with the reference's formulas (one place for the conversion).

Carla is left-handed (x forward, y right, z up) with its vehicle origin at the vehicle's
centre; we are right-handed (x forward, y left, z up) with the ego origin on the ground under
the rear axle, 1.5 m behind the centre, and cameras in OpenCV axes (x right, y down,
z forward).
"""

from __future__ import annotations

import numpy as np

from dwm.world.base import REAR_AXLE_BEHIND_CENTRE_M

# Left-handed <-> right-handed: negate y (its own inverse).
FLIP_Y = np.diag([1.0, -1.0, 1.0, 1.0])

# OpenCV camera <- x-forward camera (the reference's `EC`): x_cv = -y, y_cv = -z, z_cv = x.
OPENCV_FROM_X_FORWARD = np.array(
    [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)

# Vehicle centre <- rear axle (the reference's `RVC`): the rear axle is 1.5 m behind.
CENTRE_FROM_REAR_AXLE = np.array(
    [
        [1.0, 0.0, 0.0, -REAR_AXLE_BEHIND_CENTRE_M],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def carla_transform_matrix(location, rotation) -> np.ndarray:
    """Carla's `Transform.get_matrix()`: parent <- child, left-handed.

    location: (..., 3) x, y, z in m; rotation: (..., 3) pitch, yaw, roll in degrees.
    Returns (..., 4, 4).
    """
    location = np.asarray(location, dtype=np.float64)
    pitch, yaw, roll = np.moveaxis(np.radians(np.asarray(rotation, dtype=np.float64)), -1, 0)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    cr, sr = np.cos(roll), np.sin(roll)
    m = np.zeros(np.shape(pitch) + (4, 4))
    m[..., 0, :3] = np.stack([cp * cy, cy * sp * sr - sy * cr, -cy * sp * cr - sy * sr], -1)
    m[..., 1, :3] = np.stack([cp * sy, sy * sp * sr + cy * cr, -sy * sp * cr + cy * sr], -1)
    m[..., 2, :3] = np.stack([sp, -cp * sr, cp * cr], -1)
    m[..., :3, 3] = location
    m[..., 3, 3] = 1.0
    return m


def ego_from_carla_camera(location, rotation) -> np.ndarray:
    """Rear-axle ego (right-handed) <- OpenCV camera, for a camera mounted on a Carla vehicle.

    location (..., 3) m and rotation (..., 3) [pitch, yaw, roll] deg are the camera's pose in
    Carla's vehicle frame (the rig config's values). Returns (..., 4, 4). The reference's
    `inv(RVC) . F . M_vehicle<-camera . F . inv(EC)`.
    """
    m = carla_transform_matrix(location, rotation)
    return np.linalg.inv(CENTRE_FROM_REAR_AXLE) @ FLIP_Y @ m @ FLIP_Y @ np.linalg.inv(OPENCV_FROM_X_FORWARD)


def world_from_carla_vehicle(location, rotation) -> np.ndarray:
    """World (right-handed) <- rear-axle ego, from a Carla vehicle's world transform.

    The reference's `F . M_world<-vehicle . F . RVC`; location (..., 3) m, rotation (..., 3)
    [pitch, yaw, roll] deg in Carla's world. Returns (..., 4, 4).
    """
    return FLIP_Y @ carla_transform_matrix(location, rotation) @ FLIP_Y @ CENTRE_FROM_REAR_AXLE


def from_carla_points(points) -> np.ndarray:
    """Carla world points (..., 3) m (left-handed) -> our world frame (..., 3): y flips sign.

    OpenDRIVE itself is right-handed; Carla mirrors it on loading, so this also gives the
    OpenDRIVE coordinates back.
    """
    points = np.array(points, dtype=np.float64)
    points[..., 1] *= -1.0
    return points


def from_carla_yaw(yaw_deg) -> np.ndarray:
    """Carla yaw (..., ) degrees, clockwise seen from above -> our yaw, radians about +z, in (-pi, pi]."""
    yaw = -np.radians(np.asarray(yaw_deg, dtype=np.float64))
    return np.pi - np.mod(np.pi - yaw, 2.0 * np.pi)


def from_carla_rotation(rotation) -> np.ndarray:
    """Carla rotations (..., 3) [pitch, yaw, roll] deg (left-handed) -> rotation matrices
    (..., 3, 3) in our right-handed frame: F . R_carla . F."""
    r = carla_transform_matrix(np.zeros(np.shape(rotation)), rotation)[..., :3, :3]
    return FLIP_Y[:3, :3] @ r @ FLIP_Y[:3, :3]
