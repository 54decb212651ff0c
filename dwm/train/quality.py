"""How well generated views follow their conditions, against the world's own pictures of the
same moments (`world.attach_cameras`): the demo model's figures (bench/bench_demo.py) and its
test.

Every array here is a run of frames: (F, V, H, W, 3) uint8 RGB pictures, the generated views
and the rendered ones at the same size. A picture that follows its conditions agrees with its
own frame's rendered pictures more than with another frame's or another view's (the floor of a
picture that ignores them): `shuffled_views` and `frames_away` make those.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dwm.conditions.builder import ConditionBuilder
from dwm.config import compose, instantiate
from dwm.pipelines.streaming import StreamingPipeline
from dwm.session import DrivingSession

MAPS = ("highway", "merge", "roundabout", "intersection")
HELD_OUT_SEED = 10_000  # training draws its worlds' seeds from its own generator; these are apart
AGREE_LEVELS = 24  # a generated pixel agrees when no channel is farther than this from the rendered one
GREY_SPREAD = 24  # road: max - min channel of at most this (grass is green, paint and sky bright)
ROAD_BRIGHTEST = 150


def drive(overrides: list[str], seed: int, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(generated, rendered) (F, V, h, w, 3) uint8 and the vehicles' box masks (F, V, h, w)
    of one drive with the model of `overrides`: the ego on autopilot, map MAPS[seed % 4], 16
    vehicles. Seeds from HELD_OUT_SEED up were never used in training."""
    cfg = compose([*overrides, f"world.seed={seed}", f"world.map={MAPS[seed % len(MAPS)]}",
                   "world.attach_cameras=true", "world.vehicles=16"])
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    pipeline = StreamingPipeline.from_config(cfg, views=builder.num_views)
    session = DrivingSession.start(world, builder, pipeline.depth, ego_id="ego", autopilot=True)
    generated, rendered, boxes = [], [], []
    while len(generated) < frames:
        for frame in session.step(world, pipeline):
            views = frame.images.numpy() if hasattr(frame.images, "numpy") else np.asarray(frame.images)
            h, w = views.shape[1:3]
            generated.append(views)
            rendered.append(np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA)
                                      for c in frame.conditions.camera_images]))
            boxes.append(frame.conditions.box_images.numpy())
        world.tick()
    world.close()
    generated, rendered = np.stack(generated[:frames]), np.stack(rendered[:frames])
    return generated, rendered, box_masks(np.stack(boxes[:frames]), generated.shape[2:4])


def psnr_ssim(generated: np.ndarray, rendered: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over frames and views."""
    psnr, ssim = [], []
    for g_frame, r_frame in zip(generated, rendered):
        for g, r in zip(g_frame, r_frame):
            psnr.append(peak_signal_noise_ratio(r, g, data_range=255))
            ssim.append(structural_similarity(r, g, channel_axis=-1, data_range=255))
    return float(np.mean(psnr)), float(np.mean(ssim))


def shuffled_views(pictures: np.ndarray) -> np.ndarray:
    """Each frame's views in another order (view v gets view v+1's picture)."""
    return np.roll(pictures, 1, axis=1)


def frames_away(pictures: np.ndarray, frames: int) -> np.ndarray:
    """Each frame gets the pictures of the frame `frames` later (in a cycle)."""
    return np.roll(pictures, -frames, axis=0)


def change(pictures: np.ndarray) -> float:
    """Mean absolute change from frame to frame, grey levels."""
    return float(np.abs(np.diff(pictures.astype(np.float32), axis=0)).mean())


def box_masks(box_images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Where the vehicles stand in each view: the filled outline of every drawn box of the
    layout's box images (F, V, 3, h, w) float in [0, 1] (the boxes' edges), at size [H, W].
    Returns (F, V, H, W) bool."""
    frames, views = box_images.shape[:2]
    height, width = size
    masks = np.zeros((frames, views, height, width), dtype=bool)
    for f in range(frames):
        for v in range(views):
            drawn = (box_images[f, v].max(axis=0) > 0).astype(np.uint8)
            drawn = cv2.resize(drawn, (width, height), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(drawn, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            filled = np.zeros((height, width), dtype=np.uint8)
            cv2.fillPoly(filled, [cv2.convexHull(c) for c in contours], 1)
            masks[f, v] = filled > 0
    return masks


def road_masks(rendered: np.ndarray, vehicles: np.ndarray) -> np.ndarray:
    """Road pixels of the rendered pictures: below the horizon (the lower half: the rig's
    cameras look level), grey (not grass, not paint) and not a vehicle. (F, V, H, W) bool."""
    picture = rendered.astype(np.int16)
    grey = (picture.max(axis=-1) - picture.min(axis=-1) <= GREY_SPREAD) & (picture.max(axis=-1) <= ROAD_BRIGHTEST)
    below = np.zeros(rendered.shape[:-1], dtype=bool)
    below[:, :, rendered.shape[2] // 2 + 4:] = True
    return grey & below & ~vehicles


def agreement(generated: np.ndarray, rendered: np.ndarray, mask: np.ndarray) -> float:
    """Share of the masked pixels where the generated colour is within AGREE_LEVELS of the
    rendered one in every channel; nan where the mask is empty."""
    if not mask.any():
        return float("nan")
    close = np.abs(generated.astype(np.int16) - rendered.astype(np.int16)).max(axis=-1) <= AGREE_LEVELS
    return float(close[mask].mean())


def figures(generated: np.ndarray, rendered: np.ndarray, vehicles: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM, vehicle and road agreement of generated views against `rendered`; vehicles:
    the box masks of the frames the rendered pictures show."""
    psnr, ssim = psnr_ssim(generated, rendered)
    return {"psnr": psnr, "ssim": ssim, "vehicles": agreement(generated, rendered, vehicles),
            "road": agreement(generated, rendered, road_masks(rendered, vehicles))}
