"""Frames leaving the queue -> the uint8 views that are published, made on the VAE's device.

Everything between the latent and the bytes happens where the VAE is: the decode, the resize
to the output size (bilinear with antialiasing, as PIL resizes the reference's preview), the
clip to [0, 1] and the rounding to 8 bits. Only uint8 crosses to the host: 4x less than
float32, at the output size. On a GPU the leaving frames of a round (all sessions) are
decoded in one call; on a CPU one frame at a time, which was 1.8x faster on a 2-core CPU
(12 views at once against 4 x 3, tiny VAE: larger activations fall out of the caches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dwm.models.base import LatentDecoder


def to_uint8_views(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """images (V, 3, H, W) float, about [0, 1] -> (V, h, w, 3) uint8 at size [h, w], on the
    same device: resized (bilinear, antialiased) while float, then clipped and rounded."""
    h, w = (int(n) for n in size)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (V, 3, H, W) RGB, got {tuple(images.shape)}")
    images = images.float()
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class FrameDecoder:
    """Decodes leaving latent frames into published views.

    decoder: the VAE (wherever it is); output_size: [h, w] of each published view
    (`pipeline.output_size`); batch: decode several frames in one call (None: on CUDA only).
    """

    def __init__(self, decoder: LatentDecoder, output_size: Sequence[int], batch: bool | None = None):
        h, w = (int(n) for n in output_size)
        if h <= 0 or w <= 0:
            raise ValueError(f"output_size must be two positive sizes [height, width], got {[h, w]}")
        self.decoder, self.output_size = decoder, (h, w)
        self.batch = batch

    def _batched(self, latents: torch.Tensor) -> bool:
        return self.batch if self.batch is not None else latents.device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """latents: frames (V, C, h, w) at sigma 0, in the denoiser's space, any device ->
        per frame (V, h, w, 3) uint8 on the CPU, at the output size. One copy to the host."""
        if not latents:
            return []
        if self._batched(latents[0]) and len(latents) > 1:
            views = [to_uint8_views(self.decoder.decode(torch.cat(list(latents))), self.output_size)]
        else:
            views = [to_uint8_views(self.decoder.decode(z), self.output_size) for z in latents]
        host = torch.cat(views).cpu() if len(views) > 1 else views[0].cpu()
        if len(latents) == 1:
            return [host]
        # Copies: a view would carry the whole round's storage wherever it is pickled.
        return [v.clone() for v in host.split([z.shape[0] for z in latents])]
