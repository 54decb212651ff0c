"""The embedded default latent decoder: the SD3 VAE's architecture at a tiny width.

The full-width SD3 VAE (block_out_channels 128/256/512/512) takes about 8 s per 3-view frame
on a 2-core CPU; the same architecture at a tiny width decodes the same latent space layout
(16 channels, /8, SD3 scaling and shift) fast enough for the embedded default.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from dwm.models.base import LatentDecoder

LATENT_CHANNELS = 16
# SD3's latent normalisation: the denoiser works on (z - shift) * scaling.
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609


class TinySD3Vae(nn.Module, LatentDecoder):
    """diffusers AutoencoderKL with SD3's layout (4 down / 4 up blocks of 2 layers, 16 latent
    channels, no quant convs) at the width `block_out_channels`, with seeded random weights.

    An nn.Module, so `.to(device)` moves it like the denoiser.
    """

    def __init__(
        self,
        seed: int = 0,
        block_out_channels: tuple[int, ...] = (16, 16, 32, 32),
        norm_num_groups: int = 16,
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        if len(block_out_channels) != 4:
            raise ValueError(
                f"block_out_channels={list(block_out_channels)}: the SD3 VAE has 4 blocks "
                "(3 down-samplings, an /8 latent)"
            )
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every entry of "
                f"block_out_channels={list(block_out_channels)}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=LATENT_CHANNELS,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=block_out_channels,
                layers_per_block=2,
                norm_num_groups=norm_num_groups,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=SD3_SCALING_FACTOR,
                shift_factor=SD3_SHIFT_FACTOR,
            )
        self.vae.eval()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (V, 16, h, w) in the denoiser's space -> images (V, 3, 8h, 8w), float32 in
        [0, 1], on the VAE's device."""
        if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}; expected (V, {LATENT_CHANNELS}, h, w)"
            )
        param = next(self.vae.parameters())
        config = self.vae.config
        with torch.inference_mode():
            z = latents.to(param.device, param.dtype) / config.scaling_factor + config.shift_factor
            images = self.vae.decode(z).sample  # (V, 3, 8h, 8w) in about [-1, 1]
            return ((images.float() + 1) / 2).clamp_(0, 1)
