"""How well a demo model's pictures follow their conditions, on held-out drives.

    python -m bench.bench_demo RUN_DIR [--drives 3] [--frames 16] [--out bench/results/demo-quality.md]

RUN_DIR holds `denoiser.safetensors` and `vae.safetensors` (`python -m dwm.train`). Each drive
is a seed never used in training (a map in turn), the ego on autopilot, the world's rasterised
cameras on. For every generated frame (the decoded views at the output size) against the
world's own picture of the same moment:
- PSNR and SSIM (scikit-image) of the views, against the frame's own pictures and, as the
  floor a picture that ignores its conditions would reach, against shuffled ones: the views
  in another order, and the pictures of a frame 8 frames away;
- temporal change: the mean absolute change of the generated views from frame to frame,
  against that of the world's pictures.
The same for the architecture with random weights (the floor of everything). Prints a table
(and writes it with --out) and a strip of 8 frames, generated over rendered
(`demo-strip.png` beside --out).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dwm.conditions.builder import ConditionBuilder
from dwm.config import compose, instantiate
from dwm.pipelines.streaming import StreamingPipeline
from dwm.session import DrivingSession

MAPS = ("highway", "merge", "roundabout", "intersection")
HELD_OUT_SEED = 10_000  # training draws its worlds' seeds from its own generator; these are apart
SHIFT_FRAMES = 8


def drive(overrides: list[str], seed: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(generated (F, V, h, w, 3), rendered (F, V, h, w, 3)) uint8 of one held-out drive."""
    cfg = compose([*overrides, f"world.seed={seed}", f"world.map={MAPS[seed % len(MAPS)]}",
                   "world.attach_cameras=true", "world.vehicles=16"])
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    pipeline = StreamingPipeline.from_config(cfg, views=builder.num_views)
    session = DrivingSession.start(world, builder, pipeline.depth, ego_id="ego", autopilot=True)
    generated, rendered = [], []
    while len(generated) < frames:
        for frame in session.step(world, pipeline):
            views = frame.images.numpy() if hasattr(frame.images, "numpy") else np.asarray(frame.images)
            h, w = views.shape[1:3]
            generated.append(views)
            rendered.append(np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA)
                                      for c in frame.conditions.camera_images]))
        world.tick()
    world.close()
    return np.stack(generated[:frames]), np.stack(rendered[:frames])


def scores(generated: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over frames and views."""
    psnr, ssim = [], []
    for g_frame, t_frame in zip(generated, target):
        for g, t in zip(g_frame, t_frame):
            psnr.append(peak_signal_noise_ratio(t, g, data_range=255))
            ssim.append(structural_similarity(t, g, channel_axis=-1, data_range=255))
    return float(np.mean(psnr)), float(np.mean(ssim))


def change(frames: np.ndarray) -> float:
    """Mean absolute change from frame to frame, grey levels."""
    return float(np.abs(np.diff(frames.astype(np.float32), axis=0)).mean())


def evaluate(overrides: list[str], drives: int, frames: int) -> tuple[dict, np.ndarray, np.ndarray]:
    rows = {"own": [], "views shuffled": [], f"{SHIFT_FRAMES} frames away": [], "change": [], "rendered change": []}
    first = None
    for k in range(drives):
        generated, rendered = drive(overrides, HELD_OUT_SEED + k, frames)
        first = first or (generated, rendered)
        rows["own"].append(scores(generated, rendered))
        rows["views shuffled"].append(scores(generated, np.roll(rendered, 1, axis=1)))
        rows[f"{SHIFT_FRAMES} frames away"].append(scores(generated, np.roll(rendered, SHIFT_FRAMES, axis=0)))
        rows["change"].append(change(generated))
        rows["rendered change"].append(change(rendered))
    return {k: np.mean(v, axis=0) for k, v in rows.items()}, *first


def strip(generated: np.ndarray, rendered: np.ndarray, count: int = 8) -> np.ndarray:
    """count frames, each its views side by side, generated above rendered."""
    picks = np.linspace(0, len(generated) - 1, count).round().astype(int)
    rows = [np.concatenate([np.concatenate(list(generated[i]), axis=1), np.concatenate(list(rendered[i]), axis=1)])
            for i in picks]
    return np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="folder with denoiser.safetensors and vae.safetensors")
    parser.add_argument("--drives", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    trained = ["model=demo", f"model.checkpoint={args.run / 'denoiser.safetensors'}",
               f"model.vae.checkpoint={args.run / 'vae.safetensors'}"]
    random = ["model=demo", "model.checkpoint=null", "model.random_weights=true", "model.vae.checkpoint=null"]
    results = {}
    for name, overrides in (("trained", trained), ("random weights", random)):
        results[name], generated, rendered = evaluate(overrides, args.drives, args.frames)
        if name == "trained":
            picture = strip(generated, rendered)
    lines = [f"Held-out drives: {args.drives} x {args.frames} frames (seeds {HELD_OUT_SEED}..), weights {args.run}", "",
             "| weights | PSNR own | PSNR views shuffled | PSNR 8 frames away | SSIM own | SSIM views shuffled "
             "| SSIM 8 frames away | change / rendered change |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        shifted = r[f"{SHIFT_FRAMES} frames away"]
        lines.append(f"| {name} | {r['own'][0]:.2f} | {r['views shuffled'][0]:.2f} | {shifted[0]:.2f} | "
                     f"{r['own'][1]:.3f} | {r['views shuffled'][1]:.3f} | {shifted[1]:.3f} | "
                     f"{r['change'] / r['rendered change']:.2f} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
        cv2.imwrite(str(args.out.with_name("demo-strip.png")), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
