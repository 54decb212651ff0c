"""The conditions of one simulated moment, as the denoiser takes them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


# A layout pixel k (uint8) is the float k * LAYOUT_SCALE in [0, 1] the model takes.
LAYOUT_SCALE = np.float32(1.0 / 255.0)


def layout_floats(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 layout pixels (any shape; a tensor on any device, or an array) -> float32 in
    [0, 1] on the same device: k * LAYOUT_SCALE in float32, the same bit for bit everywhere."""
    if isinstance(pixels, np.ndarray):
        # numpy's single thread: torch's multi-threaded elementwise kernels cost milliseconds
        # here on a busy 2-core machine, numpy about 0.3 ms.
        scaled = pixels.astype(np.float32, order="C")
        scaled *= LAYOUT_SCALE
        return torch.from_numpy(scaled)
    return pixels.to(torch.float32) * torch.tensor(LAYOUT_SCALE, device=pixels.device)


@dataclass
class ConditionFrame:
    """Conditions of one frame for the V views of the rig.

    box_images, map_images: (V, 3, H, W) float32 in [0, 1] at the model resolution.
    camera_params: (V, 11) float32, see `dwm.world.rig.CAMERA_PARAM_NAMES`.
    captions: V strings, one per view.
    sim_time: s, the simulation time the frame shows.
    camera_images: the world's own pictures of the moment where it renders them (Carla's
        cameras, the embedded world's rasterised ones; `world.attach_cameras`), (V, H, W, 3)
        uint8 RGB at the model resolution, else None. Not a condition of the model: they travel
        with the frame to be shown beside it (`stream.side_by_side`) and are the demo model's
        training target.
    """

    box_images: torch.Tensor
    map_images: torch.Tensor
    camera_params: torch.Tensor
    captions: list[str]
    sim_time: float
    camera_images: np.ndarray | None = None

    @property
    def layout(self) -> torch.Tensor:
        """(V, 6, H, W): boxes then map on the channel axis, the model's layout input."""
        return torch.cat([self.box_images, self.map_images], dim=1)

    @property
    def num_views(self) -> int:
        return self.box_images.shape[0]
