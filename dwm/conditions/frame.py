"""The conditions of one simulated moment, as the denoiser takes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ConditionFrame:
    """Conditions of one frame for the V views of the rig.

    box_images, map_images: (V, 3, H, W) float32 in [0, 1] at the model resolution.
    camera_params: (V, 11) float32, see `dwm.world.rig.CAMERA_PARAM_NAMES`.
    captions: V strings, one per view.
    sim_time: s, the simulation time the frame shows.
    """

    box_images: torch.Tensor
    map_images: torch.Tensor
    camera_params: torch.Tensor
    captions: list[str]
    sim_time: float

    @property
    def layout(self) -> torch.Tensor:
        """(V, 6, H, W): boxes then map on the channel axis, the model's layout input."""
        return torch.cat([self.box_images, self.map_images], dim=1)

    @property
    def num_views(self) -> int:
        return self.box_images.shape[0]
