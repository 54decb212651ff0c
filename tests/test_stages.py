"""The banded queue split into stages (`dwm.pipelines.stages`), in one process.

What a driver would notice: a pipeline whose bands live on different devices shows the same
video as the queue in one piece. Here the B stages run one after another in this process;
the Ray actors placed on GPUs run exactly these objects.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dwm.conditions.packed import PackedConditions
from dwm.config import compose
from dwm.pipelines.fifo import QueueFront, QueueSchedule
from dwm.pipelines.stages import BandStage, SessionFront
from dwm.pipelines.streaming import StreamingPipeline, frame_shape
from tests.driving import packed_drive

FRAMES = 14



def scene(cfg, egos: int = 1):
    return packed_drive(cfg, FRAMES, egos)


class StagedQueue:
    """B stages and the fronts of their sessions, run round by round in this process: every
    stage steps, then each takes its predecessor's hand-over (as a pipeline's graph does)."""

    def __init__(self, cfg, model, batch_sessions: bool = True):
        p = cfg.pipeline
        self.cfg, self.bands, self.model = cfg, p.bands, model
        self.schedule = QueueSchedule(p.steps, p.window, p.bands, p.shift, p.train_steps)
        self.stages = [
            BandStage(model.denoiser, model.decoder if b == p.bands - 1 else None, b, self.schedule,
                      guidance=p.guidance, resolution=p.resolution, output_size=p.output_size,
                      batch_sessions=batch_sessions)
            for b in range(p.bands)
        ]
        self.fronts: dict[str, SessionFront] = {}

    def open(self, session_id: str, seed: int) -> None:
        p = self.cfg.pipeline
        shape = frame_shape(3, self.model.denoiser.latent_channels, p.resolution)
        front = SessionFront(QueueFront(self.schedule, shape, seed, p.text_interval), self.model.text_encoder, 3)
        self.fronts[session_id] = front
        for stage in self.stages:
            stage.open(session_id, front.empty_text)

    def round(self, frames: dict[str, PackedConditions]) -> dict[str, torch.Tensor]:
        entering = [{} for _ in range(self.bands)]
        pushes = {}
        for session_id, conditions in frames.items():
            pushes[session_id], entries = self.fronts[session_id].enter(conditions)
            for entry in entries:
                entering[entry.band].setdefault(session_id, []).append(entry)
        out = [stage.step(entering[b], pushes) for b, stage in enumerate(self.stages)]
        for stage, handed in zip(self.stages[1:], out[:-1]):
            stage.take(handed)
        return out[-1]


@pytest.mark.parametrize("bands", [1, 2])
def test_stages_give_the_frames_of_the_queue_in_one_piece_bit_for_bit(bands):
    cfg = compose({"pipeline.steps": str(6 * bands), "pipeline.window": "3", "pipeline.bands": str(bands),
                   "pipeline.batch_bands": "false", "world.vehicles": "8"})
    (frames,) = scene(cfg)
    model = StreamingPipeline.build_model(cfg)
    whole = StreamingPipeline.from_config(cfg, views=3, model=model, seed=7)
    expected = [out.images for f in frames for out in whole.push(f.unpack())]

    staged = StagedQueue(cfg, model)
    staged.open("s", seed=7)
    got = [staged.round({"s": f}).get("s") for f in frames]
    got = [g for g in got if g is not None]
    assert len(got) == len(expected) == FRAMES - 3 * bands + 1
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_new_captions_reach_every_stage_once_and_the_frames_stay_those_of_one_piece():
    # The captions change twice during the drive: each new embedding travels to each stage
    # once (with the first frame of its captions), and every frame is still bit for bit.
    cfg = compose({"pipeline.steps": "12", "pipeline.window": "3", "pipeline.bands": "2",
                   "pipeline.batch_bands": "false", "pipeline.text_interval": "2", "world.vehicles": "8"})
    (frames,) = scene(cfg)
    frames = [replace(f, captions=[f"{c}, {'dusk' if 4 <= i < 9 else 'rain' if i >= 9 else 'noon'}" for c in f.captions])
              for i, f in enumerate(frames)]
    model = StreamingPipeline.build_model(cfg)
    whole = StreamingPipeline.from_config(cfg, views=3, model=model, seed=7)
    expected = [out.images for f in frames for out in whole.push(f.unpack())]

    staged = StagedQueue(cfg, model)
    staged.open("s", seed=7)
    sent = []  # (band the frame entered, whether its embedding came with it)
    got = []
    for f in frames:
        before = dict(staged.fronts["s"].sent)
        out = staged.round({"s": f})
        got += list(out.values())
        sent.append(staged.fronts["s"].sent != before)
    assert len(got) == len(expected) == FRAMES - 6 + 1
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert staged.fronts["s"].version == 2  # noon, dusk, rain
    assert sum(sent) < len(frames) // 2  # the embedding went with few of the frames


def test_sessions_batched_on_stages_get_their_own_frames():
    cfg = compose({"pipeline.steps": "12", "pipeline.window": "3", "pipeline.bands": "2",
                   "pipeline.batch_bands": "false", "world.vehicles": "8"})
    a_frames, b_frames = scene(cfg, egos=2)
    model = StreamingPipeline.build_model(cfg)
    alone = {}
    for name, frames, seed in (("a", a_frames, 1), ("b", b_frames, 2)):
        q = StreamingPipeline.from_config(cfg, views=3, model=model, seed=seed)
        alone[name] = [o.images for f in frames for o in q.push(f.unpack())]
    staged = StagedQueue(cfg, model, batch_sessions=True)
    staged.open("a", seed=1)
    got = {"a": [], "b": []}
    for i, (fa, fb) in enumerate(zip(a_frames, b_frames)):
        if i == 2:
            staged.open("b", seed=2)  # joins while a gathers its queue
        frames = {"a": fa} if i < 2 else {"a": fa, "b": b_frames[i - 2]}
        for name, images in staged.round(frames).items():
            got[name].append(images)
    assert len(got["a"]) == len(alone["a"])
    for a, b in zip(got["a"], alone["a"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    for a, b in zip(got["b"], alone["b"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert len(got["b"]) == len(alone["b"][: FRAMES - 2 - 5])


def test_a_stage_refuses_a_session_it_does_not_hold():
    cfg = compose({"pipeline.steps": "6", "pipeline.window": "3"})
    model = StreamingPipeline.build_model(cfg)
    stage = BandStage(model.denoiser, model.decoder, 0, QueueSchedule(6, 3, 1))
    with pytest.raises(KeyError, match="holds no queue for sessions \\['ghost'\\]"):
        stage.step({}, {"ghost": 12})
    with pytest.raises(KeyError, match="holds no queue for sessions \\['ghost'\\]"):
        stage.take({"ghost": None})


def test_only_the_last_stage_holds_a_decoder():
    cfg = compose({"pipeline.steps": "12", "pipeline.window": "3", "pipeline.bands": "2"})
    model = StreamingPipeline.build_model(cfg)
    schedule = QueueSchedule(12, 3, 2)
    assert BandStage(model.denoiser, model.decoder, 0, schedule).decoder is None
    with pytest.raises(ValueError, match="stage 1 is the last of 2: it decodes"):
        BandStage(model.denoiser, None, 1, schedule)
