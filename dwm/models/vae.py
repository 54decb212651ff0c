"""Latent decoders of the SD3 latent space (16 channels, /8, scaling 1.5305, shift 0.0609).

`TinySD3Vae`, the embedded default: the SD3 VAE's architecture at a tiny width with seeded
random weights (the full-width VAE, block_out_channels 128/256/512/512, takes about 8 s per
3-view frame on a 2-core CPU). `SD35Vae`: the SD3.5 VAE from a local SD3.5 folder, or
diffusers' `AutoencoderTiny` (TAESD3) from a local folder for faster decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn

from dwm.config import ConfigError
from dwm.models.base import LatentDecoder
from dwm.models.checkpoint import CheckpointError, load_checkpoint

LATENT_CHANNELS = 16
# SD3's latent normalisation: the denoiser works on (z - shift) * scaling.
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609


class SD3LatentDecoder(nn.Module, LatentDecoder):
    """A diffusers VAE (`self.vae`) decoding the SD3 latent space with its own config's scaling
    and shift. An nn.Module, so `.to(device)` moves it like the denoiser."""

    vae: nn.Module

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


class TinySD3Vae(SD3LatentDecoder):
    """diffusers AutoencoderKL with SD3's layout (4 down / 4 up blocks of 2 layers, 16 latent
    channels, no quant convs) at the width `block_out_channels`, with seeded random weights,
    or the weights of `checkpoint` (a state dict of that AutoencoderKL, loaded strictly: the
    demo model's, `python -m dwm.train`)."""

    def __init__(
        self,
        seed: int = 0,
        block_out_channels: tuple[int, ...] = (16, 16, 32, 32),
        norm_num_groups: int = 16,
        checkpoint: str | None = None,
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
        if checkpoint:
            if not Path(checkpoint).expanduser().is_file():
                raise ConfigError(f"model.vae.checkpoint={checkpoint}: no such file (made with the denoiser's by "
                                  "`python -m dwm.train`)")
            try:
                load_checkpoint(self.vae, Path(checkpoint).expanduser(), key="model.vae.checkpoint")
            except CheckpointError as err:
                raise ConfigError(str(err)) from None
        self.vae.eval()


class SD35Vae(SD3LatentDecoder):
    """The SD3.5 VAE from `sd35_dir`/vae (kept in float32, as the reference does), or, when
    `tiny_dir` is set, diffusers' AutoencoderTiny (TAESD3) from that folder. Local files only."""

    def __init__(self, sd35_dir: str | None = None, tiny_dir: str | None = None):
        super().__init__()
        if tiny_dir:
            folder = Path(tiny_dir).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(f"model.vae.tiny_dir={tiny_dir}: no AutoencoderTiny folder (config.json) there")
            self.vae = AutoencoderTiny.from_pretrained(folder, local_files_only=True)
        else:
            from dwm.models.sd3_text import sd35_folder

            folder = sd35_folder(sd35_dir, "model.sd35_dir", ("vae",))
            self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        if self.vae.config.latent_channels != LATENT_CHANNELS:
            raise ConfigError(
                f"the VAE in {folder} has {self.vae.config.latent_channels} latent channels; "
                f"the model's latent space has {LATENT_CHANNELS} (an SD3 VAE)"
            )
        self.vae.eval().requires_grad_(False)
