"""Reading a denoiser checkpoint (a flat state dict) and loading it strictly.

The released CTSD 3.5 XS checkpoint is a flat PyTorch state dict whose keys are the module
names of `dwm.models.ctsd.CrossviewTemporalDiT` exactly (no key map is needed). `.pth` / `.pt`
files are read with `weights_only=True` (no code runs from the file) and memory-mapped;
`.safetensors` files with safetensors. Every missing, unexpected or mis-shaped key is named.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dwm.config import ConfigError, instantiate, require_file
from dwm.models.compiled import compile_denoiser

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys do not fit the model."""


@dataclass
class KeyReport:
    """How a state dict's keys and shapes compare with a model's."""

    missing: list[str] = field(default_factory=list)  # the model has them, the file not
    unexpected: list[str] = field(default_factory=list)  # the file has them, the model not
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, model, file)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = []
        if self.missing:
            lines.append(f"{len(self.missing)} missing keys: " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected keys: " + ", ".join(self.unexpected))
        for key, want, got in self.mismatched:
            lines.append(f"{key}: shape {list(got)} in the file, the model has {list(want)}")
        return "\n".join(lines) or "keys and shapes match"


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every key of the model's state dict (parameters and persistent buffers) -> shape;
    works on the meta device, so no memory is needed."""
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def compare(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> KeyReport:
    """Compare a state dict (key -> tensor) with expected shapes (key -> shape)."""
    return KeyReport(
        missing=[k for k in expected if k not in state],
        unexpected=[k for k in state if k not in expected],
        mismatched=[
            (k, expected[k], tuple(v.shape)) for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]
        ],
    )


def progress(items: list, what: str):
    """`items`, with a progress bar on stderr (tqdm): a line now and then in a log, live on a
    terminal. Loading the released checkpoint (about 2 B parameters) takes a while."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(items, desc=what, unit="tensor", mininterval=0.1 if tty else 10.0, ascii=not tty)


def read_state_dict(path: str | Path, key: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """A flat state dict from a .pth/.pt (weights_only) or .safetensors file, on the CPU.
    key: the config key that named the file, for the messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{key}={path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in progress(list(f.keys()), f"reading {path.name}")}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{key}={path}: not a readable safetensors file ({err})") from None
    elif suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # pickle, zip and weights_only refusals
            raise CheckpointError(f"{key}={path}: not a readable PyTorch state dict ({err})") from None
    else:
        allowed = ", ".join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)
        raise CheckpointError(f"{key}={path}: unknown checkpoint type {suffix or '(none)'}; allowed {allowed}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{key}={path}: expected a flat state dict (key -> tensor), got {type(state).__name__}")
    return state


def load_checkpoint(
    model: nn.Module, path: str | Path, dtype: torch.dtype | None = None, key: str = "model.checkpoint"
) -> KeyReport:
    """Load `path` into `model` strictly, casting floating tensors to `dtype`.

    A model built on the meta device takes the file's tensors as its own (no second copy).
    Raises CheckpointError naming every missing, unexpected or mis-shaped key.
    """
    state = read_state_dict(path, key)
    report = compare(model_shapes(model), state)
    if not report.ok:
        raise CheckpointError(f"{key}={path} does not fit the model ({type(model).__name__}):\n{report}")
    if dtype is not None:  # (a .pth is memory-mapped: this is where it is read)
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in progress(list(state.items()), f"loading {Path(path).name} as {dtype}")}
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return report


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """Write the model's state dict as .safetensors or .pth (by the suffix)."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def weights_summary(cfg: DictConfig) -> dict:
    """What a user is shown about the model: {"name", "random_weights", "checkpoint" (the
    file's name, or None)}. Random weights make noise: a viewer must be told, not left to take
    it for a fault."""
    checkpoint = OmegaConf.select(cfg.model, "checkpoint")
    return {"name": str(cfg.model.name), "random_weights": not checkpoint,
            "checkpoint": Path(str(checkpoint)).name if checkpoint else None}


def check_weights(cfg: DictConfig) -> None:
    """Fail early, naming the key, when the files `cfg.model` needs are not set or not there
    (the checkpoint, and the SD3.5 folder where the model reads one); reads nothing."""
    m = cfg.model
    if OmegaConf.select(m, "vae.checkpoint"):
        require_file(cfg, "model.vae.checkpoint")
    if OmegaConf.select(m, "checkpoint"):
        require_file(cfg, "model.checkpoint")
    elif not OmegaConf.select(m, "random_weights", default=False):
        raise ConfigError(_NO_CHECKPOINT.format(name=m.name))
    if "sd35_dir" in m:
        from dwm.models.sd3_text import PARTS, sd35_folder

        vae = () if OmegaConf.select(m, "vae.tiny_dir") else ("vae",)
        sd35_folder(m.sd35_dir, "model.sd35_dir", PARTS + vae)


_NO_CHECKPOINT = (
    "model.checkpoint is not set: model={name} needs its weights, e.g. "
    "model.checkpoint=/path/ctsd_35_xs_df6v3_tirda_bm_nwao_60k.pth (.pth or .safetensors); "
    "model.random_weights=true runs it with random weights instead (benchmarks only)"
)


def build_denoiser(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The denoiser of `cfg.model` on `device` in `dtype`, in eval mode.

    `model.checkpoint` set: built on the meta device (no memory, no random init) and given the
    file's tensors, strictly. Not set: seeded random weights, allowed only where the config
    says so (`model.random_weights`: the tiny model, benchmarks of the real size).
    `model.compile`: compile its repeated blocks, calls padded to buckets of windows
    (`dwm.models.compiled`; the same outputs to rounding, faster after a warm-up);
    `model.compile_mode`, `model.compile_backend`: torch.compile's mode and backend.
    """
    m = cfg.model
    checkpoint = OmegaConf.select(m, "checkpoint")
    if checkpoint:
        path = require_file(cfg, "model.checkpoint")
        with torch.device("meta"):
            denoiser = instantiate(cfg, "model.denoiser")
        try:
            load_checkpoint(denoiser, path, dtype)
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        denoiser = denoiser.to(device)
    elif OmegaConf.select(m, "random_weights", default=False):
        # Small models are built on the CPU (the same weights on every device); large ones
        # where they will run, to spare the host memory of a float32 copy.
        with torch.device(device if OmegaConf.select(m, "init_on_device", default=False) else "cpu"):
            denoiser = instantiate(cfg, "model.denoiser")
        denoiser = denoiser.to(device=device, dtype=dtype)
    else:
        raise ConfigError(_NO_CHECKPOINT.format(name=m.name))
    denoiser.eval().requires_grad_(False)
    log.info("model %s: denoiser of %.2f M parameters in %s on %s, %s", m.name,
             sum(p.numel() for p in denoiser.parameters()) / 1e6, str(dtype).removeprefix("torch."), device,
             f"weights from {Path(str(checkpoint)).name}" if checkpoint else "random weights")
    if OmegaConf.select(m, "compile", default=False):
        mode = OmegaConf.select(m, "compile_mode", default="default")
        try:
            compile_denoiser(denoiser, mode, OmegaConf.select(m, "compile_backend", default="inductor"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return denoiser
