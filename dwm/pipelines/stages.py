"""The banded queue split across devices: one band of every session's queue per stage.

A session's `BandedFifoQueue` of B bands can be cut into B stages, each holding band b of
every session on its own device (a GPU of a denoiser pipeline). Per round (one frame per
session), every stage advances its bands at the same time, then hands each session's
cleanest frame to the next stage, which takes it in at the next round; the last stage's
cleanest frame leaves, decoded. Only that one latent frame per band crosses between stages,
with its conditions in their compact form (`PackedConditions`) and the captions its text
embedding was made from; each stage rebuilds the frame's context from them once, when the
frame enters its band, and keeps it for all of that frame's steps there.

`QueueFront` is a session's side of the queue that is not on any device: its noise (the
queue's seeded generator), the routing of the first L frames while the queue gathers, the
warm-up, and the text refresh. `BandStage` is a stage. Together, with one session per stage
and `batch_bands=false` in one process, they give the same frames bit for bit as
`StreamingPipeline` (the model calls are the same calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch

from dwm.conditions.packed import PackedConditions
from dwm.models.base import FrameContext
from dwm.pipelines.fifo import LATENT_DTYPE, Band, Shift, Slot, gathering_band, warmup_delays
from dwm.pipelines.guidance import GuidedStep, UnconditionalContexts
from dwm.pipelines.schedule import flow_sigmas
from dwm.pipelines.streaming import LATENT_SCALE, ModelParts, frame_contexts, run_shifts


class Phase(str, Enum):
    """What a session's queue does in a round."""

    GATHER = "gather"  # the frame only enters (the first L - 1 frames)
    WARM_UP = "warm_up"  # the L-th frame: every band runs the N-step warm-up
    RUN = "run"  # every band advances s steps and hands one frame on


@dataclass
class StageFrame:
    """A frame on its way into a stage's band.

    latent: (V, C, h, w) float32 on the CPU (the queue's precision, whatever the model's; about
    160 KB at the reference size: 3 x 16 x 22 x 38 x 4 bytes); index: Euler steps had so far;
    conditions: the frame's conditions, compact; text: the captions its text embedding is made
    from (the latest refresh's, see `QueueFront`).
    """

    latent: torch.Tensor
    index: int
    conditions: PackedConditions
    text: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor and array data it carries between processes."""
        return self.latent.numel() * self.latent.element_size() + self.conditions.nbytes


class Entry(NamedTuple):
    """One session's frame for a round: the stage it enters and the session's phase."""

    stage: int
    frame: StageFrame
    phase: Phase


class QueueFront:
    """A session's queue bookkeeping: noise, gathering, warm-up and text refresh.

    Mirrors `BandedFifoQueue` (same seeded CPU generator, one noise frame per push, the
    first L frames routed from the clean end, the N-step warm-up on the L-th) and the
    caption refresh of `StreamingPipeline` (every `text_interval` frames).
    """

    def __init__(self, steps: int, window: int, bands: int, frame_shape, seed: int, text_interval: int = 4):
        self.window, self.bands, self.length = window, bands, window * bands
        self.frame_shape, self.text_interval = tuple(frame_shape), text_interval
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.pushed = 0
        self._text: tuple[str, ...] | None = None

    @property
    def depth(self) -> int:
        """Frames between a frame's conditions entering and its picture leaving (L - 1)."""
        return self.length - 1

    def enter(self, conditions: PackedConditions) -> Entry:
        noise = torch.randn(self.frame_shape, generator=self.generator, dtype=LATENT_DTYPE)
        if self._text is None or self.pushed % self.text_interval == 0:
            self._text = tuple(conditions.captions)
        k = self.pushed
        self.pushed += 1
        frame = StageFrame(noise, 0, conditions, self._text)
        if k < self.length:  # gathering fills the queue from the clean end
            phase = Phase.WARM_UP if k == self.length - 1 else Phase.GATHER
            return Entry(gathering_band(k, self.window, self.bands), frame, phase)
        return Entry(0, frame, Phase.RUN)


class StagePayload(NamedTuple):
    """A frame inside a stage's band: its contexts (read by `GuidedStep` as [0] and [1]) and
    what it needs to travel on."""

    cond: FrameContext
    uncond: FrameContext | None
    conditions: PackedConditions
    text: tuple[str, ...]


class _SessionBand:
    """One session's band on a stage, in the form `run_shifts` takes."""

    def __init__(self, model: ModelParts, window: int, guidance: float):
        self.denoiser = model.denoiser
        self.step = GuidedStep(model.denoiser, guidance)
        self.batch_bands = True  # a stage's shift holds one band
        self.band = Band(window)


class BandStage:
    """Band `band` of B of every session's queue, with the model, on one device.

    steps, window, bands, guidance, shift, train_steps, resolution: the queue's (as
    `StreamingPipeline`); device, dtype: of the model here (the bands' latents are float32,
    see `dwm.pipelines.fifo`). batch_sessions: every session's
    window of a step in one model call (true), or one call each (false: bit for bit the
    calls of one session alone).
    """

    def __init__(self, model: ModelParts, band: int, *, steps: int, window: int, bands: int,
                 guidance: float = 4.0, shift: float = 3.0, train_steps: int = 1000,
                 resolution=(176, 304), device="cpu", dtype: torch.dtype = torch.float32,
                 batch_sessions: bool = True):
        if not 0 <= band < bands:
            raise ValueError(f"band {band} of {bands}: must be in [0, {bands})")
        self.model, self.band, self.num_bands = model, band, bands
        self.steps, self.window, self.guidance = steps, window, guidance
        self.steps_per_shift = steps // (window * bands)
        self.sigmas = flow_sigmas(steps, shift, train_steps)
        self.resolution = tuple(int(n) for n in resolution)
        self.device, self.dtype, self.batch_sessions = torch.device(device), dtype, batch_sessions
        self.warmup_delays = warmup_delays(self.steps_per_shift, window, bands)[band]  # (T,)
        self.unconditional = UnconditionalContexts(model.denoiser, model.text_encoder) if guidance != 1.0 else None
        self.sessions: dict[str, _SessionBand] = {}

    @property
    def last(self) -> bool:
        return self.band == self.num_bands - 1

    def open(self, session_id: str) -> None:
        self.sessions[session_id] = _SessionBand(self.model, self.window, self.guidance)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    @torch.inference_mode()
    def _payload(self, frame: StageFrame) -> StagePayload:
        """The frame's contexts on this device, built once as it enters the band."""
        text = self.model.text_encoder.encode(list(frame.text))
        cond, uncond = frame_contexts(
            self.model.denoiser, self.unconditional, frame.conditions.unpack(), text,
            self.resolution, self.device, self.dtype,
        )
        return StagePayload(cond, uncond, frame.conditions, frame.text)

    @torch.inference_mode()
    def round(self, entering: dict[str, StageFrame], phases: dict[str, Phase]) -> dict[str, StageFrame | torch.Tensor]:
        """One round: take in `entering` (session -> frame), advance every session whose phase
        is WARM_UP (N steps, this band's delays) or RUN (s steps), and hand each of those on.

        Returns session -> the frame for the next stage, or, from the last stage, the leaving
        frame's decoded views (V, 3, H, W) float32 in [0, 1] on the CPU. Unknown sessions are
        refused by name.
        """
        unknown = sorted((set(entering) | set(phases)) - set(self.sessions))
        if unknown:
            raise KeyError(f"stage {self.band} holds no queue for sessions {unknown}; open them first")
        for session_id, frame in entering.items():
            slot = Slot(frame.latent.to(self.device, LATENT_DTYPE), self._payload(frame), frame.index)
            self.sessions[session_id].band.receive(slot)
        shifts = []
        for session_id, phase in phases.items():
            if phase == Phase.GATHER:
                continue
            owner = self.sessions[session_id]
            if phase == Phase.WARM_UP:
                shift = Shift([owner.band], self.sigmas, self.steps, self.warmup_delays[None])
            else:
                shift = Shift([owner.band], self.sigmas, self.steps_per_shift)
            shifts.append((session_id, owner, shift))
        if self.batch_sessions:
            run_shifts([(owner, shift) for _, owner, shift in shifts])
        else:
            for _, owner, shift in shifts:
                run_shifts([(owner, shift)])
        out: dict[str, StageFrame | torch.Tensor] = {}
        for session_id, owner, shift in shifts:
            shift.finish()
            slot = owner.band.hand_over()
            payload: StagePayload = slot.payload
            if self.last:
                if slot.index != self.steps:
                    raise RuntimeError(f"leaving frame has had {slot.index} of {self.steps} steps")
                out[session_id] = self.model.decoder.decode(slot.latent.float()).float().cpu()
            else:
                # A copy: a view would carry its whole band's storage across processes.
                out[session_id] = StageFrame(slot.latent.to("cpu", copy=True), slot.index, payload.conditions, payload.text)
        return out


def frame_shape(views: int, latent_channels: int, resolution) -> tuple[int, int, int, int]:
    """(V, C, h, w) of one latent frame at the image resolution (H, W)."""
    height, width = (int(n) for n in resolution)
    return (views, latent_channels, height // LATENT_SCALE, width // LATENT_SCALE)
