"""Still images for HTTP viewers: a JPEG per frame (MJPEG, WebSocket) and PNG for exact layouts."""

from __future__ import annotations

import cv2
import numpy as np


def _bgr(image: np.ndarray) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        shape = (image.shape, image.dtype) if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"an image to encode must be an (H, W, 3) uint8 RGB array, got {shape}")
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # OpenCV's codecs take BGR


def encode_jpeg(image: np.ndarray, quality: int = 80) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes (baseline, 4:2:0). quality: 1..100."""
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(f"JPEG quality must be a whole number in [1, 100], got {quality!r}")
    ok, data = cv2.imencode(".jpg", _bgr(image), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape[1]}x{image.shape[0]} JPEG")
    return data.tobytes()


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes (lossless: layout colours stay exact)."""
    ok, data = cv2.imencode(".png", _bgr(image), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape[1]}x{image.shape[0]} PNG")
    return data.tobytes()
