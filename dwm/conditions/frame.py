"""The conditions of one simulated moment, as the denoiser takes them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
