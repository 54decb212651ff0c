"""How well a demo model's pictures follow their conditions, on held-out drives.

    python -m bench.bench_demo RUN_DIR [--drives 3] [--frames 16] [--out bench/results/demo-quality.md]

RUN_DIR holds `denoiser.safetensors` and `vae.safetensors` (`python -m dwm.train`); without
it, the weights shipped with `model=demo`. Each drive is a seed never used in training (a map
in turn), the ego on autopilot, the world's rasterised cameras on. For every generated frame
(the decoded views at the output size) against the world's own picture of the same moment
(`dwm.train.quality`):
- PSNR and SSIM of the views, against the frame's own pictures and, as the floor a picture
  that ignores its conditions would reach, against shuffled ones: the views in another
  order, and the pictures of a frame 8 frames away;
- per-class agreement: the share of pixels inside the vehicles' projected boxes, and of road
  pixels below the horizon, whose generated colour is close to the rendered one;
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

from dwm.train.quality import HELD_OUT_SEED, change, drive, figures, frames_away, shuffled_views

SHIFT_FRAMES = 8
COMPARED = ("own", "views shuffled", f"{SHIFT_FRAMES} frames away")


def compared(generated: np.ndarray, rendered: np.ndarray, vehicles: np.ndarray) -> dict[str, dict[str, float]]:
    """The figures of generated views against their own frames' pictures and the floors."""
    return {
        "own": figures(generated, rendered, vehicles),
        "views shuffled": figures(generated, shuffled_views(rendered), shuffled_views(vehicles)),
        f"{SHIFT_FRAMES} frames away": figures(generated, frames_away(rendered, SHIFT_FRAMES),
                                               frames_away(vehicles, SHIFT_FRAMES)),
    }


def evaluate(overrides: list[str], drives: int, frames: int) -> tuple[dict, float, np.ndarray, np.ndarray]:
    """Figures averaged over drives, the temporal change ratio, and the first drive's frames."""
    runs, ratios, first = [], [], None
    for k in range(drives):
        generated, rendered, vehicles = drive(overrides, HELD_OUT_SEED + k, frames)
        first = first or (generated, rendered)
        runs.append(compared(generated, rendered, vehicles))
        ratios.append(change(generated) / max(change(rendered), 1e-6))
    mean = {c: {m: float(np.nanmean([r[c][m] for r in runs])) for m in runs[0][c]} for c in COMPARED}
    return mean, float(np.mean(ratios)), *first


def strip(generated: np.ndarray, rendered: np.ndarray, count: int = 8) -> np.ndarray:
    """count frames, each its views side by side, generated above rendered."""
    picks = np.linspace(0, len(generated) - 1, count).round().astype(int)
    rows = [np.concatenate([np.concatenate(list(generated[i]), axis=1), np.concatenate(list(rendered[i]), axis=1)])
            for i in picks]
    return np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", default=None,
                        help="folder with denoiser.safetensors and vae.safetensors (default: the shipped weights)")
    parser.add_argument("--drives", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    trained = ["model=demo"] + ([f"model.checkpoint={args.run / 'denoiser.safetensors'}",
                                 f"model.vae.checkpoint={args.run / 'vae.safetensors'}"] if args.run else [])
    random = ["model=demo", "model.checkpoint=null", "model.random_weights=true", "model.vae.checkpoint=null"]
    results = {}
    for name, overrides in (("trained", trained), ("random weights", random)):
        *results[name], generated, rendered = evaluate(overrides, args.drives, args.frames)
        if name == "trained":
            picture = strip(generated, rendered)
    lines = [f"Held-out drives: {args.drives} x {args.frames} frames (seeds {HELD_OUT_SEED}..), "
             f"weights {args.run or 'shipped'}", "",
             "| weights | against | PSNR dB | SSIM | vehicles agree | road agrees | change / rendered change |",
             "|---|---|---|---|---|---|---|"]
    for name, (by, ratio) in results.items():
        for against in COMPARED:
            r = by[against]
            lines.append(f"| {name} | {against} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['vehicles']:.3f} | "
                         f"{r['road']:.3f} | {ratio:.2f} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
        cv2.imwrite(str(args.out.with_name("demo-strip.png")), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
