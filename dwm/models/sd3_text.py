"""SD3's text encoders from a local Stable Diffusion 3.5 folder: CLIP-L, CLIP-G and T5-XXL.

The SD3 recipe, as the released model was trained with it, per prompt:
- each CLIP reads the prompt padded to 77 tokens; its penultimate hidden states, (77, 768)
  and (77, 1280), are concatenated to (77, 2048) and zero-padded to T5's width, 4096;
- T5-XXL reads the prompt in 77 tokens: (77, 4096);
- tokens = CLIP rows then T5 rows: (154, 4096); pooled = CLIP-L's and CLIP-G's projected
  text embeddings concatenated: (768 + 1280) = (2048,).
The unconditional half of guidance encodes "" the same way.

Everything is read with `local_files_only`: nothing is fetched. The folder layout is the one
of the SD3.5 repositories: text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer/,
tokenizer_2/, tokenizer_3/.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dwm.config import ConfigError
from dwm.models.text import CachedTextEncoder

PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sd35_folder(path: str | None, key: str, parts: tuple[str, ...]) -> Path:
    """The local SD3.5 folder at `path` (config `key`), checked to hold `parts`."""
    if not path:
        raise ConfigError(
            f"{key} is not set: point it at a local Stable Diffusion 3.5 medium folder "
            f"(with {', '.join(parts)}); nothing is downloaded"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: no such folder; it must be a local Stable Diffusion 3.5 folder")
    missing = [part for part in parts if not (folder / part).is_dir()]
    if missing:
        lacks = ", ".join(f"{part}/" for part in missing)
        raise ConfigError(f"{key}={path}: the folder lacks {lacks} (a Stable Diffusion 3.5 folder has them)")
    return folder


class SD3TextEncoder(CachedTextEncoder):
    """CLIP-L + CLIP-G + T5-XXL from `sd35_dir`, on `device` in `dtype`, with a caption cache.

    max_length: tokens per prompt for each encoder (77, as the reference). load_in_8bit:
    load the three encoders 8-bit with bitsandbytes (as the reference does; needs a CUDA
    device and the bitsandbytes package).
    """

    def __init__(
        self,
        sd35_dir: str | None = None,
        device: str = "cpu",
        dtype: str = "float16",
        max_length: int = 77,
        cache_size: int = 256,
        load_in_8bit: bool = False,
    ):
        super().__init__(cache_size)
        folder = sd35_folder(sd35_dir, "model.sd35_dir", PARTS)
        if dtype not in DTYPES:
            raise ConfigError(f"model.text_encoder.dtype={dtype}: allowed {', '.join(DTYPES)}")
        import transformers
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        self.device, self.max_length = torch.device(device), int(max_length)
        # transformers 5 names the argument `dtype`, 4.x `torch_dtype`.
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        kwargs: dict = {"local_files_only": True, dtype_key: DTYPES[dtype]}
        if load_in_8bit:  # placed on the device as it loads
            kwargs["quantization_config"] = _eight_bit(self.device)
            kwargs["device_map"] = {"": str(self.device)}
        self.clip_l = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder", **kwargs)
        self.clip_g = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **kwargs)
        self.t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", **kwargs)
        for model in (self.clip_l, self.clip_g, self.t5):
            model.eval().requires_grad_(False)
            if not load_in_8bit:
                model.to(self.device)
        # The classes the folder's tokenizer configs name (CLIP, CLIP, T5 in SD3.5).
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = (
            AutoTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True)
            for sub in ("tokenizer", "tokenizer_2", "tokenizer_3")
        )

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    @torch.inference_mode()
    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """M prompts -> tokens (M, 2 * max_length, 4096), pooled (M, 2048), on the device."""
        hidden, pooled = [], []
        for model, tokenizer in ((self.clip_l, self.tokenizer_l), (self.clip_g, self.tokenizer_g)):
            out = model(self._ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (M, 77, 768) and (M, 77, 1280)
            pooled.append(out.text_embeds)  # (M, 768) and (M, 1280)
        t5 = self.t5(self._ids(self.tokenizer_t5, prompts))[0]  # (M, 77, 4096)
        clip = torch.cat(hidden, dim=-1)  # (M, 77, 2048)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (M, 77, 4096)
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def _eight_bit(device: torch.device):
    if device.type != "cuda":
        raise ConfigError(f"model.text_encoder.load_in_8bit=true needs a CUDA device, not {device}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            "model.text_encoder.load_in_8bit=true needs the bitsandbytes package (pip install bitsandbytes)"
        ) from None
    return BitsAndBytesConfig(load_in_8bit=True)
