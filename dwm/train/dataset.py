"""Rendered windows kept for the denoiser's training: drawn and VAE-encoded once, used for many
steps. Rendering a window and encoding its pictures costs about ten times a training step of
the demo denoiser on a CPU; the latents are small, and the layouts (mostly black line
drawings) are kept zlib-compressed (about 20x smaller than raw uint8)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dwm.train.scenes import Window

LAYOUT_SCALE = 255.0  # layouts are [0, 1] floats made from uint8 drawings (`resize_layouts`): exact


@dataclass
class EncodedWindow:
    """One window as the denoiser's training uses it.

    latents (T, V, 16, h, w) float16, the VAE's normalised latents; layout: zlib of (T, V, 6,
    H, W) uint8; layout_shape; camera_params (T, V, 11) float32; captions: T lists of V."""

    latents: torch.Tensor
    layout: bytes
    layout_shape: tuple[int, ...]
    camera_params: torch.Tensor
    captions: list[list[str]]

    @staticmethod
    def of(window: Window, latents: torch.Tensor) -> "EncodedWindow":
        layout = (window.layout * LAYOUT_SCALE).round().to(torch.uint8).numpy()
        return EncodedWindow(latents.to(torch.float16), zlib.compress(layout.tobytes(), 1), layout.shape,
                             window.camera_params, window.captions)

    def window(self) -> Window:
        """As a `Window` without pictures (images is None): what the conditions need."""
        layout = np.frombuffer(zlib.decompress(self.layout), dtype=np.uint8).reshape(self.layout_shape)
        return Window(None, torch.from_numpy(layout.astype(np.float32) / LAYOUT_SCALE), self.camera_params,
                      self.captions)


class WindowSet:
    """`count` windows from `source` (an iterator of `Window`s) with their latents from
    `encode` (images (N, T, V, 3, H, W) -> latents (N, T, V, 16, h, w)), saved to `path` and
    read back from there by a resumed training."""

    def __init__(self, windows: list[EncodedWindow]):
        self.windows = windows

    @classmethod
    def build(cls, source, count: int, encode, path: Path, batch: int = 2) -> "WindowSet":
        if path.is_file():
            saved = torch.load(path, weights_only=False)
            if len(saved) >= count:
                return cls(saved[:count])
        windows: list[EncodedWindow] = []
        with tqdm(total=count, desc="rendering scenes", unit="window", dynamic_ncols=True) as bar:
            while len(windows) < count:
                drawn = [next(source) for _ in range(min(batch, count - len(windows)))]
                with torch.no_grad():
                    latents = encode(torch.stack([w.images for w in drawn]))
                windows += [EncodedWindow.of(w, z) for w, z in zip(drawn, latents)]
                bar.update(len(drawn))
        partial = path.with_suffix(".partial")
        torch.save(windows, partial)
        partial.replace(path)
        return cls(windows)

    def sample(self, n: int, generator: torch.Generator) -> tuple[list[Window], torch.Tensor]:
        """n windows at random: (their conditions as `Window`s, latents (n, T, V, 16, h, w) float32)."""
        picks = torch.randint(len(self.windows), (n,), generator=generator).tolist()
        chosen = [self.windows[i] for i in picks]
        return [w.window() for w in chosen], torch.stack([w.latents for w in chosen]).float()

    def __len__(self) -> int:
        return len(self.windows)
