"""Carla's left-handed transforms against our right-handed frame, checked with the real `carla`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

carla = pytest.importorskip("carla")

from dwm.world.carla_pose import (  # noqa: E402
    CENTRE_FROM_REAR_AXLE,
    FLIP_Y,
    OPENCV_FROM_X_FORWARD,
    carla_transform_matrix,
    from_carla_points,
    from_carla_yaw,
    world_from_carla_vehicle,
)
from dwm.world.rig import CameraRig  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
POSES = [((10.0, -4.0, 0.5), (0.0, 0.0, 0.0)), ((3.0, 7.0, 1.0), (0.0, 90.0, 0.0)),
         ((-20.0, 15.0, 2.0), (5.0, -135.0, 3.0)), ((0.5, 0.25, 0.0), (-10.0, 33.0, -7.0))]


@pytest.mark.parametrize("location, rotation", POSES)
def test_our_matrix_is_carlas_matrix(location, rotation):
    t = carla.Transform(carla.Location(*location), carla.Rotation(*rotation))
    np.testing.assert_allclose(carla_transform_matrix(location, rotation), np.array(t.get_matrix()), atol=1e-5)


@pytest.mark.parametrize("location, rotation", POSES)
def test_a_carla_transform_and_its_right_handed_counterpart_move_points_alike(location, rotation):
    t = carla.Transform(carla.Location(*location), carla.Rotation(*rotation))
    ours = FLIP_Y @ carla_transform_matrix(location, rotation) @ FLIP_Y  # world <- actor, right-handed
    for point in [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (2.5, -1.0, 0.7)]:
        moved = t.transform(carla.Location(*point))
        carla_world = from_carla_points([moved.x, moved.y, moved.z])
        ours_world = ours @ np.append(from_carla_points(point), 1.0)
        np.testing.assert_allclose(ours_world[:3], carla_world, atol=1e-4)


def test_known_points():
    # Carla's +y is to the right: a point 3 m to the right of the origin is at our y = -3.
    np.testing.assert_allclose(from_carla_points([5.0, 3.0, 1.0]), [5.0, -3.0, 1.0])
    # A Carla yaw of +90 deg turns clockwise (towards Carla's +y, our right): our -pi/2.
    assert from_carla_yaw(90.0) == pytest.approx(-math.pi / 2)
    assert from_carla_yaw(-180.0) == pytest.approx(math.pi)
    # A vehicle centred at Carla (10, 5) facing Carla's +y: its rear axle is 1.5 m behind the
    # centre, at Carla (10, 3.5), our (10, -3.5), and it faces our -y.
    pose = world_from_carla_vehicle([10.0, 5.0, 0.0], [0.0, 90.0, 0.0])
    np.testing.assert_allclose(pose[:3, 3], [10.0, -3.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(pose[:3, 0], [0.0, -1.0, 0.0], atol=1e-12)
    assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0)  # a proper rotation, right-handed


@pytest.mark.parametrize("rig_name", ["nusc_3views", "nusc_6views"])
def test_rig_camera_poses_round_trip_to_carla_transforms(rig_name):
    node = OmegaConf.load(CONF / "rig" / f"{rig_name}.yaml")
    rig = CameraRig.from_config(node)
    for cam, ego_from_camera in zip(node.cameras, rig.ego_from_camera):
        # Back from rear-axle ego <- OpenCV camera to Carla's vehicle <- x-forward camera ...
        vehicle_from_camera = FLIP_Y @ CENTRE_FROM_REAR_AXLE @ ego_from_camera @ OPENCV_FROM_X_FORWARD @ FLIP_Y
        # ... which is the Carla transform the rig config describes.
        t = carla.Transform(carla.Location(*cam.location), carla.Rotation(*cam.rotation))
        np.testing.assert_allclose(vehicle_from_camera, np.array(t.get_matrix()), atol=1e-5)
        # The optical axis (OpenCV z) in our ego frame is Carla's camera forward, mirrored.
        forward = t.get_forward_vector()
        np.testing.assert_allclose(ego_from_camera[:3, 2], from_carla_points([forward.x, forward.y, forward.z]), atol=1e-5)
