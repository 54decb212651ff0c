"""The banded queue split across devices: one band of every session's queue per stage.

A session's queue of B bands can be cut into B stages, each holding band b of every session
on its own device (a GPU of a denoiser pipeline). Per round (one frame per session), every
stage advances its bands at the same time, then hands each session's cleanest frame to the
next stage, which takes it in at the next round; the last stage's cleanest frame leaves,
decoded. Only that one `LatentFrame` per band crosses between stages, its payload the frame's
conditions in their compact form (`PackedConditions`), their captions those its text
embedding is made from; each stage rebuilds the frame's contexts from them once, when the
frame enters its band, and keeps them for all of that frame's steps there.

The rest of a session's queue is its `QueueFront` (`dwm.pipelines.fifo`), kept by whoever
feeds the stages: `enter_conditions` gives a frame and the band it enters. A stage is a
`BandStage`. With one session per stage and `batch_bands=false` in one process, they give
the same frames bit for bit as `StreamingPipeline` (the model calls are the same calls).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dwm.conditions.packed import PackedConditions
from dwm.pipelines.fifo import Band, Entry, LatentFrame, Phase, QueueFront, QueueSchedule
from dwm.pipelines.guidance import FrameContexts, GuidedStep, UnconditionalContexts
from dwm.pipelines.streaming import ModelParts, decode_views, frame_contexts, run_shifts


def enter_conditions(front: QueueFront, conditions: PackedConditions) -> Entry:
    """A session's new conditions at its queue's front: the frame for stage `entry.band`,
    carrying the conditions with the captions of the latest text refresh."""
    front.refresh_text(conditions.captions)
    return front.enter(replace(conditions, captions=list(front.text)))


def handed_bytes(frame: LatentFrame) -> int:
    """Bytes of tensor and array data a frame handed between stages carries (its latent and
    its `PackedConditions`)."""
    return frame.latent.numel() * frame.latent.element_size() + frame.payload.nbytes


class _SessionBand:
    """One session's band on a stage, in the form `run_shifts` takes."""

    def __init__(self, model: ModelParts, window: int, guidance: float, device: torch.device):
        self.denoiser = model.denoiser
        self.step = GuidedStep(model.denoiser, guidance)
        self.batch_bands = True  # a stage's shift holds one band
        self.band = Band(window, device)


class BandStage:
    """Band `band` of B of every session's queue, with the model, on one device.

    schedule: the queues'; guidance, resolution: as `StreamingPipeline`'s; device, dtype: of
    the model here (the bands' latents are float32, see `dwm.pipelines.fifo`).
    batch_sessions: every session's window of a step in one model call (true), or one call
    each (false: bit for bit the calls of one session alone).
    """

    def __init__(self, model: ModelParts, band: int, schedule: QueueSchedule, *, guidance: float = 4.0,
                 resolution=(176, 304), device="cpu", dtype: torch.dtype = torch.float32,
                 batch_sessions: bool = True):
        if not 0 <= band < schedule.bands:
            raise ValueError(f"band {band} of {schedule.bands}: must be in [0, {schedule.bands})")
        self.model, self.band, self.schedule, self.guidance = model, band, schedule, guidance
        self.resolution = tuple(int(n) for n in resolution)
        self.device, self.dtype, self.batch_sessions = torch.device(device), dtype, batch_sessions
        self.unconditional = UnconditionalContexts(model.denoiser, model.text_encoder) if guidance != 1.0 else None
        self.sessions: dict[str, _SessionBand] = {}

    @property
    def last(self) -> bool:
        return self.band == self.schedule.bands - 1

    def open(self, session_id: str) -> None:
        self.sessions[session_id] = _SessionBand(self.model, self.schedule.window, self.guidance, self.device)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    @torch.inference_mode()
    def _with_contexts(self, frame: LatentFrame) -> LatentFrame:
        """The frame with its contexts on this device, built once as it enters the band."""
        conditions: PackedConditions = frame.payload
        text = self.model.text_encoder.encode(list(conditions.captions))
        cond, uncond = frame_contexts(
            self.model.denoiser, self.unconditional, conditions.unpack(), text,
            self.resolution, self.device, self.dtype,
        )
        return LatentFrame(frame.latent, frame.index, FrameContexts(cond, uncond, conditions))

    @torch.inference_mode()
    def round(self, entering: dict[str, LatentFrame], phases: dict[str, Phase]) -> dict[str, LatentFrame | torch.Tensor]:
        """One round: take in `entering` (session -> frame), advance every session whose phase
        is WARM_UP (N steps, this band's delays) or RUN (s steps), and hand each of those on.

        Returns session -> the frame for the next stage (latent on the CPU), or, from the
        last stage, the leaving frame's decoded views (V, 3, H, W) float32 in [0, 1] on the
        CPU. Unknown sessions are refused by name.
        """
        unknown = sorted((set(entering) | set(phases)) - set(self.sessions))
        if unknown:
            raise KeyError(f"stage {self.band} holds no queue for sessions {unknown}; open them first")
        for session_id, frame in entering.items():
            self.sessions[session_id].band.receive(self._with_contexts(frame))
        shifts = []
        for session_id, phase in phases.items():
            owner = self.sessions[session_id]
            shift = self.schedule.shift_for(phase, [owner.band], self.band)
            if shift is not None:
                shifts.append((session_id, owner, shift))
        if self.batch_sessions:
            run_shifts([(owner, shift) for _, owner, shift in shifts])
        else:
            for _, owner, shift in shifts:
                run_shifts([(owner, shift)])
        out: dict[str, LatentFrame | torch.Tensor] = {}
        for session_id, owner, shift in shifts:
            shift.finish()
            frame = owner.band.hand_over()
            if self.last:
                out[session_id] = decode_views(self.model.decoder, self.schedule.leaving(frame))
            else:
                # A copy: a view would carry its whole band's storage across processes.
                out[session_id] = LatentFrame(frame.latent.to("cpu", copy=True), frame.index, frame.payload.conditions)
        return out
