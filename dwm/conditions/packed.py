"""A ConditionFrame packed to cross a process boundary (the Serve actors): 4x smaller, exact.

The layout images are rasterised in uint8 and only then scaled to [0, 1] (`resize_layouts`),
so every value is k/255: they travel as uint8 and come back bit for bit. Packing also gives
the arrays their own memory (the builder's box and map images are views of one tensor, which
a pickler would send twice in full).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dwm.conditions.frame import ConditionFrame

_SCALE = np.float32(1.0 / 255.0)  # the factor `resize_layouts` applies, so the round trip is exact


@dataclass
class PackedConditions:
    """layout: (V, 6, H, W) uint8, box image channels then map image channels, x 255.
    camera_params: (V, 11) float32. captions: V strings. sim_time: s."""

    layout: np.ndarray
    camera_params: np.ndarray
    captions: list[str]
    sim_time: float

    @classmethod
    def pack(cls, frame: ConditionFrame) -> "PackedConditions":
        layout = frame.layout.detach().cpu().numpy()  # (V, 6, H, W) float32, a new array
        layout *= 255.0
        return cls(
            layout=np.rint(layout).astype(np.uint8),
            camera_params=frame.camera_params.detach().cpu().numpy().astype(np.float32, copy=True),
            captions=list(frame.captions),
            sim_time=float(frame.sim_time),
        )

    def unpack(self) -> ConditionFrame:
        layout = self.layout.astype(np.float32)
        layout *= _SCALE
        images = torch.from_numpy(layout)  # (V, 6, H, W)
        return ConditionFrame(
            box_images=images[:, :3],
            map_images=images[:, 3:],
            camera_params=torch.from_numpy(self.camera_params),
            captions=list(self.captions),
            sim_time=self.sim_time,
        )
