"""The layout adapter of CTSD 3.5 XS: layout images -> a residual per early transformer block
(T2I-Adapter style, built from diffusers' adapter blocks)."""

from __future__ import annotations

import torch
from diffusers.models.adapter import AdapterBlock
from torch import nn

LAYOUT_CHANNELS = 6  # 3D-box image then HD-map image, RGB each
VAE_DOWNSCALE = 8  # pixels per latent cell (the SD3 VAE)

def _adapter_stage(in_channels: int, width: int, num_res_blocks: int, pool: int | None) -> AdapterBlock:
    """One stage of the layout adapter: diffusers' T2I-Adapter `AdapterBlock` (average pool,
    a 1x1 conv where the channels change, then residual blocks of 3x3 conv, ReLU, 1x1 conv).

    pool: the first stage pools by the patch size, so that the features have one cell per
    image token (diffusers' block pools by 2); ceil_mode, as diffusers', so an odd latent size
    still gives ceil(h/p) x ceil(w/p) tokens. None: no pooling (the later stages).
    """
    stage = AdapterBlock(in_channels, width, num_res_blocks, down=pool is not None)
    if pool is not None:
        stage.downsample = nn.AvgPool2d(pool, ceil_mode=True)  # no parameters: keys unchanged
    return stage


class ImageAdapter(nn.Module):
    """Layout images -> one feature map per early transformer block (T2I-Adapter style).

    (B, 6, H, W) -> PixelUnshuffle(8) -> (B, 384, H/8, W/8) -> stage 0: average pool by the
    patch size, 1x1 conv to D, residual blocks -> stages 1..K-1: residual blocks (each stage
    a diffusers `AdapterBlock`, see `_adapter_stage`); stage k's output goes through a 1x1
    conv (`zero_convs[k]`) and is added to the image tokens before transformer block k.

    zero_init: the released model zero-initialises the `zero_convs`, so that its training
    started from a model the layout does not disturb, and then learned them (its checkpoint
    holds the learned ones). A model with random weights is never trained: zero convs would
    stay zero and the layout would have no effect on anything it makes, so the embedded
    default keeps PyTorch's default initialisation (`zero_init=False`) and a different layout
    gives a different velocity, most of all where the layouts differ.
    """

    def __init__(self, width: int, num_stages: int, patch_size: int, num_res_blocks: int = 2, zero_init: bool = False):
        super().__init__()
        unshuffled = LAYOUT_CHANNELS * VAE_DOWNSCALE**2
        self.width = width
        self.unshuffle = nn.PixelUnshuffle(VAE_DOWNSCALE)
        self.body = nn.ModuleList(
            _adapter_stage(width if k else unshuffled, width, num_res_blocks, None if k else patch_size)
            for k in range(num_stages)
        )
        self.zero_convs = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(num_stages))
        if zero_init:
            for conv in self.zero_convs:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.patch_size = patch_size

    def forward(self, layout: torch.Tensor) -> torch.Tensor:
        """layout (B, 6, H, W) in [0, 1] -> features (B, K, S, D), S = (H/8/p) * (W/8/p)."""
        x = self.unshuffle(layout)
        if not self.body:
            p = self.patch_size
            tokens = -(-x.shape[2] // p) * -(-x.shape[3] // p)
            return x.new_zeros(x.shape[0], 0, tokens, self.width)
        features = []
        for stage, zero_conv in zip(self.body, self.zero_convs):
            x = stage(x)
            features.append(zero_conv(x).flatten(2).transpose(1, 2))  # (B, S, D)
        return torch.stack(features, dim=1)
