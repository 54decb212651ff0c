"""The streaming pipeline of one driving session: condition frames in, decoded views out.

It wires the model components (text encoder, denoiser, decoder) to a `BandedFifoQueue` and
owns no weights. Per frame, once: the caption embeddings (refreshed every `text_interval`
frames, as the reference does), the denoiser's frame context (layout adapter features,
prompt tokens, camera embedding) and the unconditional context (cached per rig). Per step:
only the batched denoiser call and the Euler update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from omegaconf import DictConfig

from dwm.conditions.frame import ConditionFrame
from dwm.config import ConfigError, instantiate
from dwm.models.base import Denoiser, FrameContext, LatentDecoder, TextEmbedding, TextEncoder
from dwm.pipelines.fifo import BandedFifoQueue, ProgressCallback
from dwm.pipelines.guidance import GuidedStep, UnconditionalContexts

LATENT_SCALE = 8  # VAE downsampling: latent (h, w) = image (H/8, W/8)


@dataclass
class GeneratedFrame:
    """One generated multi-view frame.

    images: (V, 3, H, W) float32 in [0, 1] on the CPU, at `pipeline.resolution`.
    conditions: the frame's conditions (its `sim_time` is the time the frame shows).
    index: 0 for the first frame out of the queue, then 1, 2, ...
    pushed: conditions pushed so far when the frame left (index + queue depth + 1).
    """

    images: torch.Tensor
    conditions: ConditionFrame
    index: int
    pushed: int


class QueuedFrame(NamedTuple):
    """A queue payload: the frame's contexts (read by `GuidedStep` as payload[0] and [1]) and
    its conditions, which come back with the finished latent."""

    cond: FrameContext
    uncond: FrameContext | None
    frame: ConditionFrame


class ModelParts(NamedTuple):
    """The model components a pipeline runs; built once and shared by driving sessions."""

    denoiser: Denoiser
    text_encoder: TextEncoder
    decoder: LatentDecoder


def _dtype(name: str) -> torch.dtype:
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in allowed:
        raise ConfigError(f"model.dtype={name}: allowed {', '.join(allowed)}")
    return allowed[name]


class StreamingPipeline:
    """The denoising queue of one session with the model around it.

    steps, window, bands: the queue (N, T, B); guidance: CFG scale (1.0 turns it off);
    resolution: (H, W) of condition images and decoded views; text_interval: frames between
    caption encodings; seed: the queue's noise; device, dtype: of the denoiser.
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
        text_interval: int = 4,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        height, width = (int(n) for n in resolution)
        if height % LATENT_SCALE or width % LATENT_SCALE:
            raise ValueError(f"pipeline.resolution={[height, width]} must be multiples of {LATENT_SCALE}")
        if text_interval < 1:
            raise ValueError(f"pipeline.text_interval={text_interval} must be >= 1")
        self.denoiser, self.text_encoder, self.decoder = denoiser, text_encoder, decoder
        self.resolution = (height, width)
        self.device, self.dtype = torch.device(device), dtype
        self.text_interval = text_interval
        frame_shape = (views, denoiser.latent_channels, height // LATENT_SCALE, width // LATENT_SCALE)
        self.queue = BandedFifoQueue(
            steps, window, bands, frame_shape, shift=shift, train_steps=train_steps,
            seed=seed, dtype=dtype, device=self.device,
        )
        self.step = GuidedStep(denoiser, guidance)
        self.unconditional = UnconditionalContexts(denoiser, text_encoder) if self.step.guided else None
        self._text: TextEmbedding | None = None
        self.frames_in = 0
        self.frames_out = 0

    @staticmethod
    def build_model(cfg: DictConfig) -> ModelParts:
        """The model components of `cfg.model` on `cfg.device`; several pipelines (driving
        sessions) can share them, each keeping its own queue."""
        device, dtype = torch.device(cfg.device), _dtype(cfg.model.dtype)
        denoiser = instantiate(cfg, "model.denoiser").to(device=device, dtype=dtype).eval()
        return ModelParts(denoiser, instantiate(cfg, "model.text_encoder"), instantiate(cfg, "model.vae").to(device))

    @classmethod
    def from_config(
        cls, cfg: DictConfig, views: int, model: ModelParts | None = None, seed: int | None = None
    ) -> "StreamingPipeline":
        """The queue of `cfg.pipeline` around the model of `cfg.model` (built here unless
        `model` gives shared components). seed: the queue's noise; default `cfg.seed`."""
        p = cfg.pipeline
        device, dtype = torch.device(cfg.device), _dtype(cfg.model.dtype)
        model = model or cls.build_model(cfg)
        try:
            return cls(
                model.denoiser,
                model.text_encoder,
                model.decoder,
                views=views, steps=p.steps, window=p.window, bands=p.bands,
                guidance=p.guidance, shift=p.shift, train_steps=p.train_steps,
                resolution=tuple(p.resolution), text_interval=p.text_interval,
                seed=cfg.seed if seed is None else seed, device=device, dtype=dtype,
            )
        except ValueError as err:
            raise ConfigError(f"pipeline: {err}") from None

    @property
    def warming(self) -> bool:
        return self.queue.warming

    @property
    def depth(self) -> int:
        """Frames between a frame's conditions entering and its picture leaving (L - 1)."""
        return self.queue.length - 1

    def _text_embedding(self, captions: list[str]) -> TextEmbedding:
        # The reference re-encodes captions every `text_interval` frames and reuses the
        # latest embeddings in between.
        if self._text is None or self.frames_in % self.text_interval == 0:
            self._text = self.text_encoder.encode(captions)
        return self._text

    @torch.inference_mode()
    def push(self, frame: ConditionFrame, on_step: ProgressCallback | None = None) -> list[GeneratedFrame]:
        """Add a frame's conditions; returns the frames that leave the queue (zero or one)."""
        layout = frame.layout.to(self.device, self.dtype)
        camera = frame.camera_params.to(self.device, self.dtype)
        text = self._text_embedding(frame.captions)
        cond = self.denoiser.frame_context(layout, camera, text)
        uncond = self.unconditional(camera, self.resolution) if self.unconditional else None
        self.frames_in += 1
        leaving = self.queue.push(QueuedFrame(cond, uncond, frame), self.step, on_step)
        if leaving is None:
            return []
        images = self.decoder.decode(leaving.latent.float()).float().cpu()
        out = GeneratedFrame(images, leaving.payload.frame, self.frames_out, self.frames_in)
        self.frames_out += 1
        return [out]

    def reset(self) -> None:
        """Empty the queue (a new stream); the next frames warm it up again."""
        self.queue.reset()
        self._text = None
        self.frames_in = self.frames_out = 0

