"""Compiled model calls (`model.compile=true`).

Regional compilation, as diffusers does it: each repeated block (the MMDiT blocks, the
temporal and the cross-view blocks) is compiled, not the whole forward. Blocks of one kind
share their compiled code (their weights are inputs to it), so compiling costs about one
block per kind and input shape, not the whole depth, and the code between the blocks stays
eager.

Shapes: a call's batch is the windows of every session in the round (2 per session and band
with guidance), which changes whenever a session joins or leaves. To keep the compiled code's
shapes few and fixed, the windows of a call are padded to the next bucket of `BUCKETS` (the
last window repeated; its rows are dropped from the output), so sessions joining and leaving
reuse the code of a bucket already seen; beyond the largest bucket a call runs at its own
size. Padding costs the compute of the padded rows: on a GPU, whose time per call is nearly
flat in the rows at small batches, little; it is why this is off in eager mode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch._dynamo
from torch import nn

from dwm.models.base import FrameContext

log = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # windows per call: 1, 2, 4, 8 sessions with guidance on, 1..32 with B=2
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def bucket(windows: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket that holds `windows`, or `windows` itself beyond the largest."""
    return next((b for b in buckets if b >= windows), windows)


class BucketedForward:
    """A denoiser's forward with the windows of each call padded to a bucket.

    forward(latents (N, T, V, C, h, w), timesteps (N, T, V), context {key: (N, T, V, ...)})
    -> (N, T, V, C, h, w): the call is made with N padded to `bucket(N)`, the padding being
    copies of window N-1, and the output's first N windows are returned.
    """

    def __init__(self, forward, buckets: Sequence[int] = BUCKETS):
        self.forward, self.buckets = forward, tuple(buckets)
        self.sizes: dict[int, int] = {}  # bucket -> calls made at that size

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, context: FrameContext) -> torch.Tensor:
        n = latents.shape[0]
        size = bucket(n, self.buckets)
        self.sizes[size] = self.sizes.get(size, 0) + 1
        if size == n:
            return self.forward(latents, timesteps, context)

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])

        out = self.forward(pad(latents), pad(timesteps), {k: pad(v) for k, v in context.items()})
        return out[:n]


def compile_denoiser(denoiser: nn.Module, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """Compile `denoiser`'s repeated blocks in place (`regions()`, or the whole forward for a
    denoiser without them) and pad its calls to `BUCKETS`. mode: torch.compile's
    ("reduce-overhead" adds CUDA graphs); backend: "inductor", or "aot_eager" to check the
    tracing without generating code."""
    if mode not in MODES:
        raise ValueError(f"model.compile_mode={mode}: allowed {', '.join(MODES)}")
    regions = getattr(denoiser, "regions", None)
    log.info("compiling the denoiser (torch.compile %s, backend %s): the first call of each of %d batch "
             "sizes (%s windows) compiles, seconds to minutes each", mode, backend, len(BUCKETS),
             ", ".join(map(str, BUCKETS)))
    # Each kind of block gets one compiled graph per bucket (and per code path of its class):
    # leave room for all of them before torch falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(BUCKETS))
    if regions is None:
        denoiser.forward = torch.compile(denoiser.forward, mode=mode, backend=backend, dynamic=False)
    else:
        for block in regions():
            block.compile(mode=mode, backend=backend, dynamic=False)
    denoiser.forward = BucketedForward(denoiser.forward)
    return denoiser
