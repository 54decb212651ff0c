"""Small building blocks of CTSD 3.5 XS beside diffusers' own: float32 layer norms (the
reference's autocast numerics) and the temporal / cross-view self-attention block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


class Float32LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` computed in float32 whatever the dtype of its input and weights, with a
    float32 result: exactly what torch autocast does for layer_norm on CUDA (the reference's
    numerics), and what the CPU's autocast, which runs layer_norm in the low precision, would
    not. Under autocast the next linear layer takes the result to the model's dtype. Same
    parameters and state dict keys as `nn.LayerNorm` (`weight`, `bias` where affine)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def float32_layer_norms(module: nn.Module) -> None:
    """Turn every plain `nn.LayerNorm` under `module` into a `Float32LayerNorm` in place (the
    ones diffusers' blocks build included); parameters and keys are unchanged."""
    for m in module.modules():
        if type(m) is nn.LayerNorm:
            m.__class__ = Float32LayerNorm


# q/k RMSNorm eps of the temporal and cross-view attention: diffusers' `Attention` default,
# which the reference's blocks use (the MMDiT blocks' own q/k norms keep SD3's 1e-6).
AXIAL_QK_NORM_EPS = 1e-5


class VTSelfAttentionBlock(nn.Module):
    """Self-attention along one axis of the window (frames, or views of a token row).

    The released model's temporal / cross-view block: x += FF_in(LN x); x += Attn(LN x);
    x += FF(LN x), GEGLU feed-forwards, q/k RMS-normalised, q/k/v without bias.
    (B', n, D) -> (B', n, D), where n runs over the attended axis; attention_mask: optional
    additive (B', n, n) float mask (0 where attention is allowed, -inf where not).
    """

    def __init__(self, width: int, heads: int, head_dim: int, ff_mult: int, qk_norm: str | None):
        super().__init__()
        self.norm_in = nn.LayerNorm(width)
        self.ff_in = FeedForward(width, dim_out=width, mult=ff_mult, activation_fn="geglu")
        self.norm1 = nn.LayerNorm(width)
        self.attn1 = Attention(
            query_dim=width, heads=heads, dim_head=head_dim, bias=False, qk_norm=qk_norm,
            eps=AXIAL_QK_NORM_EPS,
        )
        self.norm3 = nn.LayerNorm(width)
        self.ff = FeedForward(width, dim_out=width, mult=ff_mult, activation_fn="geglu")

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ff_in(self.norm_in(x))
        x = x + self.attn1(self.norm1(x), attention_mask=attention_mask)
        return x + self.ff(self.norm3(x))
