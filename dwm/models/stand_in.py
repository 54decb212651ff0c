"""A local SD3.5 folder of stand-in weights, for running `model=ctsd_35_xs` without the released
files: benchmarks of the real denoiser on a machine that has no SD3.5 download, and tests.

`write_sd35_folder` writes what `model.sd35_dir` points at, with the real classes: CLIP-L,
CLIP-G and T5 at their real widths (768, 1280, 4096, so the embeddings have the real shapes)
but one or two layers, tokenizers over a small vocabulary, and an SD3-layout VAE with random
weights at the width asked (the real one: block_out_channels 128/256/512/512). Nothing is
downloaded; every weight is seeded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from dwm.models.vae import TinySD3Vae

WORDS = ["a", "car", "road", "rain", "night", "at", "daytime", "clear", "sky"]
REAL_VAE_BLOCKS = (128, 256, 512, 512)


def _clip(folder: Path, sub: str, tokenizer_sub: str, width: int, vocab: dict, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, projection_dim=width, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPTextModelWithProjection(config).save_pretrained(folder / sub)
    d = folder / tokenizer_sub
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>").save_pretrained(d)


def _t5(folder: Path, seed: int) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", *WORDS]
    config = T5Config(vocab_size=len(words), d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        T5EncoderModel(config).save_pretrained(folder / "text_encoder_3")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>").save_pretrained(
        folder / "tokenizer_3"
    )


def write_sd35_folder(folder: str | Path, vae_blocks: Sequence[int] = (16, 16, 32, 32), seed: int = 0) -> Path:
    """Write an SD3.5-layout folder of stand-in weights at `folder` (see the module); returns it.
    vae_blocks: the VAE's block_out_channels (REAL_VAE_BLOCKS for the real decoder's cost)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    _clip(folder, "text_encoder", "tokenizer", 768, vocab, seed + 1)
    _clip(folder, "text_encoder_2", "tokenizer_2", 1280, vocab, seed + 2)
    _t5(folder, seed + 3)
    groups = 32 if min(vae_blocks) >= 32 and all(c % 32 == 0 for c in vae_blocks) else 16
    TinySD3Vae(seed=seed + 4, block_out_channels=tuple(vae_blocks), norm_num_groups=groups).vae.save_pretrained(folder / "vae")
    return folder
