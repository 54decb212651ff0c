"""The banded queue split across devices: one band of every session's queue per stage.

A session's queue of B bands can be cut into B stages, each holding band b of every session
on its own device (a GPU of a denoiser pipeline). A round (one frame per session) is, on
every stage at once: `step` (take in the frames entering from the session's front, advance
the bands, hand each session's cleanest frame out), then `take` (the frames stage b-1 handed
out in this round join band b, for the next round). So a stage waits only for its neighbour's
hand-over, never for a round-wide barrier; the last stage's cleanest frame leaves, decoded.

Lean stages: a stage holds the denoiser and its bands, and the decoder only where frames
leave (the last stage). Text is encoded once, at the session's front (`SessionFront`, with
the encoder's prompt cache), and each frame carries its caption embedding with its compact
conditions (`FrameInputs`); a stage builds the frame's contexts from them once, as the frame
enters its band, and keeps them for all of that frame's steps there. The unconditional
contexts need only the empty caption's embedding, which a session brings when it opens.

With one session per stage and `batch_bands=false` in one process, they give the same
frames bit for bit as `StreamingPipeline` (the model calls are the same calls).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from dwm.conditions.packed import PackedConditions
from dwm.models.base import Denoiser, LatentDecoder, TextEmbedding, TextEncoder
from dwm.pipelines.fifo import Band, Entry, LatentFrame, QueueFront, QueueSchedule
from dwm.pipelines.guidance import FrameContexts, GuidedStep, UnconditionalContexts
from dwm.pipelines.decode import FrameDecoder
from dwm.pipelines.streaming import frame_contexts, run_shifts


class FrameInputs(NamedTuple):
    """What a frame's contexts are made from, as it travels between stages: its compact
    conditions (captions those of the latest text refresh) and their embedding (V prompts),
    version `text_version` of its session's captions. The embedding travels only to a stage
    that has not had that version from the same sender (None otherwise): at the released size
    it is about 8 MB (3 x 333 x 4096 in half precision), fifty latents."""

    conditions: PackedConditions
    text: TextEmbedding | None
    text_version: int


class SessionFront:
    """A session's side of a staged queue: its `QueueFront` and the text encoder.

    `enter` gives each new frame its noise and its slot (`QueueFront.enter`), with the
    embedding of the captions of the latest refresh (every `text_interval` frames, encoded
    here once; the encoder caches by caption)."""

    def __init__(self, front: QueueFront, text_encoder: TextEncoder, views: int):
        self.front, self.text_encoder = front, text_encoder
        self.text: TextEmbedding | None = None
        self.version = -1  # of the captions in `text`; a refresh to other captions makes a new one
        self.sent: dict[int, int] = {}  # band -> the version last sent into it from here
        self.empty_text = text_encoder.encode([""] * views)  # the unconditional captions

    def enter(self, conditions: PackedConditions) -> tuple[int, list[Entry]]:
        """The push number of this frame and its entries (the first push's fill all slots)."""
        front = self.front
        before, pushed = front.text, front.pushed
        if front.refresh_text(conditions.captions) and front.text != before:
            self.text, self.version = self.text_encoder.encode(list(front.text)), self.version + 1
        entries = front.enter(FrameInputs(replace(conditions, captions=list(front.text)), None, self.version))
        for entry in entries:
            if entry.frame.payload is not None:  # the new frame, not a slot's noise
                if self.sent.get(entry.band) != self.version:
                    self.sent[entry.band] = self.version
                    entry.frame.payload = entry.frame.payload._replace(text=self.text)
        return pushed, entries


class KnownPrompts(TextEncoder):
    """A stage's text "encoder": the embeddings of the prompts it was given, by prompt.

    Stages encode nothing; the unconditional contexts look the empty caption up here."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def learn(self, prompts: list[str], text: TextEmbedding) -> None:
        for i, prompt in enumerate(prompts):
            self._rows.setdefault(prompt, (text.tokens[i], text.pooled[i]))

    def encode(self, prompts: list[str]) -> TextEmbedding:
        unknown = sorted(set(prompts) - set(self._rows))
        if unknown:
            raise KeyError(f"no embedding was given to this stage for prompts {unknown}")
        return TextEmbedding(
            tokens=torch.stack([self._rows[p][0] for p in prompts]),
            pooled=torch.stack([self._rows[p][1] for p in prompts]),
        )


def handed_bytes(frame: LatentFrame) -> int:
    """Bytes of tensor and array data a frame handed between stages carries: its latent, its
    caption embedding and its `PackedConditions`."""
    inputs: FrameInputs | None = frame.payload
    if inputs is None:  # the noise of a slot whose frame comes later
        return frame.latent.numel() * frame.latent.element_size()
    text = inputs.text.nbytes if inputs.text is not None else 0
    return frame.latent.numel() * frame.latent.element_size() + text + inputs.conditions.nbytes


class _SessionBand:
    """One session's band on a stage, in the form `run_shifts` takes."""

    def __init__(self, denoiser: Denoiser, window: int, guidance: float, device: torch.device):
        self.denoiser = denoiser
        self.step = GuidedStep(denoiser, guidance)
        self.batch_bands = True  # a stage's shift holds one band
        self.band = Band(window, device)
        self.texts: dict[int, TextEmbedding] = {}  # caption versions received, on this device
        self.sent_version = -1  # the version last handed to the next stage with its embedding


class BandStage:
    """Band `band` of B of every session's queue, with the denoiser, on one device.

    decoder: where frames leave (the last stage), None elsewhere. schedule: the queues';
    guidance, resolution, output_size: as `StreamingPipeline`'s; device, dtype: of the model here (the
    bands' latents are float32, see `dwm.pipelines.fifo`). batch_sessions: every session's
    window of a step in one model call (true), or one call each (false: bit for bit the
    calls of one session alone). keep_on_device: frames handed out keep their tensors on this
    device (for a device-to-device transport); otherwise they are copied to the CPU.
    """

    def __init__(self, denoiser: Denoiser, decoder: LatentDecoder | None, band: int, schedule: QueueSchedule, *,
                 guidance: float = 4.0, resolution=(176, 304), output_size=None, device="cpu",
                 dtype: torch.dtype = torch.float32,
                 batch_sessions: bool = True, keep_on_device: bool = False):
        if not 0 <= band < schedule.bands:
            raise ValueError(f"band {band} of {schedule.bands}: must be in [0, {schedule.bands})")
        self.denoiser, self.band, self.schedule, self.guidance = denoiser, band, schedule, guidance
        if self.last and decoder is None:
            raise ValueError(f"stage {band} is the last of {schedule.bands}: it decodes, so it needs the decoder")
        self.decoder = decoder if self.last else None
        self.resolution = tuple(int(n) for n in resolution)
        self.frames = FrameDecoder(decoder, output_size or self.resolution) if self.last else None
        self.device, self.dtype, self.batch_sessions = torch.device(device), dtype, batch_sessions
        self.keep_on_device = keep_on_device
        self.prompts = KnownPrompts()
        self.unconditional = UnconditionalContexts(denoiser, self.prompts) if guidance != 1.0 else None
        self.sessions: dict[str, _SessionBand] = {}

    @property
    def last(self) -> bool:
        return self.band == self.schedule.bands - 1

    def open(self, session_id: str, empty_text: TextEmbedding) -> None:
        """A new session's band; empty_text: the embedding of its V empty captions."""
        self.prompts.learn([""] * empty_text.tokens.shape[0], empty_text)
        self.sessions[session_id] = _SessionBand(self.denoiser, self.schedule.window, self.guidance, self.device)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def _check(self, session_ids) -> None:
        unknown = sorted(set(session_ids) - set(self.sessions))
        if unknown:
            raise KeyError(f"stage {self.band} holds no queue for sessions {unknown}; open them first")

    @torch.inference_mode()
    def _receive(self, session_id: str, frame: LatentFrame, position: int | None = None) -> None:
        """The frame joins the session's band (appended, or into the slot at `position`
        that holds its noise), with its contexts on this device, built once."""
        inputs: FrameInputs | None = frame.payload
        owner = self.sessions[session_id]
        if inputs is None:  # a slot's noise, its frame to come
            owner.band.receive(frame)
            return
        if inputs.text is not None:
            owner.texts[inputs.text_version] = TextEmbedding(
                inputs.text.tokens.to(self.device), inputs.text.pooled.to(self.device))
        if inputs.text_version not in owner.texts:
            raise RuntimeError(f"stage {self.band}: session {session_id}'s captions version "
                               f"{inputs.text_version} came without its embedding")
        text = owner.texts[inputs.text_version]
        for version in [v for v in owner.texts if v < inputs.text_version]:
            del owner.texts[version]  # frames arrive in order: no older version comes again
        cond, uncond = frame_contexts(
            self.denoiser, self.unconditional, inputs.conditions.unpack(self.device), text,
            self.resolution, self.device, self.dtype,
        )
        contexts = FrameContexts(cond, uncond, inputs._replace(text=text))
        frame = LatentFrame(frame.latent, frame.index, contexts)
        owner.band.receive(frame) if position is None else owner.band.place(position, frame)

    def take(self, handed: dict[str, LatentFrame]) -> None:
        """The frames the previous stage handed out this round join their sessions' bands."""
        self._check(handed)
        for session_id, frame in handed.items():
            self._receive(session_id, frame)

    @torch.inference_mode()
    def step(self, entering: dict[str, list[Entry]], pushes: dict[str, int]) -> dict[str, LatentFrame | torch.Tensor]:
        """A round's work: take in `entering` (session -> this band's entries from its front),
        advance every session of `pushes` (session -> the number of its push, 0 for a new
        stream) s steps, and hand each session's cleanest frame out once its queue does.

        Returns session -> the frame for the next stage (`FrameInputs` payload), or, from the
        last stage, the leaving frame's views (V, h, w, 3) uint8 on the CPU at the output size
        (all sessions' decoded together, see `dwm.pipelines.decode`). Unknown sessions are
        refused by name.
        """
        self._check(set(entering) | set(pushes))
        for session_id, entries in entering.items():
            for entry in entries:
                self._receive(session_id, entry.frame, entry.position)
        shifts = []
        for session_id, pushed in pushes.items():
            owner = self.sessions[session_id]
            shift = self.schedule.shift_for(pushed, [owner.band], self.band)
            if shift is not None:
                shifts.append((session_id, owner, shift, self.schedule.hands_over(pushed)))
        if self.batch_sessions:
            run_shifts([(owner, shift) for _, owner, shift, _ in shifts])
        else:
            for _, owner, shift, _ in shifts:
                run_shifts([(owner, shift)])
        out: dict[str, LatentFrame | torch.Tensor] = {}
        leaving: dict[str, torch.Tensor] = {}
        for session_id, owner, shift, hands_over in shifts:
            shift.finish()
            if not hands_over:
                continue
            frame = owner.band.hand_over()
            if self.last:
                leaving[session_id] = self.schedule.leaving(frame).latent
                continue
            inputs: FrameInputs = frame.payload.conditions
            text = None  # the next stage has this version's embedding already
            if inputs.text_version != owner.sent_version:
                owner.sent_version, text = inputs.text_version, inputs.text
                if not self.keep_on_device:
                    text = TextEmbedding(text.tokens.cpu(), text.pooled.cpu())
            # A copy: a view would keep (and carry) its whole band's storage.
            latent = frame.latent.clone() if self.keep_on_device else frame.latent.to("cpu", copy=True)
            out[session_id] = LatentFrame(latent, frame.index, inputs._replace(text=text))
        if leaving:
            out.update(zip(leaving, self.frames(list(leaving.values()))))
        return out
