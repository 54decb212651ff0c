"""`python -m dwm.train [overrides]`: train the demo model on the embedded world's pictures.

Two stages, in order, each resumable from its checkpoint in `train.out`:
1. `vae`: the SD3-shaped VAE of `model.vae` learns to reconstruct the world's camera pictures
   (16 latent channels, SD3's scaling and shift);
2. `denoiser`: the `model.denoiser` (CrossviewTemporalDiT) learns the flow-matching velocity on
   the VAE's latents of T-frame windows, each frame at its own noise level, with the layouts,
   camera scalars and captions the pipeline gives it; some windows without conditions. The
   windows are rendered and encoded once (`train.denoiser.windows_kept`, kept in
   `windows.pt`) and drawn from at random.
Then `train.out` holds `vae.safetensors` and `denoiser.safetensors`, strict state dicts that
`model=demo model.checkpoint=... model.vae.checkpoint=...` loads (or copy them to
dwm/models/demo/ to ship them), and a loss curve per stage (`*_loss.png`).

Overrides as everywhere (`train.denoiser.steps=200`, `model.denoiser.num_layers=4`); the
architecture is `model=demo`'s unless another model is named.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dwm.config import ConfigError, compose, instantiate
from dwm.models.checkpoint import build_denoiser, save_state_dict
from dwm.train.curve import plot_losses
from dwm.train.dataset import WindowSet
from dwm.train.objectives import flow_matching_loss, sample_sigmas, to_latents, vae_loss, window_contexts
from dwm.train.scenes import SceneWindows

log = logging.getLogger("dwm.train")


def training_config(overrides: list[str]) -> DictConfig:
    """The composed config: `train/default`, the demo architecture unless a model is named,
    then the user's overrides; the model built from scratch (no checkpoint is read)."""
    named = any(o.split("=", 1)[0].lstrip("+~") == "model" for o in overrides)
    cfg = compose(["+train=default", *([] if named else ["model=demo"]), *overrides])
    cfg.model.checkpoint = None
    cfg.model.random_weights = True
    if "checkpoint" in cfg.model.vae:
        cfg.model.vae.checkpoint = None
    return cfg


class Stage:
    """One stage's optimisation, checkpointed every `every` steps to `out/{name}.pt` (model,
    optimiser, step, losses) and resumed from there; its loss curve in `out/{name}_loss.png`."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float, warmup: int, out: Path, every: int):
        self.name, self.model, self.out, self.every = name, model, out, every
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
        self.step, self.losses = 0, []
        self.path = out / f"{name}.pt"
        if self.path.is_file():
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.step, self.losses = int(state["step"]), list(state["losses"])
            log.info("%s: resumed at step %d from %s", name, self.step, self.path)

    def run(self, steps: int, loss: Callable[[], tuple[torch.Tensor, dict]]) -> None:
        if self.step >= steps:
            log.info("%s: done (%d steps in %s)", self.name, self.step, self.path)
            return
        self.model.train()
        with tqdm(total=steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True) as bar:
            while self.step < steps:
                value, info = loss()
                self.optimizer.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.schedule.step()
                self.step += 1
                self.losses.append(float(value.detach()))
                recent = self.losses[-50:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", **{k: f"{v:.3g}" for k, v in info.items()})
                bar.update()
                if self.step % self.every == 0 or self.step == steps:
                    self.save()
        self.model.eval()

    def save(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "step": self.step, "losses": self.losses}
        partial = self.path.with_suffix(".pt.partial")
        torch.save(state, partial)
        partial.replace(self.path)  # a stop while writing keeps the previous checkpoint
        plot_losses(self.losses, self.out / f"{self.name}_loss.png", f"{self.name} loss ({self.step} steps)")


def train(cfg: DictConfig) -> Path:
    """Both stages; returns the folder holding the exported weights."""
    t = cfg.train
    out = Path(t.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(t.seed))
    windows: Iterator = SceneWindows(cfg, seed=int(t.seed))

    device = torch.device(cfg.device)
    vae = instantiate(cfg, "model.vae").vae.to(device)  # the diffusers AutoencoderKL inside
    vae.requires_grad_(True)

    crops = torch.Generator().manual_seed(int(t.seed) + 2)

    def vae_batch() -> tuple[torch.Tensor, dict]:
        images = torch.cat([next(windows).images.flatten(0, 1) for _ in range(int(t.vae.windows))])
        if t.vae.crop:  # the VAE is convolutional: it learns from crops at a fraction of the cost
            images = random_crops(images, int(t.vae.crop), crops)
        return vae_loss(vae, images.to(device), float(t.vae.kl_weight), float(t.vae.scale_weight))

    Stage("vae", vae, float(t.vae.lr), 50, out, int(t.checkpoint_every)).run(int(t.vae.steps), vae_batch)
    save_state_dict(vae, out / "vae.safetensors")
    vae.requires_grad_(False)

    denoiser = build_denoiser(cfg, device, torch.float32).requires_grad_(True)
    text_encoder = instantiate(cfg, "model.text_encoder")
    p, d = cfg.pipeline, t.denoiser
    generator = torch.Generator().manual_seed(int(t.seed) + 1)

    kept = WindowSet.build(windows, int(d.windows_kept), lambda images: to_latents(vae, images.to(device)).cpu(),
                           out / "windows.pt")

    def denoiser_batch() -> tuple[torch.Tensor, dict]:
        batch, latents = kept.sample(int(d.windows), generator)  # latents (N, T, V, 16, h, w)
        latents = latents.to(device)
        n, frames = latents.shape[:2]
        sigmas = sample_sigmas(n, frames, float(p.shift), float(d.queue_share), generator)
        dropped = (torch.rand(n, generator=generator) < float(d.uncond_share)).tolist()
        context = window_contexts(denoiser, text_encoder, batch, dropped, device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        return flow_matching_loss(denoiser, latents, context, sigmas.to(device), noise), {}

    Stage("denoiser", denoiser, float(d.lr), int(d.warmup), out, int(t.checkpoint_every)).run(
        int(d.steps), denoiser_batch)
    save_state_dict(denoiser, out / "denoiser.safetensors")
    return out


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One size x size crop (a multiple of 8 px from the corner) of each image (B, 3, H, W)."""
    height, width = images.shape[-2:]
    size = min(size, height, width) // 8 * 8
    ys = torch.randint(0, (height - size) // 8 + 1, (len(images),), generator=generator) * 8
    xs = torch.randint(0, (width - size) // 8 + 1, (len(images),), generator=generator) * 8
    return torch.stack([im[:, y: y + size, x: x + size] for im, y, x in zip(images, ys.tolist(), xs.tolist())])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = training_config(list(sys.argv[1:] if argv is None else argv))
        out = train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped: the last checkpoint is kept; run the same command to resume", file=sys.stderr)
        return 130
    print(f"weights in {out}: model=demo model.checkpoint={out / 'denoiser.safetensors'} "
          f"model.vae.checkpoint={out / 'vae.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
