"""What the demo model is trained to do: the VAE to reconstruct the world's pictures in the SD3
latent space, the denoiser the reference's objective (flow matching with diffusion forcing:
every frame of a window at its own noise level, conditions dropped for guidance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from dwm.models.base import Denoiser, FrameContext, TextEncoder
from dwm.pipelines.guidance import UNCONDITIONAL_LAYOUT_VALUE
from dwm.train.scenes import Window


def to_latents(vae: AutoencoderKL, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """Images (..., 3, H, W) in [-1, 1] -> the denoiser's latents (..., 16, H/8, W/8):
    (z - shift) * scaling, SD3's normalisation with the VAE config's factors."""
    lead = images.shape[:-3]
    posterior = vae.encode(images.flatten(0, -4)).latent_dist
    z = posterior.sample() if sample else posterior.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return z.reshape(*lead, *z.shape[1:])


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, scale_weight: float) -> tuple[torch.Tensor, dict]:
    """Reconstruction (L1 + MSE) of images (B, 3, H, W) in [-1, 1], a small KL to the unit
    Gaussian per latent element, and a pull of the normalised latents towards mean 0 and
    standard deviation 1 (the noise the denoiser starts from)."""
    posterior = vae.encode(images).latent_dist
    z = posterior.sample()
    recon = vae.decode(z).sample
    reconstruction = F.l1_loss(recon, images) + F.mse_loss(recon, images)
    kl = posterior.kl().mean() / z[0].numel()
    scaled = (z - vae.config.shift_factor) * vae.config.scaling_factor
    scale = (scaled.std() - 1.0) ** 2 + scaled.mean() ** 2
    loss = reconstruction + kl_weight * kl + scale_weight * scale
    return loss, {"recon": float(reconstruction.detach()), "kl": float(kl.detach()),
                  "latent_std": float(scaled.detach().std())}


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift of uniform levels u in [0, 1]: the sigmas the queue's schedule uses."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_sigmas(n: int, t: int, shift: float, queue_share: float, generator: torch.Generator) -> torch.Tensor:
    """(n, t) noise levels, one per frame (diffusion forcing). A `queue_share` of the windows
    gets the FIFO queue's pattern (the oldest frame the cleanest, one level per frame, the
    whole pattern at a random phase), the others independent levels per frame."""
    u = torch.rand(n, t, generator=generator)
    phase = torch.rand(n, 1, generator=generator) / t
    staggered = phase + torch.arange(t) / t
    queue = torch.rand(n, 1, generator=generator) < queue_share
    return shifted(torch.where(queue, staggered, u), shift)


def window_contexts(
    denoiser: Denoiser, text_encoder: TextEncoder, windows: list[Window], dropped: list[bool],
    device: torch.device | str = "cpu",
) -> FrameContext:
    """The frame contexts of N windows, each tensor (N, T, V, ...); a dropped window gets the
    unconditional inputs of inference (grey layout, empty captions) in every frame."""
    n, (t, v) = len(windows), windows[0].layout.shape[:2]
    layouts, captions = [], []
    for window, drop in zip(windows, dropped):
        layouts.append(torch.full_like(window.layout, UNCONDITIONAL_LAYOUT_VALUE) if drop else window.layout)
        captions += [""] * (t * v) if drop else [c for frame in window.captions for c in frame]
    layout = torch.stack(layouts).flatten(0, 2).to(device)  # (N*T*V, 6, H, W)
    camera = torch.stack([w.camera_params for w in windows]).flatten(0, 2).float().to(device)  # (N*T*V, 11)
    text = text_encoder.encode(captions)
    context = denoiser.frame_context(layout, camera, type(text)(text.tokens.to(device), text.pooled.to(device)))
    return {key: value.reshape(n, t, v, *value.shape[1:]) for key, value in context.items()}


def flow_matching_loss(
    denoiser: Denoiser, latents: torch.Tensor, context: FrameContext, sigmas: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """MSE of the predicted velocity: latents (N, T, V, C, h, w) clean, sigmas (N, T) one per
    frame, noise like latents. x = (1 - sigma) x0 + sigma * noise; the target velocity is
    noise - x0 (the queue steps x <- x + (sigma' - sigma) v)."""
    s = sigmas[:, :, None, None, None, None]
    noisy = (1.0 - s) * latents + s * noise
    timesteps = (sigmas * 1000.0)[:, :, None].expand(-1, -1, latents.shape[2])
    velocity = denoiser(noisy, timesteps.contiguous(), context)
    return F.mse_loss(velocity.float(), noise - latents)
