"""Leaving frames -> published uint8 views: one call per round where asked, half precision
close to float32, only uint8 at the output size coming back."""

import copy

import pytest
import torch

from dwm.config import ConfigError, compose
from dwm.models.vae import TinySD3Vae
from dwm.pipelines.decode import FrameDecoder, to_uint8_views
from dwm.pipelines.streaming import build_decoder

OUTPUT = (172, 304)


class Counting:
    """A decoder that counts its calls and the views of each."""

    def __init__(self, decoder):
        self.decoder, self.calls = decoder, []

    def decode(self, latents):
        self.calls.append(latents.shape[0])
        return self.decoder.decode(latents)


def latents(n: int) -> list[torch.Tensor]:
    return [torch.randn(3, 16, 22, 38, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def levels_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs()


def test_a_rounds_frames_decode_in_one_call_and_equal_one_by_one():
    vae = TinySD3Vae(seed=0)
    frames = latents(4)
    batched, alone = Counting(vae), Counting(vae)
    together = FrameDecoder(batched, OUTPUT, batch=True)(frames)
    one_by_one = FrameDecoder(alone, OUTPUT, batch=False)(frames)
    assert batched.calls == [12] and alone.calls == [3, 3, 3, 3]
    for a, b in zip(together, one_by_one):
        assert a.shape == (3, *OUTPUT, 3) and a.dtype == torch.uint8 and a.device.type == "cpu"
        assert a.untyped_storage().nbytes() == a.numel()  # its own bytes, not the round's
        diff = levels_apart(a, b)
        # A larger batch rounds the last float32 bits differently: a pixel on a rounding edge
        # moves one level, nothing more.
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert levels_apart(together[0], together[1]).max() > 10  # different latents, different views


def test_the_views_are_the_float_decode_resized_clipped_and_rounded():
    vae = TinySD3Vae(seed=0)
    z = latents(1)[0]
    (out,) = FrameDecoder(vae, OUTPUT)([z])
    expected = to_uint8_views(vae.decode(z), OUTPUT)
    assert torch.equal(out, expected)
    # Same size as the model: no resize, just the 8-bit views of the decode.
    (same,) = FrameDecoder(vae, (176, 304))([z])
    assert torch.equal(same, (vae.decode(z) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))


def test_a_half_precision_decode_stays_close_to_float32():
    vae = TinySD3Vae(seed=0)
    frames = latents(2)
    full = FrameDecoder(vae, OUTPUT)(frames)
    half = FrameDecoder(copy.deepcopy(vae).half(), OUTPUT, batch=True)(frames)
    for a, b in zip(full, half):
        diff = levels_apart(a, b).float()
        # Measured on this tiny random VAE: mean 0.1 level, at most 3 levels.
        assert diff.mean() < 0.25 and diff.max() <= 4, (diff.mean(), diff.max())


def test_the_vae_dtype_follows_the_device_or_the_config():
    def dtype(*overrides):
        return next(build_decoder(compose(list(overrides))).vae.parameters()).dtype

    assert dtype() == torch.float32  # auto on a CPU
    assert dtype("model.vae_dtype=float16") == torch.float16
    with pytest.raises(ConfigError, match=r"model.vae_dtype=half: allowed float32, float16, bfloat16, auto"):
        dtype("model.vae_dtype=half")
