"""The banded FIFO denoising queue: pure tensor math, no model inside.

A session's queue holds L = B*T latent frames at staggered noise levels. Every frame gets N
Euler steps in its life; the model sees windows of T frames, and the queue is cut into B
bands of T frames. Each push, a fresh noise frame enters band 0, every frame advances
s = N / L steps (one *shift*), and the frame that is now clean leaves.

Order of slots (the convention everywhere below):

- Inside a band, position 0 is the cleanest (oldest) frame and position T-1 the noisiest
  (newest), so a window is in temporal order, as the reference feeds it to the model.
- Band 0 holds the newest frames and band B-1 the cleanest: noise enters band 0, each band
  hands its cleanest frame on to band b+1, and band B-1's cleanest frame leaves the queue.
- Counting all L slots from the cleanest, slot j = (B-1-b)*T + t. At the end of a shift slot
  j sits at step index N - s*j; slot 0 is at N (sigma 0), done.

Joining without a stall. The reference gathers L conditions, then runs an N-call warm-up in
which slot j starts at call s*j (idx_j = max(0, i - s*j)); run in a shared round, those N
calls stop every other session's picture for N/s rounds' worth of calls. Here the warm-up is
spread over the first L pushes, s calls each, batched with everybody's calls: push k runs the
warm-up's calls s*k .. s*k + s - 1, so slot j still starts at call s*j, when frame j has
just arrived. A slot whose frame has not arrived yet holds that frame's noise (drawn at the
first push) and, as a stand-in for its conditions, those of the newest frame of its band; it
is never stepped before its frame arrives, and a band with no frame yet is not run at all.
So every push of a session makes s calls, the first frame leaves at the L-th push as in the
reference, and with B=1, N=24, T=6 (s=4) the steps are exactly the reference's: its 24
warm-up calls, then four per output frame. The only difference: until frame j arrives, the
noise in slot j is seen with the newest known conditions instead of frame j's own.

The parts, each the one place of its rules:

- `QueueSchedule`: N, T, B and what follows from them (sigmas, the warm-up's delays, the
  steps push k runs, the check on a leaving frame).
- `QueueFront`: a session's side of the queue that lives on no device: the seeded noise of
  new frames, the slot each takes, and the text refresh.
- `Band`: T slots, the unit that can live on its own device; it takes in and hands over one
  `LatentFrame` (a latent, its step index and its payload) per shift.
- `Shift`: the Euler steps of one push over full bands, prepared up front.

`BandedFifoQueue` is a front and B bands on one device, advancing all their windows as one
batch; the stages of a denoiser pool (`dwm.pipelines.stages`) hold the same bands one per
device, with the session's front in the coordinator.

Precision: latents, noise and every hand-over are float32 (`LATENT_DTYPE`), whatever the
model's dtype. Near the end of a frame's life one Euler step moves a latent by
(sigma[N-1] - sigma[N]) * v, about 0.009 * v with the SD3.5 schedule at N = 24, which is the
size of bfloat16's spacing (2^-7 relative) at a latent of magnitude 1: in the model's half
precision each such update would be rounded to a whole spacing, or lost. The model casts the
latents to its own dtype at its input; the step function's velocity is taken back to float32
for the update, as the reference computes its scheduler step in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any, NamedTuple, Protocol

import torch

from dwm.pipelines.schedule import flow_sigmas

# The dtype of every latent the queue holds or hands over (see "Precision" above).
LATENT_DTYPE = torch.float32

# B rows (one per band) of T payloads (window positions, cleanest first). The queue builds
# one grid per shift and passes that same object to every step of the shift, so a step
# function may prepare per-shift work (stacking frame contexts) once, keyed on its identity.
PayloadGrid = tuple[tuple[Any, ...], ...]

# on_step(done, total): called after each model call of a push; total is that push's count.
ProgressCallback = Callable[[int, int], None]


class StepFunction(Protocol):
    """The model side of a step.

    latents (B, T, V, C, h, w); timesteps (B, T, V) float32 = sigma * 1000 per slot, repeated
    over views; payloads: the shift's `PayloadGrid` (the identical object on every step of
    one shift). Returns the flow velocity (B, T, V, C, h, w).
    """

    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, payloads: PayloadGrid
    ) -> torch.Tensor: ...


class Phase(str, Enum):
    """What a push does, from the number of frames pushed before it."""

    RAMP = "ramp"  # the first L pushes: s calls of the warm-up each; the L-th hands frames on
    RUN = "run"  # every band advances s steps and hands one frame on


@dataclass
class LatentFrame:
    """One frame on its way through the queue.

    latent: (V, C, h, w), float32 inside the queue; index: Euler steps it has had (into the
    sigmas: 0 is pure noise, N is clean); payload: what its owner attached, opaque to the
    queue (the step function reads it, and it comes back with the frame). The same data at
    every point of a frame's life: noise entering band 0, handed from band to band (between
    stages on the CPU, about 160 KB at the reference size: 3 x 16 x 22 x 38 x 4 bytes, with
    its compact conditions as payload), leaving clean.
    """

    latent: torch.Tensor
    index: int
    payload: Any


class Band:
    """T consecutive slots of the queue, position 0 the cleanest, on one device.

    State: `latents` (n, V, C, h, w) float32 on `device`, `indices` (n,) long step indices on
    the CPU (the schedule is computed there), `payloads` (n items), n <= T. While the queue
    warms up, a slot whose frame has not arrived has payload None (see `window_payloads`).
    """

    def __init__(self, window: int, device: torch.device | str = "cpu"):
        self.window, self.device = window, torch.device(device)
        self.latents: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        self.payloads: list[Any] = []

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def full(self) -> bool:
        return len(self) == self.window

    def receive(self, frame: LatentFrame) -> None:
        """Append a frame at the noisy end (position n), its latent moved to this band's
        device in float32."""
        if self.full:
            raise RuntimeError(f"band is full ({self.window} slots)")
        latent = frame.latent.to(self.device, LATENT_DTYPE)[None]
        index = torch.tensor([frame.index], dtype=torch.long)  # step indices live on the CPU
        if self.latents is None:
            self.latents, self.indices = latent, index
        else:
            self.latents = torch.cat([self.latents, latent])
            self.indices = torch.cat([self.indices, index])
        self.payloads.append(frame.payload)

    def place(self, position: int, frame: LatentFrame) -> None:
        """Frame takes the slot at `position`, which held its noise (`QueueFront`) until now."""
        if not (0 <= position < len(self) and self.payloads[position] is None):
            raise RuntimeError(f"slot {position} of this band awaits no frame")
        self.latents[position] = frame.latent.to(self.device, LATENT_DTYPE)
        self.indices[position] = frame.index
        self.payloads[position] = frame.payload

    @property
    def started(self) -> bool:
        """Whether any frame has arrived (a band of noise slots only is never run)."""
        return any(p is not None for p in self.payloads)

    def window_payloads(self) -> tuple[Any, ...]:
        """The payloads the model sees: a slot still awaiting its frame shows the newest
        arrived frame's before it (frames arrive cleanest first)."""
        out, newest = [], None
        for payload in self.payloads:
            newest = payload if payload is not None else newest
            out.append(newest)
        return tuple(out)

    def hand_over(self) -> LatentFrame:
        """Remove and return the cleanest frame (position 0)."""
        if not self.payloads:
            raise RuntimeError("band is empty")
        if self.payloads[0] is None:
            raise RuntimeError("the band's cleanest slot is still awaiting its frame")
        frame = LatentFrame(self.latents[0], int(self.indices[0]), self.payloads.pop(0))
        self.latents, self.indices = self.latents[1:], self.indices[1:]
        return frame

    def clear(self) -> None:
        self.latents, self.indices, self.payloads = None, None, []


class Shift:
    """The Euler steps of one push over full windows of `bands`, prepared up front.

    The whole schedule is known before the first model call, so it is computed once on the
    CPU and moved to the latents' device: the step loop is then only the model call and the
    update. A caller runs the steps itself (`run`) or interleaves the steps of several
    queues' shifts, one model call for all of them per step (`dwm.pipelines.streaming.run_shifts`).

    sigmas (N+1,) float32 on the CPU. delays (B, T) long, optional: slot (b, t) is only
    updated from step `delays[b, t]` on; before that it stays where it is (pure noise at
    index 0 during the warm-up) but still sits in the window. A delay of `steps` or more:
    not updated in this shift at all.
    latents (B, T, V, C, h, w): the windows, stacked; timesteps (steps, B, T, V) float32 =
    sigma * 1000 per slot and step, repeated over views; grid: the shift's `PayloadGrid`.
    """

    def __init__(
        self,
        bands: Sequence[Band],
        sigmas: torch.Tensor,
        steps: int,
        delays: torch.Tensor | None = None,
    ):
        if not all(band.full for band in bands):
            raise RuntimeError("every band must hold a full window to advance")
        self.bands = list(bands)
        self.latents = torch.stack([band.latents for band in bands])  # (B, T, V, C, h, w)
        indices = torch.stack([band.indices for band in bands])  # (B, T) long, CPU
        self.grid: PayloadGrid = tuple(band.window_payloads() for band in bands)
        self.steps = steps
        n_bands, window, views = self.latents.shape[:3]
        if delays is None:
            delays = torch.zeros_like(indices)
        k = torch.arange(steps).view(steps, 1, 1)
        active = delays[None] <= k  # (steps, B, T)
        at = indices[None] + (k - delays[None]).clamp(min=0)  # step index at the start of step k
        if bool((indices + (steps - delays).clamp(min=0) >= sigmas.shape[0]).any()):
            raise RuntimeError(f"a frame would be stepped past the last of {sigmas.shape[0] - 1} steps")
        sigma = sigmas[at]  # (steps, B, T)
        device = self.latents.device
        self.timesteps = (sigma * 1000).unsqueeze(-1).expand(-1, -1, -1, views).contiguous().to(device)
        self._dt = (sigmas[at + active.long()] - sigma).to(device)  # (steps, B, T), <= 0
        self._mask = active.to(device)
        self._per_slot = (n_bands, window) + (1,) * (self.latents.dim() - 2)  # broadcast over (V, C, h, w)
        self._end_indices = indices + (steps - delays).clamp(min=0)
        self.done = 0  # steps applied so far

    def apply(self, velocity: torch.Tensor) -> None:
        """One Euler step with the model's velocity (B, T, V, C, h, w), any float dtype, for
        `timesteps[done]`: x <- x + (sigma[idx+1] - sigma[idx]) * v in float32, the latents'
        dtype; slots not yet started (see `delays`) stay bit-identical."""
        if self.done >= self.steps:
            raise RuntimeError(f"this shift has had all its {self.steps} steps")
        if velocity.shape != self.latents.shape:
            raise ValueError(
                f"step function returned velocity of shape {tuple(velocity.shape)}; "
                f"expected the latents' shape {tuple(self.latents.shape)}"
            )
        i, latents = self.done, self.latents
        stepped = latents + self._dt[i].view(self._per_slot) * velocity.to(LATENT_DTYPE)
        self.latents = torch.where(self._mask[i].view(self._per_slot), stepped, latents)
        self.done += 1

    def run(self, step_fn: StepFunction, on_call: Callable[[int], None] | None = None) -> None:
        """All the remaining steps with `step_fn`; on_call(done) after each model call."""
        with torch.no_grad():
            while self.done < self.steps:
                self.apply(step_fn(self.latents, self.timesteps[self.done], self.grid))
                if on_call is not None:
                    on_call(self.done)

    def finish(self) -> None:
        """Write the stepped windows back into the bands."""
        if self.done != self.steps:
            raise RuntimeError(f"this shift has had {self.done} of its {self.steps} steps")
        for b, band in enumerate(self.bands):
            band.latents, band.indices = self.latents[b], self._end_indices[b]


@dataclass(frozen=True)
class QueueSchedule:
    """N, T and B of a queue, and what follows from them.

    steps: N, Euler steps each frame gets; window: T, frames the model sees at once; bands:
    B. N must be a multiple of L = B*T: each push advances every frame s = N / L steps.
    shift, train_steps: the flow-matching schedule's sigma shift and training steps
    (`flow_sigmas`).
    """

    steps: int
    window: int
    bands: int
    shift: float = 3.0
    train_steps: int = 1000

    def __post_init__(self):
        for name in ("steps", "window", "bands"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        length = self.length
        if self.steps % length:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of window * bands ({self.window} * "
                f"{self.bands} = {length}), so that every frame advances the same whole number "
                f"of steps per push; allowed: steps in {[length * k for k in range(1, 5)]}..."
            )

    @property
    def length(self) -> int:
        """L = B*T, the frames the queue holds."""
        return self.window * self.bands

    @property
    def steps_per_shift(self) -> int:
        """s = N / L, the steps every frame advances per push once the queue runs."""
        return self.steps // self.length

    @property
    def depth(self) -> int:
        """Frames between a frame's conditions entering and its picture leaving (L - 1)."""
        return self.length - 1

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """(N+1,) float32 on the CPU, 1.0 .. 0."""
        return flow_sigmas(self.steps, self.shift, self.train_steps)

    @cached_property
    def warmup_delays(self) -> torch.Tensor:
        """(B, T) long: the warm-up call at which slot (b, t) starts, s*j for slot j counted
        from the cleanest, so that after the N warm-up calls slot j sits at N - s*j."""
        return self.steps_per_shift * self.slot_numbers

    @cached_property
    def slot_numbers(self) -> torch.Tensor:
        """(B, T) long: slot j of (band b, position t), counted from the cleanest."""
        return torch.arange(self.length).view(self.bands, self.window).flip(0)

    def slot(self, j: int) -> tuple[int, int]:
        """(band, position) of slot j."""
        return self.bands - 1 - j // self.window, j % self.window

    def phase(self, pushed: int) -> Phase:
        """The phase of push `pushed` (0-based: the number of frames pushed before it)."""
        return Phase.RAMP if pushed < self.length else Phase.RUN

    def hands_over(self, pushed: int) -> bool:
        """Whether push `pushed` hands each band's cleanest frame on (one leaves the queue):
        from the L-th push on."""
        return pushed >= self.length - 1

    def shift_for(self, pushed: int, bands: Sequence[Band], first: int = 0) -> Shift | None:
        """The Euler steps push `pushed` runs over `bands`, which are bands first, first + 1,
        ... of the queue (all B in one piece, one on a stage): s steps, over the bands that
        have a frame (see "Joining without a stall"); None if none has."""
        if self.phase(pushed) is Phase.RUN:
            return Shift(bands, self.sigmas, self.steps_per_shift)
        delays = (self.warmup_delays - self.steps_per_shift * pushed).clamp(min=0)[first : first + len(bands)]
        running = [b for b, band in enumerate(bands) if band.started]
        if not running:
            return None
        return Shift([bands[b] for b in running], self.sigmas, self.steps_per_shift, delays[running])

    def leaving(self, frame: LatentFrame) -> LatentFrame:
        """The last band's cleanest frame, which leaves the queue: it must have had all N steps."""
        if frame.index != self.steps:
            raise RuntimeError(f"leaving frame has had {frame.index} of {self.steps} steps")
        return frame


class Entry(NamedTuple):
    """A frame for the queue: the band it goes to, its position there (None: appended at the
    noisy end, as every frame once the queue runs; a number: it takes the slot that holds its
    noise), and the frame (noise, index 0, payload; None for a slot whose frame comes later)."""

    band: int
    position: int | None
    frame: LatentFrame


class QueueFront:
    """A session's side of the queue that lives on no device.

    schedule: the queue's; frame_shape: (V, C, h, w) of one latent frame; seed: the noise
    generator's (CPU, so that the same seed gives the same frames on any device);
    text_interval: frames between caption refreshes.

    Per push (`enter`): a fresh float32 noise frame and the slot it takes. The first push
    fills all L slots, cleanest first: its frame in slot 0 and the noise of the next L-1
    frames (drawn now, in order) in theirs; push k < L puts frame k into slot k; after that
    every frame enters band 0. Text: the reference re-encodes the captions every
    `text_interval` frames and reuses the latest embedding in between (`refresh_text`).
    """

    def __init__(self, schedule: QueueSchedule, frame_shape: Sequence[int], seed: int = 0, text_interval: int = 4):
        frame_shape = tuple(int(n) for n in frame_shape)
        if len(frame_shape) != 4 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape must be (V, C, h, w) of positive sizes, got {frame_shape}")
        if text_interval < 1:
            raise ValueError(f"text_interval={text_interval} must be >= 1")
        self.schedule, self.frame_shape, self.text_interval = schedule, frame_shape, text_interval
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """A new stream: the noise restarts from `seed` (default: the front's seed)."""
        if seed is not None:
            self.seed = seed
        self.generator.manual_seed(self.seed)
        self.pushed = 0
        self.text: tuple[str, ...] | None = None  # the captions of the latest refresh
        self._noise: list[torch.Tensor] = []  # while warming up: the noise of slot j

    @property
    def warming(self) -> bool:
        """True until the first frame has left (fewer than L frames have arrived)."""
        return self.pushed < self.schedule.length

    def refresh_text(self, captions: Sequence[str]) -> bool:
        """Whether the next frame's captions are encoded (the first frame's, then every
        `text_interval`-th); if so they become `text`, the captions the frames are generated
        with until the next refresh. Call before `enter`."""
        if self.text is not None and self.pushed % self.text_interval:
            return False
        self.text = tuple(captions)
        return True

    def enter(self, payload: Any) -> list[Entry]:
        """A new frame with `payload`: the entries of this push, in order (see the class)."""
        k, schedule = self.pushed, self.schedule
        self.pushed += 1
        if k == 0:
            self._noise = [self._draw() for _ in range(schedule.length)]
            # Appended cleanest first: slot j lands at its position of its band.
            return [Entry(schedule.slot(j)[0], None, LatentFrame(noise, 0, payload if j == 0 else None))
                    for j, noise in enumerate(self._noise)]
        if k < schedule.length:
            # Already in the queue's slot: sent again so that a stage can hold it as it is.
            return [Entry(*schedule.slot(k), LatentFrame(self._noise[k], 0, payload))]
        self._noise = []
        return [Entry(0, None, LatentFrame(self._draw(), 0, payload))]

    def _draw(self) -> torch.Tensor:
        return torch.randn(self.frame_shape, generator=self.generator, dtype=LATENT_DTYPE)


class BandedFifoQueue:
    """A session's denoising queue on one device: a `QueueFront` and B `Band`s.

    steps, window, bands, shift, train_steps: the `QueueSchedule`; frame_shape, seed,
    text_interval: the `QueueFront`; device: of the latents, which are float32 whatever the
    model's dtype (see "Precision" above).

    Life of a stream: every push runs s steps; the first L spread the warm-up over the slots
    as their frames arrive, the L-th returns the first frame, and every later push returns
    one. The k-th frame to leave carries the k-th pushed payload.
    """

    def __init__(
        self,
        steps: int,
        window: int,
        bands: int,
        frame_shape: Sequence[int],
        shift: float = 3.0,
        train_steps: int = 1000,
        seed: int = 0,
        device: torch.device | str = "cpu",
        text_interval: int = 4,
    ):
        self.schedule = QueueSchedule(steps, window, bands, shift, train_steps)
        self.front = QueueFront(self.schedule, frame_shape, seed, text_interval)
        self.device = torch.device(device)
        self.bands = [Band(window, self.device) for _ in range(bands)]

    def reset(self, seed: int | None = None) -> None:
        """Empty the queue and restart its noise from `seed` (default: the queue's seed)."""
        self.front.reset(seed)
        for band in self.bands:
            band.clear()

    def __len__(self) -> int:
        """Frames inside the queue (L-1 between pushes once it runs)."""
        return sum(len(band) for band in self.bands)

    @property
    def warming(self) -> bool:
        return self.front.warming

    @property
    def steps_per_shift(self) -> int:
        return self.schedule.steps_per_shift

    def push(
        self, payload: Any, step_fn: StepFunction, on_step: ProgressCallback | None = None
    ) -> LatentFrame | None:
        """A new frame enters as noise; returns the frame that leaves (latent at sigma 0 and
        the payload it was pushed with), if one does.

        payload: the frame's precomputed context, handed to `step_fn` and back with the frame.
        step_fn: the model side (see `StepFunction`); passed per push so the queue holds no
        model and a caller may route its windows wherever the denoiser lives.
        on_step(done, total) is called after each model call of this push.
        """
        shift = self.begin_push(payload)
        total = shift.steps
        shift.run(step_fn, None if on_step is None else (lambda done: on_step(done, total)))
        return self.end_push(shift)

    def begin_push(self, payload: Any) -> Shift:
        """The first half of `push`: a fresh noise frame enters with `payload`; returns the
        shift to run (s steps). Run all its steps, then call `end_push` with it before the
        next push."""
        pushed = self.front.pushed
        for entry in self.front.enter(payload):
            band = self.bands[entry.band]
            band.receive(entry.frame) if entry.position is None else band.place(entry.position, entry.frame)
        return self.schedule.shift_for(pushed, self.bands)

    def end_push(self, shift: Shift) -> LatentFrame | None:
        """The second half of `push`: store the stepped windows, hand each band's cleanest
        frame on, and return the frame that leaves (None in the first L-1 pushes)."""
        shift.finish()
        if not self.schedule.hands_over(self.front.pushed - 1):
            return None
        handed = [band.hand_over() for band in self.bands]
        for band, frame in zip(self.bands[1:], handed):
            band.receive(frame)
        return self.schedule.leaving(handed[-1])
