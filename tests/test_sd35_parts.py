"""The SD3.5 text encoders and VAE, read from a local SD3.5 folder.

The test writes such a folder itself (`dwm.models.stand_in`): CLIP-L, CLIP-G and T5 of the real
classes at the real widths (768, 1280, 4096) but with one or two layers, tokenizers over a
small vocabulary, and an SD3-layout VAE at a tiny width; then it loads them the way
`model=ctsd_35_xs` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dwm.config import ConfigError
from dwm.models.sd3_text import SD3TextEncoder
from dwm.models.stand_in import write_sd35_folder
from dwm.models.vae import LATENT_CHANNELS, SD35Vae, TinySD3Vae

transformers = pytest.importorskip("transformers", reason="the SD3.5 text encoders need transformers")

@pytest.fixture(scope="module")
def sd35(tmp_path_factory) -> Path:
    return write_sd35_folder(tmp_path_factory.mktemp("sd3.5-medium"))


@pytest.fixture(scope="module")
def encoder(sd35) -> SD3TextEncoder:
    return SD3TextEncoder(str(sd35), device="cpu", dtype="float32")


def test_prompts_encode_to_the_sd3_shapes_by_the_sd3_recipe(encoder):
    prompts = ["daytime. clear sky. a car", "rain at night", ""]
    emb = encoder.encode(prompts)
    assert emb.tokens.shape == (3, 154, 4096) and emb.pooled.shape == (3, 2048)
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    # The first 77 rows are CLIP-L (768) and CLIP-G (1280) penultimate states, zero-padded.
    assert emb.tokens[:, :77, 2048:].abs().max() == 0
    ids = encoder.tokenizer_l(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        clip_l = encoder.clip_l(ids, output_hidden_states=True)
    torch.testing.assert_close(emb.tokens[:, :77, :768], clip_l.hidden_states[-2])
    torch.testing.assert_close(emb.pooled[:, :768], clip_l.text_embeds)
    # The last 77 rows are T5's, over its full width; prompts differ from each other.
    assert emb.tokens[:, 77:, 2048:].abs().amax(dim=(1, 2)).min() > 0
    assert not torch.allclose(emb.tokens[0], emb.tokens[1])


def test_a_repeated_caption_costs_no_encoder_call(encoder):
    calls = []
    forward = encoder.t5.forward
    encoder.t5.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        first = encoder.encode(["a car on a road", "a road"])
        assert len(calls) == 1  # both new captions in one batch
        again = encoder.encode(["a road", "a car on a road", "a road"])
        assert len(calls) == 1
    finally:
        encoder.t5.forward = forward
    assert torch.equal(again.tokens[1], first.tokens[0]) and torch.equal(again.tokens[0], first.tokens[1])


def test_the_vae_comes_from_the_folder_and_decodes_the_sd3_latent_space(sd35):
    vae = SD35Vae(str(sd35))
    assert vae.vae.config.scaling_factor == pytest.approx(1.5305) and vae.vae.config.shift_factor == pytest.approx(0.0609)
    z = torch.randn(3, LATENT_CHANNELS, 22, 38, generator=torch.Generator().manual_seed(0))
    images = vae.decode(z)
    assert images.shape == (3, 3, 176, 304) and 0 <= images.min() and images.max() <= 1
    # The same weights as written: the same pictures as the model that was saved.
    torch.testing.assert_close(images, TinySD3Vae(seed=4).decode(z))


def test_missing_folders_name_the_config_key(tmp_path, sd35):
    with pytest.raises(ConfigError, match=r"model\.sd35_dir is not set"):
        SD3TextEncoder(None)
    with pytest.raises(ConfigError, match=r"model\.sd35_dir=.*no such folder"):
        SD3TextEncoder(str(tmp_path / "nope"))
    partial = tmp_path / "partial"
    (partial / "text_encoder").mkdir(parents=True)
    with pytest.raises(ConfigError, match="lacks text_encoder_2/"):
        SD3TextEncoder(str(partial))
    with pytest.raises(ConfigError, match=r"model\.sd35_dir=.*lacks vae/"):
        SD35Vae(str(partial))
    with pytest.raises(ConfigError, match="load_in_8bit=true needs a CUDA device"):
        SD3TextEncoder(str(sd35), load_in_8bit=True)
