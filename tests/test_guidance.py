"""Classifier-free guidance over a denoiser, driven by the FIFO queue."""

from __future__ import annotations

import pytest
import torch

from dwm.models.base import Denoiser, TextEmbedding, TextEncoder
from dwm.pipelines import guidance as guidance_module
from dwm.pipelines.fifo import BandedFifoQueue
from dwm.pipelines.guidance import (
    UNCONDITIONAL_LAYOUT_VALUE,
    FrameContexts,
    GuidedStep,
    UnconditionalContexts,
    unconditional_inputs,
)

V, C, H, W = 2, 3, 2, 2  # latent frame (V, C, h, w)


class BiasDenoiser(Denoiser):
    """v = latents * scale + bias, with bias (and scale) per frame and view from the context.

    frame_context turns layout, camera params and text into a per-view bias, so a different
    input gives a different velocity. Records every forward call.
    """

    latent_channels = C

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
        self.context_calls = 0

    def frame_context(self, layout, camera_params, text):
        self.context_calls += 1
        bias = layout.mean(dim=(1, 2, 3)) + camera_params[:, 0] + text.pooled[:, 0]
        return {"bias": bias, "scale": torch.ones(layout.shape[0])}

    def forward(self, latents, timesteps, context):
        self.calls.append((latents.clone(), timesteps.clone(), context))
        shape = (*context["bias"].shape, 1, 1, 1)
        return latents * context["scale"].view(shape) + context["bias"].view(shape)


class LengthTextEncoder(TextEncoder):
    """Pooled embedding = prompt length; records the prompts it saw."""

    def __init__(self):
        self.prompts: list[list[str]] = []

    def encode(self, prompts):
        self.prompts.append(list(prompts))
        pooled = torch.tensor([[float(len(p))] for p in prompts])
        return TextEmbedding(tokens=torch.zeros(len(prompts), 1, 4), pooled=pooled)


def context(bias: float, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"bias": torch.full((V,), bias), "scale": torch.full((V,), scale)}


def grid(bands: int, window: int, guided: bool = True):
    """B rows of T payloads with distinct cond/uncond biases and scales."""
    return tuple(
        tuple(
            FrameContexts(context(10.0 * b + t, 2.0), context(-(10.0 * b + t), 0.5) if guided else None)
            for t in range(window)
        )
        for b in range(bands)
    )


@pytest.mark.parametrize("scale", [4.0, 0.0, 7.5])
def test_guided_velocity_is_uncond_plus_scale_times_the_difference(scale):
    denoiser = BiasDenoiser()
    payloads = grid(2, 3)
    latents = torch.randn(2, 3, V, C, H, W)
    timesteps = torch.rand(2, 3, V) * 1000
    velocity = GuidedStep(denoiser, scale)(latents, timesteps, payloads)

    cond = torch.tensor([[10.0 * b + t for t in range(3)] for b in range(2)]).view(2, 3, 1, 1, 1, 1)
    v_cond = latents * 2.0 + cond
    v_uncond = latents * 0.5 - cond
    torch.testing.assert_close(velocity, v_uncond + scale * (v_cond - v_uncond))
    # One model call on 2B windows: the unconditional half first, the same latents and
    # timesteps in both halves.
    assert len(denoiser.calls) == 1
    seen_latents, seen_timesteps, seen_context = denoiser.calls[0]
    assert seen_latents.shape[0] == 4
    assert torch.equal(seen_latents[:2], latents) and torch.equal(seen_latents[2:], latents)
    assert torch.equal(seen_timesteps[:2], timesteps) and torch.equal(seen_timesteps[2:], timesteps)
    assert seen_context["bias"].shape == (4, 3, V)
    torch.testing.assert_close(seen_context["bias"][:2], -cond.view(2, 3, 1).expand(2, 3, V))
    torch.testing.assert_close(seen_context["bias"][2:], cond.view(2, 3, 1).expand(2, 3, V))


def test_guidance_one_runs_the_conditional_windows_only():
    denoiser = BiasDenoiser()
    payloads = grid(2, 3, guided=False)  # no unconditional context needed
    latents = torch.randn(2, 3, V, C, H, W)
    velocity = GuidedStep(denoiser, 1.0)(latents, torch.zeros(2, 3, V), payloads)
    cond = torch.tensor([[10.0 * b + t for t in range(3)] for b in range(2)]).view(2, 3, 1, 1, 1, 1)
    torch.testing.assert_close(velocity, latents * 2.0 + cond)
    assert [call[0].shape[0] for call in denoiser.calls] == [2]


def test_missing_unconditional_context_or_bad_scale_is_refused():
    with pytest.raises(ValueError, match="unconditional context"):
        step = GuidedStep(BiasDenoiser(), 4.0)
        step(torch.zeros(1, 2, V, C, H, W), torch.zeros(1, 2, V), grid(1, 2, guided=False))
    with pytest.raises(ValueError, match="guidance"):
        GuidedStep(BiasDenoiser(), float("nan"))


@pytest.mark.parametrize("scale, bands", [(4.0, 1), (4.0, 2), (1.0, 2)])
def test_contexts_are_stacked_once_per_shift(monkeypatch, scale, bands):
    stacks = []
    real_stack = guidance_module.stack_contexts
    def counting_stack(rows):
        stacks.append(len(rows))
        return real_stack(rows)

    monkeypatch.setattr(guidance_module, "stack_contexts", counting_stack)
    window, per_shift = 2, 2
    steps = per_shift * window * bands
    denoiser = BiasDenoiser()
    step = GuidedStep(denoiser, scale)
    queue = BandedFifoQueue(steps, window, bands, (V, C, H, W))
    extra = 3
    for k in range(window * bands + extra):
        queue.push(FrameContexts(context(k), context(-k)), step)
    windows = 2 * bands if scale != 1.0 else bands
    # One stack per shift, every push one shift; while the queue warms up, only the bands
    # that have a frame run (band B-1 from the first push, band B-2 from the T+1-th, ...).
    per_band = windows // bands
    started = [min(bands, k // window + 1) for k in range(window * bands + extra)]
    assert stacks == [per_band * b for b in started]
    assert len(denoiser.calls) == per_shift * len(started)
    assert [call[0].shape[0] for call in denoiser.calls] == [per_band * b for b in started for _ in range(per_shift)]
    # And the context follows the frames: the last call saw the last window's frames.
    newest_row = denoiser.calls[-1][2]["bias"][windows - bands]  # conditional band 0
    pushed = window * bands + extra
    assert newest_row[:, 0].tolist() == [float(k) for k in range(pushed - window, pushed)]


def test_unconditional_inputs_are_grey_layout_empty_prompts_same_cameras():
    camera_params = torch.rand(3, 11)
    inputs = unconditional_inputs(camera_params, (16, 24))
    assert inputs.layout.shape == (3, 6, 16, 24)
    # The reference's config value exactly (not 32/255 = 0.12549...), in float32.
    assert UNCONDITIONAL_LAYOUT_VALUE == 0.1255
    assert inputs.layout.dtype == torch.float32
    assert bool((inputs.layout == torch.tensor(0.1255, dtype=torch.float32)).all())
    assert inputs.captions == ["", "", ""]
    assert torch.equal(inputs.camera_params, camera_params)
    with pytest.raises(ValueError, match=r"\(V, 11\)"):
        unconditional_inputs(torch.rand(3, 10), (16, 24))


def test_unconditional_context_is_computed_once_per_rig_and_resolution():
    denoiser, text = BiasDenoiser(), LengthTextEncoder()
    contexts = UnconditionalContexts(denoiser, text)
    camera_params = torch.rand(3, 11)
    first = contexts(camera_params, (16, 24))
    again = contexts(camera_params.clone(), (16, 24))
    assert again is first and denoiser.context_calls == 1
    assert text.prompts == [["", "", ""]]
    # The value is the denoiser's own context of the grey, prompt-free inputs.
    expected = 0.1255 + camera_params[:, 0] + 0.0
    torch.testing.assert_close(first["bias"], expected)
    # Other camera params or another resolution are other entries.
    other = camera_params.clone()
    other[:, 0] += 1
    torch.testing.assert_close(contexts(other, (16, 24))["bias"], expected + 1)
    contexts(camera_params, (8, 12))
    assert denoiser.context_calls == 3
