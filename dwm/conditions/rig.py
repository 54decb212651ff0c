"""The camera rig: intrinsics, poses and the 11 camera scalars of each view."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dwm.conditions.carla_pose import ego_from_carla_camera
from dwm.conditions.frame import CAMERA_PARAM_NAMES


def _numbers(value, count: int, what: str) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count:
        raise ValueError(f"{what} must be a list of {count} numbers, got {value!r}")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of {count} numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{what} must be finite numbers, got {value!r}")
    return numbers


@dataclass(frozen=True)
class CameraRig:
    """V pinhole cameras on the ego car, in the view order of the rig config.

    image_size: native (W, H) in pixels, where the intrinsics hold and layouts are drawn.
    fovs: (V,) horizontal field of view, degrees.
    intrinsics: (V, 3, 3), f = W / (2 tan(fov / 2)), principal point at the image centre.
    ego_from_camera: (V, 4, 4), rear-axle ego (right-handed) <- OpenCV camera, metres.
    """

    name: str
    names: tuple[str, ...]
    image_size: tuple[int, int]
    fovs: np.ndarray
    intrinsics: np.ndarray
    ego_from_camera: np.ndarray

    @staticmethod
    def from_config(node: Mapping) -> "CameraRig":
        """Build from a rig config node (conf/rig/*.yaml): `image_size` [W, H] and `cameras`,
        each with `name`, `fov` (deg, horizontal), `location` [x, y, z] m and `rotation`
        [pitch, yaw, roll] deg in Carla's vehicle frame."""
        if not isinstance(node, Mapping):
            raise ValueError(f"rig config must be a mapping with image_size and cameras, got {type(node).__name__}")
        for key in ("image_size", "cameras"):
            if key not in node:
                raise ValueError(f"rig config lacks `{key}`; a rig needs image_size [W, H] and cameras")
        width, height = _numbers(node["image_size"], 2, "rig.image_size ([W, H] in pixels)")
        if width <= 0 or height <= 0 or width != int(width) or height != int(height):
            raise ValueError(f"rig.image_size must be two positive integers [W, H], got {list(node['image_size'])}")
        cameras = node["cameras"]
        if isinstance(cameras, (str, bytes)) or not isinstance(cameras, Sequence) or len(cameras) == 0:
            raise ValueError("rig.cameras must be a non-empty list of cameras")

        names, fovs, locations, rotations = [], [], [], []
        for i, cam in enumerate(cameras):
            where = f"rig.cameras[{i}]"
            if not isinstance(cam, Mapping):
                raise ValueError(f"{where} must be a mapping with name, fov, location, rotation")
            missing = [k for k in ("name", "fov", "location", "rotation") if k not in cam]
            if missing:
                raise ValueError(f"{where} lacks {missing}; each camera needs name, fov, location, rotation")
            name = str(cam["name"])
            if name in names:
                raise ValueError(f"{where}: camera name {name!r} appears twice; names must be unique")
            (fov,) = _numbers([cam["fov"]], 1, f"{where}.fov")
            if not 0.0 < fov < 180.0:
                raise ValueError(f"{where}.fov={fov} must be in (0, 180) degrees")
            names.append(name)
            fovs.append(fov)
            locations.append(_numbers(cam["location"], 3, f"{where}.location ([x, y, z] m)"))
            rotations.append(_numbers(cam["rotation"], 3, f"{where}.rotation ([pitch, yaw, roll] deg)"))

        fovs_arr = np.asarray(fovs)
        focal = width / (2.0 * np.tan(np.radians(fovs_arr) / 2.0))  # (V,) px
        intrinsics = np.zeros((len(names), 3, 3))
        intrinsics[:, 0, 0] = focal
        intrinsics[:, 1, 1] = focal
        intrinsics[:, 0, 2] = width / 2.0
        intrinsics[:, 1, 2] = height / 2.0
        intrinsics[:, 2, 2] = 1.0
        return CameraRig(
            name=str(node.get("name", "rig")),
            names=tuple(names),
            image_size=(int(width), int(height)),
            fovs=fovs_arr,
            intrinsics=intrinsics,
            ego_from_camera=ego_from_carla_camera(np.asarray(locations), np.asarray(rotations)),
        )

    @property
    def num_views(self) -> int:
        return len(self.names)

    def camera_params(self, fps: float) -> np.ndarray:
        """(V, 11) float32, the model's camera scalars in `CAMERA_PARAM_NAMES` order.

        As in the reference, fx and fy are both divided by the image height, cx by the width
        and cy by the height (native size); then the optical axis (third column of the
        rotation) and the position of the camera in the ego frame (m).
        """
        width, height = self.image_size
        k, t = self.intrinsics, self.ego_from_camera
        params = np.stack(
            [
                np.full(self.num_views, float(fps)),
                k[:, 0, 0] / height,
                k[:, 1, 1] / height,
                k[:, 0, 2] / width,
                k[:, 1, 2] / height,
                t[:, 0, 2],
                t[:, 1, 2],
                t[:, 2, 2],
                t[:, 0, 3],
                t[:, 1, 3],
                t[:, 2, 3],
            ],
            axis=-1,
        )
        assert params.shape[-1] == len(CAMERA_PARAM_NAMES)
        return params.astype(np.float32)
