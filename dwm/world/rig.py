"""The camera rig on the ego car: intrinsics, poses and the 11 camera scalars of each view.

The world's cameras (Carla's, the embedded world's rasterised ones) and the model's layouts
share it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dwm.world.carla_pose import ego_from_carla_camera

# The 11 camera scalars per view, in the reference's order (the released model's
# `added_time_ids`): fps, fx/H, fy/H, cx/W, cy/H (native image size), the camera's optical
# axis in the ego frame (r02, r12, r22) and the camera position in the ego frame (tx, ty, tz).
CAMERA_PARAM_NAMES = ("fps", "fx/H", "fy/H", "cx/W", "cy/H", "r02", "r12", "r22", "tx", "ty", "tz")


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


def _centred_intrinsics(fovs: np.ndarray, width: float, height: float) -> np.ndarray:
    """(V, 3, 3) K for horizontal fovs (V,) deg: f = W / (2 tan(fov / 2)), square pixels,
    principal point at the image centre (Carla's cameras, the reference's formula)."""
    focal = width / (2.0 * np.tan(np.radians(fovs) / 2.0))  # (V,) px
    intrinsics = np.zeros((len(fovs), 3, 3))
    intrinsics[:, 0, 0] = focal
    intrinsics[:, 1, 1] = focal
    intrinsics[:, 0, 2] = width / 2.0
    intrinsics[:, 1, 2] = height / 2.0
    intrinsics[:, 2, 2] = 1.0
    return intrinsics


@dataclass(frozen=True)
class CameraRig:
    """V pinhole cameras on the ego car, in the view order of the rig config.

    image_size: native (W, H) in pixels, where the intrinsics hold and layouts are drawn.
    fovs: (V,) horizontal field of view, degrees (of the full image width).
    intrinsics: (V, 3, 3) pinhole K at the native size; from a fov, f = W / (2 tan(fov / 2))
        with the principal point at the image centre (the reference's Carla cameras).
    ego_from_camera: (V, 4, 4), rear-axle ego (right-handed) <- OpenCV camera, metres.

    Three ways to build one: `from_config` (a rig config: fovs and Carla vehicle poses),
    `from_intrinsics` (K and ego <- camera poses, e.g. a dataset's calibration) and
    `from_fovs` (fovs and ego <- camera poses).
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
        return CameraRig(
            name=str(node.get("name", "rig")),
            names=tuple(names),
            image_size=(int(width), int(height)),
            fovs=fovs_arr,
            intrinsics=_centred_intrinsics(fovs_arr, width, height),
            ego_from_camera=ego_from_carla_camera(np.asarray(locations), np.asarray(rotations)),
        )

    @staticmethod
    def from_intrinsics(intrinsics, ego_from_camera, image_size, names=None, name: str = "rig") -> "CameraRig":
        """V cameras from pinhole K (V, 3, 3) px at `image_size` (W, H) and their poses
        ego_from_camera (V, 4, 4) (rear-axle ego, x forward y left z up <- OpenCV camera, m).
        The principal point may be anywhere; names default to CAM_0, CAM_1, ..."""
        k = np.asarray(intrinsics, dtype=np.float64)
        poses = np.asarray(ego_from_camera, dtype=np.float64)
        if k.ndim != 3 or k.shape[1:] != (3, 3) or poses.shape != (len(k), 4, 4):
            raise ValueError(f"need intrinsics (V, 3, 3) and ego_from_camera (V, 4, 4), got {k.shape} and {poses.shape}")
        if not (np.isfinite(k).all() and np.isfinite(poses).all()):
            raise ValueError("intrinsics and ego_from_camera must be finite")
        if not (np.allclose(k[:, 2], [0.0, 0.0, 1.0]) and np.allclose(k[:, 1, 0], 0.0) and (k[:, 0, 0] > 0).all()
                and (k[:, 1, 1] > 0).all()):
            raise ValueError("intrinsics must be pinhole matrices [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
        rotations = poses[:, :3, :3]
        if not np.allclose(rotations @ rotations.transpose(0, 2, 1), np.eye(3), atol=1e-6) or not np.allclose(
            np.linalg.det(rotations), 1.0, atol=1e-6
        ):
            raise ValueError("ego_from_camera must be rigid transforms (rotation part orthonormal, det +1)")
        width, height = _numbers(list(image_size), 2, "image_size ([W, H] in pixels)")
        if width <= 0 or height <= 0 or width != int(width) or height != int(height):
            raise ValueError(f"image_size must be two positive integers [W, H], got {list(image_size)}")
        names = tuple(str(n) for n in names) if names is not None else tuple(f"CAM_{i}" for i in range(len(k)))
        if len(names) != len(k) or len(set(names)) != len(names):
            raise ValueError(f"need {len(k)} unique camera names, got {list(names)}")
        # Horizontal fov of the whole width with this principal point (make_carla_cameras' rule).
        fovs = np.degrees(np.arctan(k[:, 0, 2] / k[:, 0, 0]) + np.arctan((width - k[:, 0, 2]) / k[:, 0, 0]))
        return CameraRig(name=name, names=names, image_size=(int(width), int(height)), fovs=fovs,
                         intrinsics=k.copy(), ego_from_camera=poses.copy())

    @staticmethod
    def from_fovs(fovs, ego_from_camera, image_size, names=None, name: str = "rig") -> "CameraRig":
        """V cameras from horizontal fovs (V,) degrees, principal points at the image centre,
        at `image_size` (W, H), and their poses ego_from_camera (V, 4, 4) as `from_intrinsics`."""
        fovs = np.asarray(fovs, dtype=np.float64).reshape(-1)
        if not ((fovs > 0) & (fovs < 180)).all():
            raise ValueError(f"fovs must be in (0, 180) degrees, got {fovs.tolist()}")
        return CameraRig.from_intrinsics(_centred_intrinsics(fovs, *image_size), ego_from_camera, image_size, names, name)

    def resized(self, image_size) -> "CameraRig":
        """The same cameras drawing at another native size (W, H): K scaled per axis."""
        width, height = (int(v) for v in image_size)
        scale = np.diag([width / self.image_size[0], height / self.image_size[1], 1.0])
        return CameraRig.from_intrinsics(scale @ self.intrinsics, self.ego_from_camera, (width, height), self.names, self.name)

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
