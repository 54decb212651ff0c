"""Classifier-free guidance over a `Denoiser`, as a step function of the FIFO queue.

A frame's payload in the queue is its `FrameContexts`: the conditional and unconditional
`FrameContext`, each a dict of tensors with a leading view axis V (see `dwm.models.base`),
and its conditions.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from dwm.models.base import Denoiser, FrameContext, TextEncoder
from dwm.pipelines.fifo import PayloadGrid

# The unconditional layout: every pixel of both layout images at the reference's config value
# `uncondition_image_color` 0.1255, written as it is there (the grey 32 of the fake layouts of
# the camera-only training data would be 32/255 = 0.12549...; the model was sampled with 0.1255).
UNCONDITIONAL_LAYOUT_VALUE = 0.1255


class FrameContexts(NamedTuple):
    """A frame's payload where the model steps it: its contexts, built once as it enters (a
    band), and the conditions it carries on (back out of the queue, or to the next stage).

    cond: the conditional context; uncond: the unconditional one, None when guidance is off
    (scale 1); conditions: the frame's `ConditionFrame` in a queue in one piece, its
    `FrameInputs` (compact conditions and caption embedding) on a stage.
    """

    cond: FrameContext
    uncond: FrameContext | None = None
    conditions: Any = None


def stack_contexts(rows: Sequence[Sequence[FrameContext]]) -> FrameContext:
    """B rows of T frame contexts, each tensor (V, ...) -> one context, each tensor (B, T, V, ...)."""
    keys = set(rows[0][0])
    for row in rows:
        for context in row:
            if set(context) != keys:
                raise ValueError(
                    "frame contexts of one window must have the same keys: "
                    f"{sorted(keys)} vs {sorted(context)}"
                )
    return {key: torch.stack([torch.stack([c[key] for c in row]) for row in rows]) for key in keys}


class GuidedStep:
    """Step function for `BandedFifoQueue` over payloads of `FrameContexts`:
    v = v_u + g * (v_c - v_u).

    With guidance != 1 the denoiser runs once per step on 2B windows, the unconditional half
    first (as the reference batches it); with guidance == 1 it runs on the B conditional
    windows only. The contexts of the window are stacked once per shift: the queue passes
    the same payload grid object to every step of a shift, and this keeps the stacked
    context of the last grid it saw.
    """

    def __init__(self, denoiser: Denoiser, guidance: float = 4.0):
        guidance = float(guidance)
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number (1.0 turns it off), got {guidance}")
        self.denoiser = denoiser
        self.guidance = guidance
        self._grid: PayloadGrid | None = None
        self._context: FrameContext | None = None

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    def context(self, payloads: PayloadGrid) -> FrameContext:
        """The batch context of a shift, each tensor (2B or B, T, V, ...); cached per grid."""
        if payloads is not self._grid:
            cond = [[payload.cond for payload in row] for row in payloads]
            if self.guided:
                uncond = [[payload.uncond for payload in row] for row in payloads]
                if any(c is None for row in uncond for c in row):
                    raise ValueError(
                        f"guidance is {self.guidance}, so every payload needs an unconditional "
                        "context; build one with UnconditionalContexts or set guidance to 1.0"
                    )
                # One stack over 2B rows: unconditional windows first, then conditional.
                context = stack_contexts(uncond + cond)
            else:
                context = stack_contexts(cond)
            # Keeping the grid itself (not its id) also keeps its id from being reused.
            self._grid, self._context = payloads, context
        return self._context

    def inputs(
        self, latents: torch.Tensor, timesteps: torch.Tensor, payloads: PayloadGrid
    ) -> tuple[torch.Tensor, torch.Tensor, FrameContext]:
        """The denoiser's batch for one step: latents (2B or B, T, V, C, h, w), timesteps
        (2B or B, T, V) and the context, the unconditional half first when guided."""
        context = self.context(payloads)
        if not self.guided:
            return latents, timesteps, context
        return torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), context

    def combine(self, output: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for `inputs`, in the model's dtype -> the guided velocity
        (B, T, V, C, h, w) float32: the guidance mix and the Euler update that follows are
        computed in float32, whatever precision the model ran in."""
        output = output.float()
        if not self.guided:
            return output
        v_uncond, v_cond = output.chunk(2)
        return v_uncond + self.guidance * (v_cond - v_uncond)

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, payloads: PayloadGrid) -> torch.Tensor:
        """latents (B, T, V, C, h, w); timesteps (B, T, V); returns velocity (B, T, V, C, h, w)."""
        with torch.no_grad():
            return self.combine(self.denoiser(*self.inputs(latents, timesteps, payloads)))


@dataclass
class UnconditionalInputs:
    """What the denoiser sees for the unconditional half of a frame.

    layout (V, 6, H, W) at `UNCONDITIONAL_LAYOUT_VALUE`; camera_params (V, 11), the frame's
    own; captions: V "".
    """

    layout: torch.Tensor
    camera_params: torch.Tensor
    captions: list[str]


def unconditional_inputs(camera_params: torch.Tensor, resolution: Sequence[int]) -> UnconditionalInputs:
    """The unconditional inputs of a frame with camera_params (V, 11) at resolution (H, W)."""
    if camera_params.dim() != 2 or camera_params.shape[1] != 11:
        raise ValueError(f"camera_params must be (V, 11), got {tuple(camera_params.shape)}")
    height, width = (int(n) for n in resolution)
    views = camera_params.shape[0]
    layout = torch.full(
        (views, 6, height, width), UNCONDITIONAL_LAYOUT_VALUE,
        dtype=torch.float32, device=camera_params.device,
    )
    return UnconditionalInputs(layout, camera_params, [""] * views)


class UnconditionalContexts:
    """The unconditional `FrameContext` of a frame, cached.

    It depends only on the camera params and the resolution, so a driving session with a
    fixed rig computes it once and reuses it for every frame. In the realtime clock the fps
    entry of the camera params follows the wall clock and can change per frame; the cache
    then keeps the `max_entries` most recent.
    """

    def __init__(self, denoiser: Denoiser, text_encoder: TextEncoder, max_entries: int = 4):
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple, FrameContext] = OrderedDict()

    def __call__(self, camera_params: torch.Tensor, resolution: Sequence[int]) -> FrameContext:
        """camera_params (V, 11), resolution (H, W) -> context, each tensor (V, ...)."""
        key = (
            tuple(int(n) for n in resolution),
            str(camera_params.device),
            camera_params.dtype,
            tuple(camera_params.shape),
            camera_params.detach().cpu().numpy().tobytes(),
        )
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        inputs = unconditional_inputs(camera_params, resolution)
        with torch.no_grad():
            context = self.denoiser.frame_context(
                inputs.layout, inputs.camera_params, self.text_encoder.encode(inputs.captions)
            )
        self._cache[key] = context
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return context
