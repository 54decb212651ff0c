"""Drawing projected segments with OpenCV and resizing layouts to the model resolution."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dwm.conditions.projection import clip_segments

# cv2 thickness 2 draws lines 3 px across, which is what the reference's PIL
# `ImageDraw.line(width=3)` draws at 640x360; cv2 thickness 3 draws 5 px. Measured on random
# segments after the resize to 304 px: mean abs difference 2.1/255 for thickness 2 with
# truncated coordinates (PIL truncates), 12.3/255 for thickness 3, 4.3/255 for LINE_AA.
LINE_THICKNESS = 2


def clip_to_window(
    p0: np.ndarray, p1: np.ndarray, width: int, height: int, margin: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The segments (n, 2) px that can touch the image, with ends safe to draw.

    Segments whose bounding box misses the image grown by `margin` px (the pen's reach) are
    left out: they draw nothing. Near-plane clipping can put ends millions of pixels away,
    which would overflow OpenCV's fixed-point coordinates, so the others have their ends
    moved along the segment into a window one image larger on each side (the direction is
    kept; a moved end is off-image). Returns (index (m,) into the input, p0', p1' (m, 2)).
    """
    x0, y0, x1, y1 = p0[:, 0], p0[:, 1], p1[:, 0], p1[:, 1]
    near_image = (
        (np.maximum(x0, x1) >= -margin)
        & (np.minimum(x0, x1) <= width + margin)
        & (np.maximum(y0, y1) >= -margin)
        & (np.minimum(y0, y1) <= height + margin)
    )
    index = np.flatnonzero(near_image)
    q0, q1, inside = clip_segments(p0[index], p1[index], (-width, -height), (2 * width, 2 * height), axes=(0, 1))
    return index[inside], q0[inside], q1[inside]


def visible_in_image(p0: np.ndarray, p1: np.ndarray, width: int, height: int):
    """The parts of pixel segments (..., 2) inside the image: (p0', p1', keep) as `clip_segments`."""
    return clip_segments(p0, p1, (0.0, 0.0), (float(width), float(height)), axes=(0, 1))


def draw_segments(canvas: np.ndarray, p0: np.ndarray, p1: np.ndarray, colour, thickness: int) -> None:
    """Draw n segments p0 (n, 2) -> p1 (n, 2), pixels inside `clip_to_window`'s window, on an
    (H, W, 3) uint8 canvas in place, with one OpenCV call."""
    if len(p0) == 0:
        return
    # (n, 2, 2) int32: OpenCV takes it as n two-point polylines. astype truncates, as PIL does.
    segments = np.stack([p0, p1], axis=1).astype(np.int32)
    cv2.polylines(canvas, segments, False, colour, thickness, cv2.LINE_8)


def draw_grouped(
    canvases: np.ndarray,
    views: np.ndarray,
    groups: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    colours: list,
    thickness: int,
) -> None:
    """Draw segments p0 -> p1 (n, 2) on canvases (V, H, W, 3): segment i on view views[i] in
    colours[groups[i]]. Groups are drawn in increasing order (later ones paint over earlier
    ones), one OpenCV call per (group, view) present."""
    if len(views) == 0:
        return
    key = groups * len(canvases) + views
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
    for chunk in np.split(order, starts[1:]):
        group, view = divmod(int(key[chunk[0]]), len(canvases))
        draw_segments(canvases[view], p0[chunk], p1[chunk], colours[group], thickness)


def resize_layouts(images: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, h, w) float32 in [0, 1], size = (h, w).

    Antialiased bilinear on uint8, which is PIL's bilinear resize (the reference's
    torchvision `Resize` on PIL images) to within one grey level.
    """
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # channels-last view, no copy
    if tuple(pixels.shape[-2:]) != tuple(size):
        pixels = F.interpolate(pixels, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    # The uint8 -> float step in numpy: torch's multi-threaded elementwise kernels cost
    # milliseconds here on a busy 2-core machine, numpy's single thread about 0.3 ms.
    scaled = pixels.numpy().astype(np.float32, order="C")
    scaled *= np.float32(1.0 / 255.0)
    return torch.from_numpy(scaled)
