"""Interfaces of the model components: text encoder, denoiser, VAE.

The frame loop only talks to these, so the tiny embedded model and the real CTSD 3.5 XS
drop in behind the same calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

# A frame's context: whatever the denoiser precomputes once per frame (layout adapter
# features, prompt embeddings, camera embeddings). Every tensor has a leading view axis V;
# the pipeline stacks the contexts of a window's frames into leading (N, T, V, ...) axes.
FrameContext = dict[str, torch.Tensor]


@dataclass
class TextEmbedding:
    """Prompt embeddings of P prompts: tokens (P, L, D) and pooled (P, D_pooled)."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tokens, self.pooled))


class TextEncoder(ABC):
    """Encodes captions; implementations cache by prompt text."""

    @abstractmethod
    def encode(self, prompts: list[str]) -> TextEmbedding: ...


class Denoiser(nn.Module, ABC):
    """A flow-matching velocity model over windows of multi-view latent frames."""

    latent_channels: int

    @abstractmethod
    def frame_context(
        self, layout: torch.Tensor, camera_params: torch.Tensor, text: TextEmbedding
    ) -> FrameContext:
        """Per-frame work, done once in the frame's life.

        layout (V, 6, H, W) in [0, 1]; camera_params (V, 11); text: V prompts.
        """

    @abstractmethod
    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: FrameContext
    ) -> torch.Tensor:
        """Velocity for a batch of windows.

        latents (N, T, V, C, h, w); timesteps (N, T, V) = sigma * 1000, one per frame and view;
        context: each tensor (N, T, V, ...). Returns (N, T, V, C, h, w).
        """


class LatentDecoder(ABC):
    """Turns latents into images."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (V, C, h, w) in the denoiser's space -> images (V, 3, 8h, 8w) in [0, 1]."""
