"""Several sessions' queues batched into one model call per Euler step (`push_many`).

What a driver would notice: their video does not depend on who else is driving. Batched,
each session gets the frames it would get alone (same seeds, same conditions), also while
another session is warming up its queue, joins late or leaves, and every step of a round is
one model call for all of them.
"""

from __future__ import annotations

import pytest
import torch

from dwm.conditions.builder import ConditionBuilder
from dwm.config import compose, instantiate
from dwm.pipelines.streaming import StreamingPipeline, push_many

# Small queue: N=6 steps, T=3 frames, so frames leave after 3 pushes (1 band) and the
# whole test stays quick; guidance on, so each session's batch rows are 2B.
OVERRIDES = {"pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "8"}


@pytest.fixture(scope="module")
def cfg():
    return compose(OVERRIDES)


@pytest.fixture(scope="module")
def scenes(cfg):
    """Conditions of two egos driving for 9 frames: scenes[k][i] is ego k's i-th frame."""
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    egos = [world.add_ego(), world.add_ego()]
    world.set_autopilot(egos[0], True)
    frames: list[list] = [[], []]
    for _ in range(9):
        for k, ego in enumerate(egos):
            frames[k].append(builder.build(world.observe(ego)))
        world.tick()
    world.close()
    return frames


class CallCounter:
    """Wraps a denoiser's forward to count model calls and the batch rows of each."""

    def __init__(self, denoiser):
        self.rows: list[int] = []
        self._forward = denoiser.forward
        denoiser.forward = self

    def __call__(self, latents, timesteps, context):
        self.rows.append(latents.shape[0])
        return self._forward(latents, timesteps, context)


def pipeline(cfg, model, seed: int) -> StreamingPipeline:
    return StreamingPipeline.from_config(cfg, views=3, model=model, seed=seed)


def alone(cfg, model, seed: int, frames) -> list[torch.Tensor]:
    p = pipeline(cfg, model, seed)
    return [out.images for frame in frames for out in p.push(frame)]


def assert_same_frames(batched: list[torch.Tensor], single: list[torch.Tensor]) -> None:
    assert len(batched) == len(single) > 0
    for a, b in zip(batched, single):
        # A larger batch may round differently in the last bits of float32 (seen: 1.4e-5 after
        # 12 steps), far below one 8-bit level of the video: it can move a pixel that sits on a
        # rounding edge by one level, and no more.
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), (diff > 0).float().mean())


def test_two_sessions_batched_get_the_frames_each_gets_alone(cfg, scenes):
    model = StreamingPipeline.build_model(cfg)
    single = [alone(cfg, model, seed, scenes[k]) for k, seed in enumerate((11, 22))]

    a, b = pipeline(cfg, model, 11), pipeline(cfg, model, 22)
    calls = CallCounter(model.denoiser)
    context_rows, frame_context = [], model.denoiser.frame_context
    model.denoiser.frame_context = lambda layout, *rest: context_rows.append(layout.shape[0]) or frame_context(layout, *rest)
    out: list[list[torch.Tensor]] = [[], []]
    for fa, fb in zip(scenes[0], scenes[1]):
        got = push_many([(a, fa), (b, fb)])
        for k in range(2):
            out[k] += [g.images for g in got[k]]
    assert_same_frames(out[0], single[0])
    assert_same_frames(out[1], single[1])
    # The two sessions' images differ (different egos and noise), so the test can fail.
    assert (out[0][0].int() - out[1][0].int()).abs().max() > 2

    # Each round's frame contexts: one call for both sessions' 2 x 3 views (and, once per
    # session, its unconditional context, 3 views, cached for the rig).
    assert sorted(context_rows) == [3, 3] + [6] * len(scenes[0])
    # One model call per step for both: s=2 per push from the first (the warm-up spread over
    # the first 3 pushes), each on 2 x 2B rows.
    bands = cfg.pipeline.bands
    assert calls.rows == [4 * bands] * (2 * len(scenes[0]))


def test_a_session_joining_late_and_one_leaving_change_no_one_elses_frames(cfg, scenes):
    model = StreamingPipeline.build_model(cfg)
    single_a = alone(cfg, model, 11, scenes[0])
    single_b = alone(cfg, model, 22, scenes[1][:6])

    a, b = pipeline(cfg, model, 11), pipeline(cfg, model, 22)
    calls = CallCounter(model.denoiser)
    out_a, out_b = [], []
    for i, fa in enumerate(scenes[0]):
        pushes = [(a, fa)]
        if 3 <= i < 9:  # b joins at a's 4th frame, while a is running, and pushes 6 frames
            pushes.append((b, scenes[1][i - 3]))
        got = push_many(pushes)
        out_a += [g.images for g in got[0]]
        if len(got) > 1:
            out_b += [g.images for g in got[1]]
    assert_same_frames(out_a, single_a)
    assert_same_frames(out_b, single_b)
    # a alone for 3 pushes (s=2 calls each). b joins: its warm-up spreads over its first 3
    # pushes, s calls each, inside a's calls: no round has a call without a. Both in every
    # call for b's 6 pushes, then a alone again.
    one = 2 * cfg.pipeline.bands
    assert calls.rows == [one] * 6 + [2 * one] * 2 * 6 + [one] * 2 * (len(scenes[0]) - 9)


def test_one_frame_per_queue_per_round(cfg, scenes):
    model = StreamingPipeline.build_model(cfg)
    p = pipeline(cfg, model, 1)
    with pytest.raises(ValueError, match="at most one frame per queue"):
        push_many([(p, scenes[0][0]), (p, scenes[0][1])])
