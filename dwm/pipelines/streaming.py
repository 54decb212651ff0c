"""The streaming pipeline of one driving session: condition frames in, decoded views out.

It wires the model components (text encoder, denoiser, decoder) to a `BandedFifoQueue` and
owns no weights. Per frame, once: the caption embeddings (refreshed every `text_interval`
frames, as the reference does), the denoiser's frame context (layout adapter features,
prompt tokens, camera embedding) and the unconditional context (cached per rig). Per step:
only the batched denoiser call and the Euler update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from omegaconf import DictConfig

from dwm.conditions.frame import ConditionFrame
from dwm.config import ConfigError, instantiate
from dwm.models.base import Denoiser, FrameContext, LatentDecoder, TextEmbedding, TextEncoder
from dwm.models.checkpoint import build_denoiser
from dwm.pipelines.decode import FrameDecoder
from dwm.pipelines.fifo import BandedFifoQueue, ProgressCallback, Shift
from dwm.pipelines.guidance import FrameContexts, GuidedStep, UnconditionalContexts

LATENT_SCALE = 8  # VAE downsampling: latent (h, w) = image (H/8, W/8)


@dataclass
class GeneratedFrame:
    """One generated multi-view frame.

    images: (V, h, w, 3) uint8 RGB on the CPU, at `pipeline.output_size` (see
        `dwm.pipelines.decode`).
    conditions: the frame's conditions (its `sim_time` is the time the frame shows).
    index: 0 for the first frame out of the queue, then 1, 2, ...
    pushed: conditions pushed so far when the frame left (index + queue depth + 1).
    control_seq: the sequence number of the newest control the world held when the frame's
        conditions were observed (a session's `controls_applied`; 0: none, or no session).
    """

    images: torch.Tensor
    conditions: ConditionFrame
    index: int
    pushed: int
    control_seq: int = 0


class ModelParts(NamedTuple):
    """The model components a pipeline runs; built once and shared by driving sessions."""

    denoiser: Denoiser
    text_encoder: TextEncoder
    decoder: LatentDecoder


def frame_shape(views: int, latent_channels: int, resolution: Sequence[int]) -> tuple[int, int, int, int]:
    """(V, C, h, w) of one latent frame at the image resolution (H, W)."""
    height, width = (int(n) for n in resolution)
    return (views, latent_channels, height // LATENT_SCALE, width // LATENT_SCALE)


def build_text_encoder(cfg: DictConfig) -> TextEncoder:
    """The text encoder of `cfg.model.text_encoder` (it places itself; it caches by caption)."""
    return instantiate(cfg, "model.text_encoder")


def build_decoder(cfg: DictConfig) -> LatentDecoder:
    """The latent decoder of `cfg.model.vae`, on `cfg.device`, in `cfg.model.vae_dtype`."""
    device = torch.device(cfg.device)
    name = cfg.model.get("vae_dtype", "auto")
    if name == "auto":  # half on a GPU; float32 on a CPU, where half is slow
        name = "float16" if device.type == "cuda" else "float32"
    return instantiate(cfg, "model.vae").to(device, _dtype(name, "model.vae_dtype"))


def _dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in allowed:
        extra = ", auto" if key == "model.vae_dtype" else ""
        raise ConfigError(f"{key}={name}: allowed {', '.join(allowed)}{extra}")
    return allowed[name]


def model_dtype(cfg: DictConfig) -> torch.dtype:
    """The torch dtype `cfg.model.dtype` names."""
    return _dtype(cfg.model.dtype)


def frame_contexts(
    denoiser: Denoiser,
    unconditional: UnconditionalContexts | None,
    frame: ConditionFrame,
    text: TextEmbedding,
    resolution: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[FrameContext, FrameContext | None]:
    """A frame's conditional context (layout features, prompt and camera embeddings) and its
    unconditional one (None without guidance), on `device` in `dtype`: the per-frame work,
    done once in the frame's life on the device that steps it. The camera scalars (V, 11)
    stay float32 into the model's sinusoidal embedding: in bfloat16 tx = 1.524 m would
    become 1.5234 m, and the fps and intrinsics ratios would move likewise."""
    return frame_contexts_many(denoiser, [(unconditional, frame, text)], resolution, device, dtype)[0]


def frame_contexts_many(
    denoiser: Denoiser,
    frames: Sequence[tuple[UnconditionalContexts | None, ConditionFrame, TextEmbedding]],
    resolution: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> list[tuple[FrameContext, FrameContext | None]]:
    """`frame_contexts` of several frames (sessions) in one `frame_context` call: their V_i
    views stacked, (sum V_i, ...), and split back (views are independent in it). Each item:
    the frame's unconditional contexts (its session's cache, or None), the frame, its text."""
    views = [frame.layout.shape[0] for _, frame, _ in frames]
    layout = torch.cat([frame.layout for _, frame, _ in frames]).to(device, dtype)
    camera = torch.cat([frame.camera_params for _, frame, _ in frames]).to(device, torch.float32)
    text = TextEmbedding(torch.cat([t.tokens for _, _, t in frames]), torch.cat([t.pooled for _, _, t in frames]))
    stacked = denoiser.frame_context(layout, camera, text)
    parts = {key: value.split(views) for key, value in stacked.items()}
    # The unconditional contexts from the frames' own camera scalars (on the host where the
    # frame is: its cache key is then read without waiting for the device).
    return [
        ({key: parts[key][i] for key in parts},
         uncond(frame.camera_params.to(torch.float32), resolution) if uncond else None)
        for i, (uncond, frame, _) in enumerate(frames)
    ]


class StreamingPipeline:
    """The denoising queue of one session with the model around it.

    steps, window, bands: the queue (N, T, B); guidance: CFG scale (1.0 turns it off);
    resolution: (H, W) of condition images and decoded views; output_size: (h, w) of the
    published views (`GeneratedFrame.images`); text_interval: frames between
    caption encodings; seed: the queue's noise; device, dtype: of the denoiser (the queue's
    latents are float32 whatever it is, see `dwm.pipelines.fifo`). batch_bands:
    the B windows of a shift in one model call (true), or one call per band (false: the
    calls a pipeline with one band per GPU makes, and bit for bit its frames).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        text_encoder: TextEncoder,
        decoder: LatentDecoder,
        *,
        views: int,
        steps: int = 24,
        window: int = 6,
        bands: int = 1,
        guidance: float = 4.0,
        shift: float = 3.0,
        train_steps: int = 1000,
        resolution: tuple[int, int] = (176, 304),
        output_size: tuple[int, int] | None = None,
        text_interval: int = 4,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_bands: bool = True,
    ):
        height, width = (int(n) for n in resolution)
        if height % LATENT_SCALE or width % LATENT_SCALE:
            raise ValueError(f"pipeline.resolution={[height, width]} must be multiples of {LATENT_SCALE}")
        self.denoiser, self.text_encoder, self.decoder = denoiser, text_encoder, decoder
        self.resolution = (height, width)
        self.frames = FrameDecoder(decoder, output_size or self.resolution)
        self.device, self.dtype = torch.device(device), dtype
        self.queue = BandedFifoQueue(
            steps, window, bands, frame_shape(views, denoiser.latent_channels, self.resolution),
            shift=shift, train_steps=train_steps, seed=seed, device=self.device, text_interval=text_interval,
        )
        self.batch_bands = bool(batch_bands)
        self.step = GuidedStep(denoiser, guidance)
        self.unconditional = UnconditionalContexts(denoiser, text_encoder) if self.step.guided else None
        self._text: TextEmbedding | None = None  # the embedding of `queue.front.text`
        self.frames_out = 0

    @staticmethod
    def build_model(cfg: DictConfig) -> ModelParts:
        """The model components of `cfg.model` on `cfg.device`; several pipelines (driving
        sessions) can share them, each keeping its own queue."""
        return ModelParts(build_denoiser(cfg, torch.device(cfg.device), model_dtype(cfg)),
                          build_text_encoder(cfg), build_decoder(cfg))

    @classmethod
    def from_config(
        cls, cfg: DictConfig, views: int, model: ModelParts | None = None, seed: int | None = None
    ) -> "StreamingPipeline":
        """The queue of `cfg.pipeline` around the model of `cfg.model` (built here unless
        `model` gives shared components). seed: the queue's noise; default `cfg.seed`."""
        p = cfg.pipeline  # its values checked when composed (dwm.settings)
        device, dtype = torch.device(cfg.device), model_dtype(cfg)
        model = model or cls.build_model(cfg)
        try:
            return cls(
                model.denoiser,
                model.text_encoder,
                model.decoder,
                views=views, steps=p.steps, window=p.window, bands=p.bands,
                guidance=p.guidance, shift=p.shift, train_steps=p.train_steps,
                resolution=tuple(p.resolution), output_size=tuple(p.output_size), text_interval=p.text_interval,
                seed=cfg.seed if seed is None else seed, device=device, dtype=dtype,
                batch_bands=p.batch_bands,
            )
        except ValueError as err:
            raise ConfigError(f"pipeline: {err}") from None

    @property
    def warming(self) -> bool:
        return self.queue.warming

    @property
    def depth(self) -> int:
        """Frames between a frame's conditions entering and its picture leaving (L - 1)."""
        return self.queue.schedule.depth

    @property
    def frames_in(self) -> int:
        """Condition frames pushed since the stream began."""
        return self.queue.front.pushed

    def push(self, frame: ConditionFrame, on_step: ProgressCallback | None = None) -> list[GeneratedFrame]:
        """Add a frame's conditions; returns the frames that leave the queue (zero or one)."""
        return push_many([(self, frame)], on_step)[0]

    def _begin(self, frame: ConditionFrame) -> Shift:
        """The per-frame work of a push (text, frame contexts) and the queue's shift to run."""
        cond, uncond = frame_contexts(
            self.denoiser, self.unconditional, frame, self._text_for(frame), self.resolution, self.device, self.dtype
        )
        return self.queue.begin_push(FrameContexts(cond, uncond, frame))

    def _text_for(self, frame: ConditionFrame) -> TextEmbedding:
        """The caption embedding the frame is generated with (re-encoded every text_interval)."""
        front = self.queue.front
        if front.refresh_text(frame.captions):
            self._text = self.text_encoder.encode(list(front.text))
        return self._text

    def _generated(self, images: torch.Tensor, frame: ConditionFrame) -> GeneratedFrame:
        out = GeneratedFrame(images, frame, self.frames_out, self.frames_in)
        self.frames_out += 1
        return out

    def reset(self) -> None:
        """Empty the queue (a new stream); the next frames warm it up again."""
        self.queue.reset()
        self.frames_out = 0


@torch.inference_mode()
def push_many(
    pushes: Sequence[tuple[StreamingPipeline, ConditionFrame]], on_step: ProgressCallback | None = None
) -> list[list[GeneratedFrame]]:
    """Push one frame into each of several queues (driving sessions) and run their model work
    together: per Euler step, one denoiser call on the windows of every queue that still has
    steps in this push. The frames that leave are decoded together where queues share a
    decoder and an output size (one call on a GPU, see `dwm.pipelines.decode`).

    Queues that share a denoiser and a latent frame shape are batched (continuous batching:
    every push of every queue is s steps, a new queue's warm-up included, so a queue joining
    adds rows to the round's calls and never calls of its own; a queue joining or leaving
    changes the batch, never another queue's frames). Returns,
    per push, the frames leaving that queue (zero or one), exactly as `push` one by one would
    up to the rounding of a larger batch. on_step(done, total): after each round of calls.
    """
    pipelines = [pipeline for pipeline, _ in pushes]
    if len({id(p) for p in pipelines}) != len(pipelines):
        raise ValueError("push_many takes at most one frame per queue")
    # The frames' contexts: one frame_context call per model (all its sessions' frames).
    contexts: dict[int, tuple[FrameContext, FrameContext | None]] = {}
    texts = {id(p): p._text_for(frame) for p, frame in pushes}
    for group in _batches(list(pushes), lambda item: (id(item[0].denoiser), item[0].resolution, item[0].device,
                                                      item[0].dtype, item[1].layout.shape[1:])):
        first = group[0][0]
        made = frame_contexts_many(first.denoiser, [(p.unconditional, f, texts[id(p)]) for p, f in group],
                                   first.resolution, first.device, first.dtype)
        contexts.update({id(p): c for (p, _), c in zip(group, made)})
    shifts = [p.queue.begin_push(FrameContexts(*contexts[id(p)], frame)) for p, frame in pushes]
    running = [(p, s) for p, s in zip(pipelines, shifts) if s is not None]
    run_shifts(running, on_step)

    leaving = [(p, frame) for p, s in running if (frame := p.queue.end_push(s)) is not None]
    views: dict[int, torch.Tensor] = {}
    for group in _batches(leaving, lambda item: (id(item[0].decoder), item[0].frames.output_size)):
        decoded = group[0][0].frames([frame.latent for _, frame in group])
        views.update({id(p): images for (p, _), images in zip(group, decoded)})
    out: list[list[GeneratedFrame]] = []
    for pipeline, _ in pushes:
        frame = next((f for p, f in leaving if p is pipeline), None)
        if frame is None:
            out.append([])
            continue
        out.append([pipeline._generated(views[id(pipeline)], frame.payload.conditions)])
    return out


class ShiftOwner(Protocol):
    """What `run_shifts` needs of a shift's owner: its model and guidance, and whether the
    bands of its shift may share one model call (`batch_bands`)."""

    denoiser: Denoiser
    step: GuidedStep
    batch_bands: bool


def run_shifts(items: Sequence[tuple[ShiftOwner, Shift]], on_step: ProgressCallback | None = None) -> None:
    """Run every shift to its last step, one denoiser call per step for all the shifts whose
    owners share a denoiser, a latent frame shape and dtype, and batch their bands (the others
    make one call per band: the calls a pipeline of one band per GPU makes).
    on_step(done, total): after each round of calls."""
    total = max((s.steps for _, s in items), default=0)
    contexts: dict[tuple[int, ...], FrameContext] = {}  # concatenated contexts, per batch
    for done in range(total):
        active = [(p, s) for p, s in items if s.done < s.steps]
        for group in _batches(active, _batch_key):
            _step_together(group, contexts)
        if on_step is not None:
            on_step(done + 1, total)


def _batch_key(item: tuple[ShiftOwner, Shift]) -> tuple:
    owner, shift = item
    alone = None if owner.batch_bands else id(owner)  # per-band calls never join a batch
    return id(owner.denoiser), shift.latents.shape[1:], shift.latents.dtype, alone


def _batches(items: list, key) -> list[list]:
    """`items` grouped by `key`, groups in order of first appearance."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def _step_together(group: list[tuple[StreamingPipeline, Shift]], contexts: dict) -> None:
    """One Euler step of every shift in `group` (same denoiser) through one denoiser call.

    Each queue's guidance turns its windows (B, T, V, C, h, w) into its batch rows (2B or B);
    the rows of all queues are concatenated along the first axis, the contexts too (once per
    set of queues: they do not change during a push), and the output is split back."""
    inputs = [p.step.inputs(s.latents, s.timesteps[s.done], s.grid) for p, s in group]
    denoiser = group[0][0].denoiser
    if len(group) == 1 and not group[0][0].batch_bands:
        outputs = [_per_band(denoiser, group[0][0].step.guided, *inputs[0])]
    elif len(group) == 1:
        outputs = [denoiser(*inputs[0])]
    else:
        key = tuple(id(s) for _, s in group)
        if key not in contexts:
            contexts[key] = {name: torch.cat([c[name] for _, _, c in inputs]) for name in inputs[0][2]}
        rows = [x.shape[0] for x, _, _ in inputs]
        batched = denoiser(torch.cat([x for x, _, _ in inputs]), torch.cat([t for _, t, _ in inputs]), contexts[key])
        outputs = batched.split(rows)
    for (p, s), output in zip(group, outputs):
        s.apply(p.step.combine(output))


def _per_band(denoiser: Denoiser, guided: bool, x: torch.Tensor, t: torch.Tensor, context: FrameContext) -> torch.Tensor:
    """One denoiser call per band of a shift's batch: x (2B or B, T, V, C, h, w) with the
    unconditional rows first when guided, so band b is rows [b, B + b] (or [b])."""
    bands = x.shape[0] // 2 if guided else x.shape[0]
    out = torch.empty_like(x)
    for b in range(bands):
        rows = [b, bands + b] if guided else [b]
        out[rows] = denoiser(x[rows], t[rows], {k: v[rows] for k, v in context.items()})
    return out
