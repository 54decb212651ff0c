"""Compose the decoded views of one frame into the single RGB strip that is published."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# Strength of the layout overlay: the reference's preview blends at most 60 % layout colour.
OVERLAY_OPACITY = 0.6


def compose_strip(
    views: torch.Tensor | np.ndarray, layout: torch.Tensor | None = None, cameras: np.ndarray | None = None
) -> np.ndarray:
    """Put the V views side by side, left to right in rig order, optionally with the layout,
    and optionally with the world's own pictures of the same moment under them.

    views: (V, h, w, 3) uint8 RGB at the output size (`GeneratedFrame.images`, made by
        `dwm.pipelines.decode`; `to_uint8_views` turns float images into these).
    layout: optional (V, 6, H', W') float in [0, 1], box image channels then map image
        channels (`ConditionFrame.layout`). It is drawn over the views with the reference's
        preview rule: cond = max(box, map) per pixel and channel, nearest-resized to [h, w];
        alpha = 0.6 * max over channels of cond; out = cond * 255 * alpha + img * (1 - alpha).

    cameras: optional (V, H', W', 3) uint8 RGB, the world's pictures (`ConditionFrame.
        camera_images`): resized to [h, w] and put as a second row, each under its view, so
        the strip is (2h, V * w, 3) (`stream.side_by_side`).

    Returns the strip, (h, V * w, 3) (or (2h, V * w, 3)) uint8, C-contiguous (ready for the encoder).
    """
    if isinstance(views, torch.Tensor):
        views = views.detach().cpu().numpy()
    if not isinstance(views, np.ndarray) or views.ndim != 4 or views.shape[-1] != 3 or views.dtype != np.uint8:
        raise ValueError(
            "views must be (V, h, w, 3) uint8 RGB views, got "
            f"{(tuple(views.shape), str(views.dtype)) if isinstance(views, np.ndarray) else type(views).__name__}"
        )
    num_views, h, w, _ = views.shape
    if num_views == 0:
        raise ValueError("views must hold at least one view, got V = 0")
    strip = np.ascontiguousarray(views.transpose(1, 0, 2, 3)).reshape(h, num_views * w, 3)
    if layout is not None:
        strip = _overlaid(strip, layout, num_views, h, w)
    if cameras is None:
        return strip
    if not isinstance(cameras, np.ndarray) or cameras.ndim != 4 or len(cameras) != num_views or cameras.dtype != np.uint8:
        raise ValueError(f"cameras must be ({num_views}, H, W, 3) uint8 RGB pictures, one per view, got "
                         f"{(tuple(cameras.shape), str(cameras.dtype)) if isinstance(cameras, np.ndarray) else type(cameras).__name__}")
    row = np.concatenate([cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA) for c in cameras], axis=1)
    return np.concatenate([strip, row], axis=0)


def _overlaid(strip: np.ndarray, layout: torch.Tensor, num_views: int, h: int, w: int) -> np.ndarray:
    """The strip (h, V*w, 3) uint8 with the layout blended over it (`compose_strip`'s rule).
    The per-pixel work runs in numpy, in place on two strip-sized buffers: torch's thread
    pool costs more than it saves on arrays this small, most of all on busy CPUs."""
    with torch.no_grad():
        cond = _layout_condition(layout, num_views, h, w)
    blended = strip.astype(np.float32)
    overlay = _to_strip(cond)  # (h, V*w, 3) float32
    np.clip(overlay, 0.0, 1.0, out=overlay)
    # (h, V*w, 1); pairwise, as numpy reduces slowly over a 3-long last axis.
    alpha = np.maximum(np.maximum(overlay[..., 0], overlay[..., 1]), overlay[..., 2])[..., None]
    alpha *= OVERLAY_OPACITY
    overlay *= 255.0
    overlay *= alpha
    np.subtract(1.0, alpha, out=alpha)
    blended *= alpha
    blended += overlay
    # At most 255 (a convex blend of values <= 255); truncated like the reference's astype.
    return blended.astype(np.uint8)


def _to_strip(images: np.ndarray) -> np.ndarray:
    """(V, 3, h, w) -> (h, V*w, 3) float32, a new array: the views side by side."""
    v, c, h, w = images.shape
    strip = np.empty((h, v, w, c), np.float32)
    strip[...] = images.transpose(2, 0, 3, 1)
    return strip.reshape(h, v * w, c)


def _layout_condition(layout: torch.Tensor, num_views: int, h: int, w: int) -> np.ndarray:
    """(V, 6, H', W') boxes then map -> (V, 3, h, w) float32 max(box, map), nearest-resized."""
    if not isinstance(layout, torch.Tensor) or layout.ndim != 4 or layout.shape[1] != 6:
        raise ValueError(
            "layout must be a (V, 6, H, W) tensor (box image channels then map image channels), "
            f"got {tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__}"
        )
    if layout.shape[0] != num_views:
        raise ValueError(f"layout has {layout.shape[0]} views but views has {num_views}; they must match")
    lay = layout.detach().to("cpu", torch.float32).numpy()
    cond = np.maximum(lay[:, :3], lay[:, 3:])
    if cond.shape[-2:] != (h, w):
        # torch's nearest, as the reference: source index floor(i * in / out).
        cond = F.interpolate(torch.from_numpy(cond), size=(h, w), mode="nearest").numpy()
    return cond
