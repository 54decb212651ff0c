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

With B=1, N=24, T=6 (s=4) this is exactly the reference schedule: a 24-call warm-up with
idx_j = max(0, i - 4j) once six frames have arrived, then four calls per output frame.

A `Band` is the unit that could live on its own device: it holds its T slots, advances them
with a step function, and hands over one `Slot` (one latent frame, its payload and step
index) per shift. `BandedFifoQueue` composes B bands and, on one device, advances all their
windows as one batch.

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


@dataclass
class Slot:
    """One frame of the queue: latent (V, C, h, w) float32, its opaque payload, and how many
    Euler steps it has had (index into the sigmas; N means clean)."""

    latent: torch.Tensor
    payload: Any
    index: int


class LeavingFrame(NamedTuple):
    """A finished frame: latent (V, C, h, w) at sigma 0, and the payload it was pushed with."""

    latent: torch.Tensor
    payload: Any


class Band:
    """T consecutive slots of the queue, position 0 the cleanest.

    State: `latents` (n, V, C, h, w) float32 on the latents' device, `indices` (n,) long step
    indices on the CPU (the schedule is computed there), `payloads` (n items), n <= T.
    """

    def __init__(self, window: int):
        self.window = window
        self.latents: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        self.payloads: list[Any] = []

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def full(self) -> bool:
        return len(self) == self.window

    def receive(self, slot: Slot) -> None:
        """Append a frame at the noisy end (position n); its latent is kept in float32."""
        if self.full:
            raise RuntimeError(f"band is full ({self.window} slots)")
        latent = slot.latent.to(LATENT_DTYPE)[None]
        index = torch.tensor([slot.index], dtype=torch.long)  # step indices live on the CPU
        if self.latents is None:
            self.latents, self.indices = latent, index
        else:
            self.latents = torch.cat([self.latents, latent])
            self.indices = torch.cat([self.indices, index])
        self.payloads.append(slot.payload)

    def hand_over(self) -> Slot:
        """Remove and return the cleanest frame (position 0)."""
        if not self.payloads:
            raise RuntimeError("band is empty")
        slot = Slot(self.latents[0], self.payloads.pop(0), int(self.indices[0]))
        self.latents, self.indices = self.latents[1:], self.indices[1:]
        return slot

    def clear(self) -> None:
        self.latents, self.indices, self.payloads = None, None, []

    def advance(
        self,
        step_fn: StepFunction,
        sigmas: torch.Tensor,
        steps: int,
        delays: torch.Tensor | None = None,
        on_call: Callable[[int], None] | None = None,
    ) -> None:
        """Run `steps` Euler steps on this band alone (the step function sees B=1).

        sigmas (N+1,) float32 CPU; delays (T,) long, optional: see `advance_bands`.
        """
        advance_bands([self], step_fn, sigmas, steps, None if delays is None else delays[None], on_call)


class Shift:
    """The Euler steps of one push over full windows of `bands`, prepared up front.

    The whole schedule is known before the first model call, so it is computed once on the
    CPU and moved to the latents' device: the step loop is then only the model call and the
    update. A caller runs the steps itself (`run`) or interleaves the steps of several
    queues' shifts, one model call for all of them per step (`dwm.pipelines.streaming.push_many`).

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
        self.grid: PayloadGrid = tuple(tuple(band.payloads) for band in bands)
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


def advance_bands(
    bands: Sequence[Band],
    step_fn: StepFunction,
    sigmas: torch.Tensor,
    steps: int,
    delays: torch.Tensor | None = None,
    on_call: Callable[[int], None] | None = None,
) -> None:
    """Advance the full windows of `bands` by `steps` Euler steps, as one batch.

    sigmas (N+1,) float32 on the CPU. delays (B, T) long, optional: slot (b, t) is only
    updated from local step `delays[b, t]` on; before that it stays where it is (pure noise at
    index 0 during the warm-up) but still sits in the window. See `Shift` for the update.
    """
    shift = Shift(bands, sigmas, steps, delays)
    shift.run(step_fn, on_call)
    shift.finish()


def warmup_delays(steps_per_shift: int, window: int, bands: int) -> torch.Tensor:
    """(B, T) long: the warm-up step at which slot (b, t) starts, s*j for slot j counted from
    the cleanest, so that at the end of the N-step warm-up slot j sits at step N - s*j."""
    cleanest_first = torch.arange(window * bands).view(bands, window).flip(0)  # (B, T) -> j
    return steps_per_shift * cleanest_first


def gathering_band(pushed: int, window: int, bands: int) -> int:
    """The band the `pushed`-th frame (0-based, pushed < B*T) enters while the queue gathers:
    the queue fills from the clean end, so the first frame becomes slot 0."""
    return bands - 1 - pushed // window


class BandedFifoQueue:
    """A session's denoising queue of L = bands * window frames.

    steps: N, Euler steps each frame gets; window: T, frames the model sees at once;
    bands: B; frame_shape: (V, C, h, w) of one latent frame. N must be a multiple of B*T;
    each push advances every frame s = N / (B*T) steps. shift, train_steps: the flow-matching
    schedule (`flow_sigmas`). seed: the queue's own noise generator (CPU, so the same seed
    gives the same frames on any device). device: of the latents, which are float32 whatever
    the model's dtype (see "Precision" above).

    Life of a stream: the first L-1 pushes only gather (no model call); the L-th push runs
    the N-step warm-up over all slots and returns the first frame; every later push runs s
    steps and returns one frame. The k-th frame to leave carries the k-th pushed payload.
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
    ):
        for name, value in (("steps", steps), ("window", window), ("bands", bands)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        length = window * bands
        if steps % length:
            raise ValueError(
                f"steps ({steps}) must be a multiple of window * bands ({window} * {bands} = "
                f"{length}), so that every frame advances the same whole number of steps per "
                f"push; allowed: steps in {[length * k for k in range(1, 5)]}..."
            )
        frame_shape = tuple(int(n) for n in frame_shape)
        if len(frame_shape) != 4 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape must be (V, C, h, w) of positive sizes, got {frame_shape}")
        self.steps, self.window, self.num_bands = steps, window, bands
        self.length = length
        self.steps_per_shift = steps // length
        self.frame_shape = frame_shape
        self.dtype, self.device = LATENT_DTYPE, torch.device(device)
        self.sigmas = flow_sigmas(steps, shift, train_steps)  # (N+1,) float32, CPU
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.bands = [Band(window) for _ in range(bands)]
        # Warm-up: slot j starts s*j steps late, so it ends at index N - s*j.
        self._warmup_delays = warmup_delays(self.steps_per_shift, window, bands)
        self.reset()

    # -- state ---------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> None:
        """Empty the queue and restart its noise from `seed` (default: the queue's seed)."""
        if seed is not None:
            self.seed = seed
        self.generator.manual_seed(self.seed)
        for band in self.bands:
            band.clear()
        self.pushed = 0
        self._last_payload: Any = None

    def __len__(self) -> int:
        """Frames inside the queue (L-1 between pushes once it runs)."""
        return sum(len(band) for band in self.bands)

    @property
    def warming(self) -> bool:
        """True until the warm-up has run (fewer than L frames have arrived)."""
        return self.pushed < self.length

    @property
    def pushes_to_first_output(self) -> int:
        """Pushes still needed before one returns a frame (counting that push); 0 once running."""
        return max(0, self.length - self.pushed)

    @property
    def calls_for_next_push(self) -> int:
        """Model calls the next push will make: 0 while gathering, N for the warm-up, s after."""
        if self.pushed + 1 < self.length:
            return 0
        return self.steps if self.pushed + 1 == self.length else self.steps_per_shift

    # -- stream --------------------------------------------------------------------------

    def push(
        self, payload: Any, step_fn: StepFunction, on_step: ProgressCallback | None = None
    ) -> LeavingFrame | None:
        """A new frame enters as noise; returns the frame that leaves, if one does.

        payload: the frame's precomputed context, handed to `step_fn` and back with the frame.
        step_fn: the model side (see `StepFunction`); passed per push so the queue holds no
        model and a caller may route its windows wherever the denoiser lives.
        on_step(done, total) is called after each model call of this push.
        """
        shift = self.begin_push(payload)
        if shift is None:
            return None
        total = shift.steps
        shift.run(step_fn, None if on_step is None else (lambda done: on_step(done, total)))
        return self.end_push(shift)

    def begin_push(self, payload: Any) -> Shift | None:
        """The first half of `push`: a fresh noise frame enters with `payload`; returns the
        shift to run (N steps for the warm-up, s after), or None while the queue gathers.
        Run all its steps, then call `end_push` with it before the next push."""
        noise = torch.randn(self.frame_shape, generator=self.generator, dtype=LATENT_DTYPE)
        slot = Slot(noise.to(self.device), payload, 0)
        if self.warming:
            # Gathering fills the queue from the clean end: the first frame becomes slot 0.
            self.bands[gathering_band(self.pushed, self.window, self.num_bands)].receive(slot)
        else:
            self.bands[0].receive(slot)
        self.pushed += 1
        self._last_payload = payload
        if self.warming:
            return None
        if self.pushed == self.length:  # the L-th frame: warm up all slots
            return Shift(self.bands, self.sigmas, self.steps, self._warmup_delays)
        return Shift(self.bands, self.sigmas, self.steps_per_shift)

    def end_push(self, shift: Shift) -> LeavingFrame:
        """The second half of `push`: store the stepped windows, hand each band's cleanest
        frame on, and return the frame that leaves."""
        shift.finish()
        leaving = self.bands[-1].hand_over()
        if leaving.index != self.steps:
            raise RuntimeError(f"leaving frame has had {leaving.index} of {self.steps} steps")
        for b in range(self.num_bands - 2, -1, -1):
            self.bands[b + 1].receive(self.bands[b].hand_over())
        return LeavingFrame(leaving.latent, leaving.payload)

    def flush(self, step_fn: StepFunction, on_step: ProgressCallback | None = None) -> list[LeavingFrame]:
        """Finish every frame still inside and return them in order; the queue is then empty.

        Pushes L-1 padding frames (fresh noise, the last payload) behind them, so each real
        frame still gets its N steps in a full window; the padding is discarded. Costs
        (L-1)*s model calls once running. The noise generator is not re-seeded.
        """
        out: list[LeavingFrame] = []
        if len(self) == 0:
            return out
        inside, payload = len(self), self._last_payload
        for _ in range(self.length - 1):
            frame = self.push(payload, step_fn, on_step)
            if frame is not None:
                out.append(frame)
        if len(out) != inside:
            raise RuntimeError(f"flush returned {len(out)} frames of {inside}")
        for band in self.bands:
            band.clear()
        self.pushed = 0
        return out
