"""Rendered windows kept for the denoiser's training: drawn and VAE-encoded once, used for many
steps. Rendering a window and encoding its pictures costs about ten times a training step of
the demo denoiser on a CPU. The latents are kept in float16; each frame's conditions packed as
they cross between processes (`PackedConditions`: exact, the layouts zlib-compressed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dwm.conditions.frame import ConditionFrame
from dwm.conditions.packed import PackedConditions
from dwm.train.scenes import Window


@dataclass
class EncodedWindow:
    """One window as the denoiser's training uses it: latents (T, V, 16, h, w) float16, the
    VAE's normalised latents, and its T frames' conditions."""

    latents: torch.Tensor
    frames: list[PackedConditions]

    @staticmethod
    def of(window: Window, latents: torch.Tensor) -> "EncodedWindow":
        frames = [PackedConditions.pack(ConditionFrame(layout[:, :3], layout[:, 3:], camera, captions, 0.0))
                  for layout, camera, captions in zip(window.layout, window.camera_params, window.captions)]
        return EncodedWindow(latents.to(torch.float16), frames)

    def window(self) -> Window:
        """As a `Window` without pictures (images is None): what the conditions need."""
        frames = [f.unpack() for f in self.frames]
        return Window(None, torch.stack([f.layout for f in frames]), torch.stack([f.camera_params for f in frames]),
                      [f.captions for f in frames])


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
