"""Compiled model calls (`model.compile=true`): the same frames as eager, and sessions joining
and leaving never make torch compile again once the buckets of windows have been seen.

The tracing is checked with torch.compile's aot_eager backend (the graphs dynamo captures,
run without generating code): what a join or a leave would recompile shows there the same
way, in seconds instead of a minute per bucket of CPU code generation.
"""

from __future__ import annotations

import pytest
import torch

from dwm.config import ConfigError, compose
from dwm.models.compiled import BUCKETS, BucketedForward, bucket
from dwm.pipelines.streaming import StreamingPipeline, push_many
from tests.driving import packed_drive

SMALL = {"pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "8"}


def test_windows_are_padded_to_the_next_bucket():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 65]
    seen = []

    def forward(latents, timesteps, context):
        seen.append(latents.shape[0])
        return latents * 2 + context["c"]

    padded = BucketedForward(forward)
    x = torch.arange(3.0).view(3, 1, 1, 1, 1, 1)
    out = padded(x, torch.zeros(3, 1, 1), {"c": torch.ones(3, 1, 1, 1, 1, 1)})
    assert seen == [4] and torch.equal(out, x * 2 + 1)  # the padding's rows are dropped
    assert padded.sizes == {4: 1} and BUCKETS[:4] == (1, 2, 4, 8)


def test_compiled_calls_make_eager_frames_and_never_recompile_as_sessions_come_and_go():
    eager_cfg = compose(SMALL)
    cfg = compose({**SMALL, "model.compile": "true", "model.compile_backend": "aot_eager"})
    scenes = [[c.unpack() for c in ego] for ego in packed_drive(eager_cfg, frames=8, egos=4)]
    eager, compiled = StreamingPipeline.build_model(eager_cfg), StreamingPipeline.build_model(cfg)
    assert isinstance(compiled.denoiser.forward, BucketedForward)

    def drive(model, schedule):
        queues = [StreamingPipeline.from_config(eager_cfg, views=3, model=model, seed=k) for k in range(4)]
        out = {k: [] for k in range(4)}
        for i, sessions in enumerate(schedule):
            for k, frames in zip(sessions, push_many([(queues[k], scenes[k][i]) for k in sessions])):
                out[k] += [f.images for f in frames]
        return out

    torch._dynamo.reset()
    # 1, 2 and 3 sessions: 2, 4 and 6 -> 8 windows a call (guidance on), every bucket seen.
    warm = [[0], [0, 1], [0, 1, 2]]
    drive(compiled, warm)
    # Now sessions join and leave in another order, and a 4th joins (8 windows, never seen
    # unpadded): any recompilation fails the call.
    schedule = [[0, 1, 2], [0, 1, 2], [0], [0, 2], [0, 1, 2, 3], [1, 3], [1, 2], [0, 1, 2, 3]]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = drive(compiled, schedule)
    expected = drive(eager, schedule)
    assert sum(map(len, got.values())) > 0
    for k in got:
        assert len(got[k]) == len(expected[k])
        for a, b in zip(got[k], expected[k]):
            assert (a.int() - b.int()).abs().max() <= 1
    assert set(compiled.denoiser.forward.sizes) == {2, 4, 8}


def test_a_bad_compile_mode_is_refused_by_name():
    cfg = compose({**SMALL, "model.compile": "true", "model.compile_mode": "fastest"})
    with pytest.raises(ConfigError, match=r"model.compile_mode=fastest: allowed default, reduce-overhead"):
        StreamingPipeline.build_model(cfg)
