"""The flow-matching noise schedule the queue integrates along."""

from __future__ import annotations

import torch


def flow_sigmas(steps: int, shift: float = 3.0, train_steps: int = 1000) -> torch.Tensor:
    """Noise levels of an N-step flow-matching Euler schedule: (steps + 1,) float32, 1.0 .. 0.

    Taken from diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=train_steps,
    shift=shift).set_timesteps(steps)`, the scheduler the released model was sampled with
    (SD3.5: shift 3.0, 1000 training steps). float32 as diffusers keeps them, so that
    `sigma * 1000` reproduces the scheduler's `timesteps` bit for bit; the last entry is the
    terminal 0 that the final Euler step lands on.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(train_steps, int) or train_steps < 1:
        raise ValueError(f"train_steps must be a positive int, got {train_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    # Imported here: diffusers takes seconds to import (torch._dynamo, scipy), and processes
    # that only carry frames (the session manager) import this module without needing it.
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=train_steps, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.to(torch.float32).clone()
