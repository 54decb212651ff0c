"""The banded FIFO queue and its noise schedule: pure tensor math, checked against the
exact flow-matching solution and against the reference's slot formula."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from dwm.pipelines.fifo import Band, BandedFifoQueue, LatentFrame, Shift
from dwm.pipelines.schedule import flow_sigmas

FRAME = (2, 2, 2, 3)  # (V, C, h, w), small so many configurations run quickly

# The digest's SD3.5 shift-3 schedule for N = 24 (4 decimals).
REFERENCE_SIGMAS_24 = [
    1.0, .9851, .9693, .9525, .9346, .9156, .8951, .8732, .8496, .8242, .7968, .767, .7346,
    .6991, .6603, .6174, .57, .5171, .4579, .3912, .3152, .2281, .1272, .0089, 0,
]


# -- schedule ------------------------------------------------------------------------------


def test_flow_sigmas_match_the_reference_schedule():
    sigmas = flow_sigmas(24)
    assert sigmas.shape == (25,)
    assert torch.allclose(sigmas.double(), torch.tensor(REFERENCE_SIGMAS_24, dtype=torch.float64), atol=5e-5)


@pytest.mark.parametrize("steps, shift", [(8, 1.0), (12, 3.0), (24, 3.0), (30, 5.0)])
def test_flow_sigmas_follow_the_shifted_linear_schedule(steps, shift):
    # diffusers' recipe: N levels evenly spaced from 1 down to the training schedule's
    # smallest (already shifted) sigma, shift(1/train_steps), then shifted with
    # shift(t) = s*t / (1 + (s-1)*t), then the terminal 0.
    def shifted(t):
        return shift * t / (1 + (shift - 1) * t)

    t = torch.linspace(1.0, shifted(torch.tensor(1 / 1000, dtype=torch.float64)), steps, dtype=torch.float64)
    expected = torch.cat([shifted(t), torch.zeros(1, dtype=torch.float64)])
    sigmas = flow_sigmas(steps, shift=shift)
    assert sigmas.dtype == torch.float32
    assert torch.allclose(sigmas.double(), expected, atol=1e-6)
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("kwargs, word", [({"steps": 0}, "steps"), ({"steps": 4, "shift": 0.0}, "shift"),
                                          ({"steps": 4, "train_steps": 0}, "train_steps")])
def test_flow_sigmas_reject_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        flow_sigmas(**kwargs)


# -- an analytic velocity field and a recorder ---------------------------------------------


@dataclass(eq=False)
class Target:
    """A test payload: the clean latent x0 (V, C, h, w) the frame must end at."""

    x0: torch.Tensor
    name: int = 0


@dataclass
class Recorder:
    """Step function returning the exact flow velocity (x - x0) / sigma of every slot.

    On the straight path x = (1 - sigma) x0 + sigma * eps the velocity is eps - x0 at every
    sigma, so each Euler step lands exactly on the path and the last one (to sigma 0) on x0.
    Records, per call, the payload grid, the timesteps and the latents it was given.
    """

    calls: list[tuple] = field(default_factory=list)

    def __call__(self, latents, timesteps, payloads):
        self.calls.append((payloads, timesteps.clone(), latents.clone()))
        x0 = torch.stack([torch.stack([p.x0 for p in row]) for row in payloads])
        sigma = (timesteps / 1000).view(*timesteps.shape, 1, 1, 1)
        return (latents.float() - x0) / sigma


def stepped_timesteps(recorder: Recorder, leaving: dict[int, torch.Tensor]) -> dict[int, list[float]]:
    """Per leaving payload: the timesteps (sigma * 1000) at which the frame was moved, in order.

    A frame counts as stepped at a call when its latent at the next call that sees it (or,
    after its last call, the latent it left with) differs from the one it was given.
    """
    seen: dict[int, list[tuple[float, torch.Tensor]]] = {}
    for payloads, timesteps, latents in recorder.calls:
        for b, row in enumerate(payloads):
            shown = set()
            for t, payload in enumerate(row):
                # While the queue warms up, slots awaiting their frames show the payload of
                # the newest arrived one, always after it: the first occurrence is the frame.
                if id(payload) not in shown:
                    shown.add(id(payload))
                    seen.setdefault(id(payload), []).append((float(timesteps[b, t, 0]), latents[b, t]))
    result = {}
    for key, observations in seen.items():
        if key not in leaving:
            continue
        afters = [x for _, x in observations[1:]] + [leaving[key]]
        result[key] = [s for (s, x), after in zip(observations, afters) if not torch.equal(x, after)]
    return result


def make_targets(n: int, seed: int = 123) -> list[Target]:
    g = torch.Generator().manual_seed(seed)
    return [Target(torch.randn(FRAME, generator=g), k) for k in range(n)]


# -- the queue -----------------------------------------------------------------------------

CONFIGS = [(t, b, s) for t in (2,) for b in (1, 2, 4) for s in (1, 2, 4)]
CONFIGS += [(3, 2, 1), (3, 1, 2), (6, 1, 4), (6, 2, 1)]


@pytest.mark.parametrize("window, bands, per_shift", CONFIGS)
def test_every_frame_gets_each_sigma_once_in_order_and_leaves_at_its_target(window, bands, per_shift):
    length = window * bands
    steps = per_shift * length
    queue = BandedFifoQueue(steps, window, bands, FRAME, seed=1)
    recorder = Recorder()
    targets = make_targets(2 * length + 2)
    leaving = {}
    for target in targets:
        frame = queue.push(target, recorder)
        if frame is not None:
            leaving[id(frame.payload)] = frame.latent
            torch.testing.assert_close(frame.latent, frame.payload.x0, atol=1e-5, rtol=1e-5)
    assert len(leaving) == len(targets) - (length - 1)

    expected = (flow_sigmas(steps)[:steps] * 1000).tolist()
    history = stepped_timesteps(recorder, leaving)
    assert set(history) == set(leaving)
    for key, timesteps in history.items():
        assert timesteps == expected, f"frame {key} was stepped at {timesteps}"


def test_one_band_reproduces_the_reference_slot_schedule():
    steps, window, per_shift, take_time = 24, 6, 4, 0
    queue = BandedFifoQueue(steps, window, 1, FRAME, seed=0)
    recorder = Recorder()
    targets = make_targets(window + 4)
    leaving = {}
    for target in targets:
        frame = queue.push(target, recorder)
        if frame is not None:
            leaving[id(frame.payload)] = frame.latent
    timesteps_of = flow_sigmas(steps) * 1000

    # Loop counters i of the reference: 0..23 for the warm-up (here 4 in each of the first
    # 6 pushes), then 20..23 for each push.
    counters = list(range(steps)) + [i for _ in range(4) for i in range(steps - per_shift, steps)]
    assert len(recorder.calls) == len(counters)
    for c, (payloads, timesteps, latents) in enumerate(recorder.calls[:-per_shift]):
        i = counters[c]
        for j in range(window):
            expected_index = min(i - take_time * per_shift, max(0, i - per_shift * j))
            index = int((timesteps_of - timesteps[0, j, 0]).abs().argmin())
            assert index == expected_index, f"call {c}, slot {j}"
            assert bool((timesteps[0, j] == timesteps[0, j, 0]).all())  # repeated over views
            # Did the slot move in this call? During the warm-up no frame changes slots, so
            # compare with the same slot at the next call; after it, with the frame's next
            # appearance.
            if c + 1 < steps:
                nxt = recorder.calls[c + 1][2][0, j]
            else:
                payload = payloads[0][j]
                nxt = next(
                    (lat[b, t] for p2, _, lat in recorder.calls[c + 1:] for b, row in enumerate(p2)
                     for t, p in enumerate(row) if p is payload),
                    leaving.get(id(payload)),
                )
            was_updated = not torch.equal(latents[0, j], nxt)
            assert was_updated == (i - per_shift * j >= 0), f"call {c}, slot {j}"
        if c < steps:  # slot j shows frame j once it has arrived (push c // 4), before: frame c // 4's
            assert [t.name for t in payloads[0]] == [min(j, c // per_shift) for j in range(window)]


def reference_warm_up(steps, window, per_shift, seed, step_fn, payload):
    """The reference's start, written from its description: gather T conditions, draw the
    window's noise, then calls i = 0..N-1 with idx_j = max(0, i - s*j), slot j updated from
    i = s*j on; returns the window after them (slot 0 clean)."""
    sigmas = flow_sigmas(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randn(FRAME, generator=generator) for _ in range(window)])[None]
    grid = ((payload,) * window,)
    for i in range(steps):
        idx = torch.tensor([max(0, i - per_shift * j) for j in range(window)])
        timesteps = (sigmas[idx] * 1000)[None, :, None].expand(1, window, FRAME[0])
        v = step_fn(x, timesteps, grid)
        moved = x + (sigmas[idx + 1] - sigmas[idx]).view(1, window, 1, 1, 1, 1) * v
        active = torch.tensor([i - per_shift * j >= 0 for j in range(window)]).view(1, window, 1, 1, 1, 1)
        x = torch.where(active, moved, x)
    return x[0]


def test_the_spread_warm_up_makes_the_reference_warm_ups_frames_when_conditions_do_not_change():
    steps, window, per_shift = 24, 6, 4
    target = make_targets(1)[0]

    def coupled(latents, timesteps, payloads):
        # Every slot's velocity depends on the whole window, as attention makes it.
        x0 = torch.stack([torch.stack([p.x0 for p in row]) for row in payloads])
        return latents - x0 + 0.3 * latents.mean(dim=1, keepdim=True) * (timesteps / 1000)[..., None, None, None]

    expected = reference_warm_up(steps, window, per_shift, 7, coupled, target)
    queue = BandedFifoQueue(steps, window, 1, FRAME, seed=7)
    out = [queue.push(target, coupled) for _ in range(window)]
    assert out[:-1] == [None] * (window - 1)
    assert torch.equal(out[-1].latent, expected[0])  # the first frame, bit for bit
    assert torch.equal(queue.bands[0].latents, expected[1:])  # and the rest of the window


def test_first_output_after_a_full_queue_then_one_per_push_in_push_order():
    window, bands, per_shift = 2, 2, 2
    length, steps = window * bands, per_shift * window * bands
    queue = BandedFifoQueue(steps, window, bands, FRAME)
    recorder = Recorder()
    targets = make_targets(length + 5)
    out = []
    for k, target in enumerate(targets):
        assert queue.warming == (k < length)
        progress = []
        before = len(recorder.calls)
        frame = queue.push(target, recorder, on_step=lambda done, total: progress.append((done, total)))
        calls = len(recorder.calls) - before
        assert calls == per_shift  # from the first push on: no push makes more calls than another
        assert progress == [(d, calls) for d in range(1, calls + 1)]
        assert (frame is None) == (k < length - 1)
        if frame is not None:
            out.append(frame.payload)
    assert out == targets[: len(out)]
    assert len(out) == len(targets) - length + 1
    assert len(queue) == length - 1


def test_the_frames_inside_come_out_in_order_behind_l_minus_1_more():
    window, bands, per_shift = 2, 2, 1
    length = window * bands
    for pushes in (2, length + 3):  # while gathering, and once running
        queue = BandedFifoQueue(per_shift * length, window, bands, FRAME)
        recorder = Recorder()
        targets = make_targets(pushes)
        padding = make_targets(length - 1, seed=9)
        out = [f for f in (queue.push(t, recorder) for t in targets + padding) if f is not None]
        assert [f.payload for f in out] == targets
        for frame in out:
            torch.testing.assert_close(frame.latent, frame.payload.x0, atol=1e-5, rtol=1e-5)
        assert len(queue) == length - 1
        queue.reset()
        assert len(queue) == 0 and queue.warming


def damped(latents, timesteps, payloads):
    """A velocity that keeps the noise in the result, so the seed shows in the output."""
    return 0.5 * latents


def run(queue: BandedFifoQueue, n: int) -> list[torch.Tensor]:
    return [f.latent for f in (queue.push(k, damped) for k in range(n)) if f is not None]


def test_same_seed_same_frames_other_seed_other_frames_and_reset_replays():
    a = run(BandedFifoQueue(4, 2, 2, FRAME, seed=7), 7)
    b_queue = BandedFifoQueue(4, 2, 2, FRAME, seed=7)
    b = run(b_queue, 7)
    c = run(BandedFifoQueue(4, 2, 2, FRAME, seed=8), 7)
    assert len(a) == 4
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    b_queue.reset()
    assert all(torch.equal(x, y) for x, y in zip(a, run(b_queue, 7)))


# -- band independence ---------------------------------------------------------------------


def coupled(latents, timesteps, payloads):
    """Couples the frames of a window (like temporal attention) but never two windows."""
    bias = torch.tensor([[float(p) for p in row] for row in payloads]).view(*latents.shape[:2], 1, 1, 1, 1)
    return latents - latents.mean(dim=1, keepdim=True) + bias


def shift_outputs(queue: BandedFifoQueue, leaving) -> list[torch.Tensor]:
    """What each band produced in the last shift: its T advanced frames, cleanest first."""
    outputs = []
    for b, band in enumerate(queue.bands):
        handed = queue.bands[b + 1].latents[-1] if b + 1 < len(queue.bands) else leaving.latent
        outputs.append(torch.cat([handed[None], band.latents[: queue.schedule.window - 1]]))
    return outputs


@pytest.mark.parametrize("change", ["latents", "payload"])
def test_changing_one_band_changes_no_other_band_in_that_shift(change):
    window, bands = 3, 3
    queues = [BandedFifoQueue(2 * window * bands, window, bands, FRAME, seed=3) for _ in range(2)]
    for queue in queues:
        for k in range(window * bands + 1):
            queue.push(float(k), coupled)
    changed = queues[1].bands[1]
    if change == "latents":
        changed.latents = changed.latents + torch.linspace(0.5, 1.5, window).view(window, 1, 1, 1, 1)
    else:
        changed.payloads[0] = 100.0
    same, other = (shift_outputs(q, q.push(50.0, coupled)) for q in queues)
    assert torch.equal(same[0], other[0])
    assert torch.equal(same[2], other[2])
    # The change did reach every frame of its own band (the step function couples them).
    assert all(not torch.equal(x, y) for x, y in zip(same[1], other[1]))


def test_a_band_advanced_alone_matches_its_part_of_the_batch():
    window, n_bands, steps = 3, 3, 18
    sigmas = flow_sigmas(steps)
    g = torch.Generator().manual_seed(0)

    def fill() -> list[Band]:
        g.manual_seed(0)
        bands = [Band(window) for _ in range(n_bands)]
        for b, band in enumerate(bands):
            for t in range(window):
                band.receive(LatentFrame(torch.randn(FRAME, generator=g), 2 * b + t, float(b * window + t)))
        return bands

    def advance(bands: list[Band], delays: torch.Tensor) -> None:
        shift = Shift(bands, sigmas, 4, delays)
        shift.run(coupled)
        shift.finish()

    together, alone = fill(), fill()
    delays = torch.tensor([[0, 1, 2]] * n_bands)
    advance(together, delays)
    for band, part in zip(alone, delays):
        advance([band], part[None])
    for x, y in zip(together, alone):
        assert torch.equal(x.latents, y.latents)
        assert torch.equal(x.indices, y.indices)
    assert together[0].indices.tolist() == [4, 4, 4]  # started at (0, 1, 2), active (4, 3, 2) steps


# -- dtypes and bad input ------------------------------------------------------------------


def test_latents_are_float32_and_a_half_precision_velocity_still_lands_on_target():
    # The model may run in bfloat16; the queue's latents are float32 whatever it is, and there
    # is no option to keep them in the model's dtype.
    queue = BandedFifoQueue(4, 2, 1, FRAME)
    targets = make_targets(4)
    recorder = Recorder()

    def half_model(latents, timesteps, payloads):
        return recorder(latents, timesteps, payloads).to(torch.bfloat16)

    out = [f for f in (queue.push(t, half_model) for t in targets) if f is not None]
    assert all(latents.dtype == torch.float32 for _, _, latents in recorder.calls)
    assert all(f.latent.dtype == torch.float32 for f in out)
    assert all(band.latents.dtype == torch.float32 for band in queue.bands)
    for frame in out:
        torch.testing.assert_close(frame.latent, frame.payload.x0, atol=2e-2, rtol=1e-2)
    with pytest.raises(TypeError):
        BandedFifoQueue(4, 2, 1, FRAME, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "steps, window, bands, words",
    [
        (25, 6, 1, ["steps (25)", "window * bands (6 * 1 = 6)"]),
        (24, 6, 3, ["steps (24)", "window * bands (6 * 3 = 18)"]),
        (0, 6, 1, ["steps"]),
        (24, 0, 1, ["window"]),
        (24, 6, 0, ["bands"]),
        (24, 2.5, 1, ["window"]),
    ],
)
def test_bad_steps_window_or_bands_are_refused_by_name(steps, window, bands, words):
    with pytest.raises(ValueError) as error:
        BandedFifoQueue(steps, window, bands, FRAME)
    for word in words:
        assert word in str(error.value)


def test_bad_frame_shape_and_bad_velocity_are_refused():
    with pytest.raises(ValueError, match="frame_shape"):
        BandedFifoQueue(4, 2, 1, (2, 3, 4))
    queue = BandedFifoQueue(2, 2, 1, FRAME)
    queue.push(0, damped)
    with pytest.raises(ValueError, match="velocity of shape"):
        queue.push(1, lambda x, t, p: x[:, :1])
