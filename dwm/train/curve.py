"""A loss curve as a PNG (drawn with OpenCV): the raw losses in grey, their running mean in
blue, log scale, so progress (or its absence) can be seen without a notebook."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SIZE = (720, 400)  # px, W x H
MARGIN = 60


def running_mean(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential running mean with about `span` steps of memory."""
    out = np.empty_like(values)
    alpha, acc = 2.0 / (span + 1.0), values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def plot_losses(losses: list[float], path: str | Path, title: str) -> None:
    """Write the curve of `losses` (one per step) to `path` (PNG)."""
    width, height = SIZE
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
    cv2.putText(canvas, title, (MARGIN, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (MARGIN, MARGIN), (width - 20, height - MARGIN), (0, 0, 0), 1)
    if len(values) >= 2:
        smooth = running_mean(values, max(len(values) // 50, 5))
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1.0
        x = MARGIN + np.arange(len(values)) * (width - 20 - MARGIN) / (len(values) - 1)

        def points(v: np.ndarray) -> np.ndarray:
            y = height - MARGIN - (v - lo) / (hi - lo) * (height - 2 * MARGIN)
            return np.stack([x, y], axis=1).round().astype(np.int32).reshape(-1, 1, 2)

        cv2.polylines(canvas, [points(values)], False, (200, 200, 200), 1, cv2.LINE_AA)
        cv2.polylines(canvas, [points(smooth)], False, (200, 80, 20), 2, cv2.LINE_AA)
        for text, y in ((f"{10 ** hi:.3g}", MARGIN + 5), (f"{10 ** lo:.3g}", height - MARGIN)):
            cv2.putText(canvas, text, (2, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        last = f"step {len(values)}: mean of the last {min(len(values), 50)} {np.mean(losses[-50:]):.4g}"
        cv2.putText(canvas, last, (MARGIN, height - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), canvas)
