"""The embedded model components: tiny denoiser, hash text encoder, tiny SD3 VAE, their config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra.utils import instantiate

from dwm.models.base import TextEmbedding
from dwm.models.text import HashTextEncoder
from dwm.models.ctsd import CrossviewTemporalDiT as TinyDenoiser
from dwm.models.vae import TinySD3Vae
from dwm.pipelines.guidance import UNCONDITIONAL_LAYOUT_VALUE

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# Small frames keep the tests fast: 64x96 layouts -> 8x12 latents -> 4x6 tokens per image.
H, W = 64, 96
N, T, V = 2, 3, 3
GREY = UNCONDITIONAL_LAYOUT_VALUE  # the unconditional layout colour


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def model() -> TinyDenoiser:
    return TinyDenoiser(seed=0).eval()


@pytest.fixture(scope="module")
def encoder() -> HashTextEncoder:
    return HashTextEncoder(seed=0)


def road_layout(views: int, box: tuple[int, int] | None, height: int = H, width: int = W):
    """(views, 6, height, width): one map line, a 16x24 white box at `box` (top, left) if given."""
    layout = torch.zeros(views, 6, height, width)
    layout[:, 3, :, width // 2] = 1.0
    if box is not None:
        top, left = box
        layout[:, 0:3, top : top + 16, left : left + 24] = 1.0
    return layout


def window_conditions(seed: int = 0):
    """Different conditions for each (n, t): layouts (N,T,V,6,H,W), cameras (N,T,V,11), captions."""
    g = torch.Generator().manual_seed(seed)
    layouts = (torch.rand(N, T, V, 6, H, W, generator=g) > 0.9).float()
    cameras = torch.rand(N, T, V, 11, generator=g)
    captions = [[[f"frame {n} {t} view {v} rain" for v in range(V)] for t in range(T)] for n in range(N)]
    return layouts, cameras, captions


def stacked_context(model, encoder, layouts, cameras, captions) -> dict[str, torch.Tensor]:
    """One frame_context per (window, frame), stacked to (N, T, V, ...), as the queue does."""
    frames = [
        [
            model.frame_context(layouts[n, t], cameras[n, t], encoder.encode(captions[n][t]))
            for t in range(layouts.shape[1])
        ]
        for n in range(layouts.shape[0])
    ]
    return {
        key: torch.stack([torch.stack([frame[key] for frame in window]) for window in frames])
        for key in frames[0][0]
    }


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def change_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, T, V, C, h, w) x2 -> (N, T, V): mean absolute difference per image."""
    return (a - b).abs().mean(dim=(-3, -2, -1))


@pytest.fixture(scope="module")
def window(model, encoder):
    layouts, cameras, captions = window_conditions()
    with torch.inference_mode():
        context = stacked_context(model, encoder, layouts, cameras, captions)
    latents = noise(N, T, V, 16, H // 8, W // 8)
    timesteps = torch.linspace(100, 1000, N * T * V).reshape(N, T, V)
    return latents, timesteps, context


# ---- denoiser -----------------------------------------------------------------------------


def test_forward_returns_a_velocity_per_image(model, window):
    latents, timesteps, context = window
    out = model(latents, timesteps, context)
    assert out.shape == latents.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0.1


def test_same_seed_builds_the_same_model_and_another_seed_does_not(model, window):
    latents, timesteps, context = window
    twin = TinyDenoiser(seed=0).eval()
    assert torch.equal(twin(latents, timesteps, context), model(latents, timesteps, context))
    other = TinyDenoiser(seed=1).eval()
    assert not torch.allclose(other(latents, timesteps, context), model(latents, timesteps, context))


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    TinyDenoiser(seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_each_frame_and_view_has_its_own_timestep(model, window):
    latents, timesteps, context = window
    base = model(latents, timesteps, context)
    changed = timesteps.clone()
    changed[0, 1, 2] = 20.0
    delta = change_per_image(model(latents, changed, context), base)
    # The image whose timestep changed changes most; the other window does not change at all.
    assert delta.flatten().argmax().item() == 0 * T * V + 1 * V + 2
    assert delta[0, 1, 2] > 10 * delta[0].flatten().topk(2).values[1]
    assert delta[1].max() < 1e-6


def test_layout_changes_the_output_where_it_changes(model, encoder, window):
    latents, timesteps, _ = window
    cameras = torch.rand(V, 11, generator=torch.Generator().manual_seed(3))
    text = encoder.encode(["a road"] * V)

    def run(layout):
        ctx = model.frame_context(layout, cameras, text)
        ctx = {k: x.expand(N, T, *x.shape) for k, x in ctx.items()}
        return model(latents, timesteps, ctx)

    grey = run(torch.full((V, 6, H, W), GREY))
    road = run(road_layout(V, box=None))
    assert change_per_image(road, grey).min() > 0.01
    # Adding a car box changes the output most where the box is: latent rows 1-2, columns
    # 1-3 (a latent cell is 8x8 layout pixels), far less in the opposite corner.
    boxed = run(road_layout(V, box=(8, 8)))
    cell_change = (boxed - road).abs().mean(dim=(0, 1, 2, 3))  # (h, w)
    assert cell_change[1:3, 1:4].mean() > 2 * cell_change[5:, 8:].mean()


def test_conditions_of_one_frame_only_reach_the_output_through_it(model, encoder, window):
    # A different prompt for one frame changes that frame's views most.
    latents, timesteps, context = window
    base = model(latents, timesteps, context)
    ctx = model.frame_context(
        torch.full((V, 6, H, W), GREY), torch.zeros(V, 11), encoder.encode(["snow at night"] * V)
    )
    changed = {k: x.clone() for k, x in context.items()}
    for key in changed:
        changed[key][0, 2] = ctx[key]
    delta = change_per_image(model(latents, timesteps, changed), base)
    assert delta[0, 2].min() > delta[0, :2].max()
    assert delta[1].max() < 1e-6


def test_temporal_attention_mixes_the_frames_of_a_window(model, window):
    latents, timesteps, context = window
    moved = latents.clone()
    moved[0, 0] = noise(V, 16, H // 8, W // 8, seed=9)

    def frame_1_change(m):
        return change_per_image(m(moved, timesteps, context), m(latents, timesteps, context))[0, 1]

    assert frame_1_change(model).min() > 1e-3
    # Control: with no temporal and no cross-view attention, frames are independent images.
    isolated = TinyDenoiser(seed=0, temporal_layers=[], crossview_layers=[]).eval()
    assert frame_1_change(isolated).max() < 1e-6


def test_crossview_attention_mixes_the_views_of_a_frame(window):
    latents, timesteps, context = window
    moved = latents.clone()
    moved[0, 0, 0] = noise(16, H // 8, W // 8, seed=9)

    def change(m):
        return change_per_image(m(moved, timesteps, context), m(latents, timesteps, context))

    crossview_only = TinyDenoiser(seed=0, temporal_layers=[]).eval()
    delta = change(crossview_only)
    assert delta[0, 0, 1:].min() > 1e-3  # the other views of frame 0
    assert delta[0, 1:].max() < 1e-6  # no temporal attention: other frames untouched
    isolated = TinyDenoiser(seed=0, temporal_layers=[], crossview_layers=[]).eval()
    assert change(isolated)[0, 0, 1:].max() < 1e-6


def test_per_frame_contexts_stacked_equal_one_context_for_the_whole_batch(model, encoder, window):
    latents, timesteps, context = window
    layouts, cameras, captions = window_conditions()
    flat_captions = [c for window_ in captions for frame in window_ for c in frame]
    text = encoder.encode(flat_captions)
    whole = model.frame_context(layouts.flatten(0, 2), cameras.flatten(0, 2), text)
    whole = {key: x.reshape(N, T, V, *x.shape[1:]) for key, x in whole.items()}
    assert whole.keys() == context.keys()
    for key in whole:
        torch.testing.assert_close(context[key], whole[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        model(latents, timesteps, context), model(latents, timesteps, whole), atol=1e-5, rtol=1e-5
    )


def test_bad_inputs_name_what_is_wrong(model, encoder, window):
    latents, timesteps, context = window
    text = encoder.encode(["a"] * V)
    cameras = torch.zeros(V, 11)
    with pytest.raises(ValueError, match="layout has shape"):
        model.frame_context(torch.zeros(V, 3, H, W), cameras, text)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.frame_context(torch.zeros(V, 6, H + 8, W), cameras, text)
    with pytest.raises(ValueError, match="camera_params"):
        model.frame_context(torch.zeros(V, 6, H, W), torch.zeros(V, 9), text)
    with pytest.raises(ValueError, match="one prompt per view"):
        model.frame_context(torch.zeros(V, 6, H, W), cameras, encoder.encode(["a"]))
    with pytest.raises(ValueError, match="joint_attention_dim"):
        model.frame_context(
            torch.zeros(V, 6, H, W), cameras, TextEmbedding(torch.zeros(V, 4, 8), text.pooled)
        )
    with pytest.raises(ValueError, match="timesteps"):
        model(latents, timesteps[:, :, 0], context)
    with pytest.raises(ValueError, match="latents"):
        model(latents[:, :, :, :4], timesteps, context)
    with pytest.raises(ValueError, match="context lacks"):
        model(latents, timesteps, {k: v for k, v in context.items() if k != "prompt_tokens"})
    with pytest.raises(ValueError, match="layout images must be"):
        model(latents[..., :4, :], timesteps, context)
    with pytest.raises(ValueError, match="temporal_layers"):
        TinyDenoiser(num_layers=2, temporal_layers=[2])


# ---- text encoder -------------------------------------------------------------------------


def test_text_encoder_is_deterministic_across_instances(encoder):
    prompts = ["a red car at dusk", "", "rain"]
    a, b = encoder.encode(prompts), HashTextEncoder(seed=0).encode(prompts)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    other = HashTextEncoder(seed=1).encode(prompts)
    assert not torch.allclose(a.tokens, other.tokens)


def test_text_encoder_is_stable_across_processes(encoder, tmp_path):
    # Python salts str hashes per process; the encoding must not depend on that.
    out = tmp_path / "emb.pt"
    code = (
        "import torch; from dwm.models.text import HashTextEncoder; "
        f"torch.save(HashTextEncoder(seed=0).encode(['a red car at dusk']).tokens, {str(out)!r})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)
    assert torch.equal(torch.load(out), encoder.encode(["a red car at dusk"]).tokens)


def test_text_encoder_shapes_and_distinct_prompts(encoder):
    emb = encoder.encode(["", "a red car", "a blue car", "A Red  car!", "word " * 40])
    assert emb.tokens.shape == (5, encoder.max_length, encoder.token_dim)
    assert emb.pooled.shape == (5, encoder.pooled_dim)
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    assert not torch.allclose(emb.tokens[1], emb.tokens[2])
    assert not torch.allclose(emb.pooled[1], emb.pooled[2])
    assert not torch.allclose(emb.tokens[0], emb.tokens[1])
    # Case and punctuation do not matter, as for a lower-casing tokenizer.
    assert torch.equal(emb.tokens[1], emb.tokens[3])


def test_text_cache_hits_on_repeats_and_evicts_least_recent():
    enc = HashTextEncoder(seed=0, cache_size=2)
    first = enc.encode(["sunny road"])
    enc.encode(["sunny road", "sunny road"])
    stats = enc.cache_stats()
    assert (stats.hits, stats.misses, stats.size, stats.capacity) == (2, 1, 1, 2)
    enc.encode(["b"])
    enc.encode(["c"])  # evicts "sunny road", the least recently used
    assert enc.cache_stats().size == 2
    again = enc.encode(["sunny road"])
    assert enc.cache_stats().misses == 4
    assert torch.equal(again.tokens, first.tokens)


def test_callers_cannot_corrupt_the_cache(encoder):
    emb = encoder.encode(["cloudy"])
    expected = emb.tokens.clone()
    emb.tokens += 1.0
    assert torch.equal(encoder.encode(["cloudy"]).tokens, expected)


def test_text_encoder_rejects_a_bare_string(encoder):
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("a car")


# ---- VAE ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae() -> TinySD3Vae:
    return TinySD3Vae(seed=0)


def test_vae_decodes_three_views_to_images_in_unit_range(vae):
    images = vae.decode(noise(3, 16, 22, 38))
    assert images.shape == (3, 3, 176, 304)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.01
    assert vae.vae.config.latent_channels == 16
    assert (vae.vae.config.scaling_factor, vae.vae.config.shift_factor) == (1.5305, 0.0609)


def test_vae_is_deterministic_by_seed(vae):
    z = noise(1, 16, 6, 10)
    assert torch.equal(TinySD3Vae(seed=0).decode(z), vae.decode(z))
    assert not torch.allclose(TinySD3Vae(seed=1).decode(z), vae.decode(z))


def test_vae_rejects_wrong_latents(vae):
    with pytest.raises(ValueError, match=r"\(V, 16, h, w\)"):
        vae.decode(torch.zeros(3, 4, 22, 38))


# ---- config -------------------------------------------------------------------------------


def compose(overrides: list[str] | None = None):
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="test"):
        return hydra.compose("config", overrides=overrides or [])


def test_tiny_config_builds_components_that_fit_together():
    cfg = compose(["model=tiny"])
    assert cfg.model.name == "tiny" and cfg.model.dtype == "float32" and cfg.model.random_weights
    encoder = instantiate(cfg.model.text_encoder)
    model = instantiate(cfg.model.denoiser).eval()
    vae = instantiate(cfg.model.vae)
    assert isinstance(encoder, HashTextEncoder)
    assert isinstance(model, TinyDenoiser) and isinstance(vae, TinySD3Vae)

    height, width = 176, 304
    ctx = model.frame_context(
        road_layout(3, box=(80, 100), height=height, width=width),
        torch.rand(3, 11),
        encoder.encode(["a wet road", "a wet road", ""]),
    )
    ctx = {k: x.expand(1, 2, *x.shape) for k, x in ctx.items()}
    latents = noise(1, 2, 3, model.latent_channels, height // 8, width // 8)
    velocity = model(latents, torch.full((1, 2, 3), 500.0), ctx)
    images = vae.decode(latents[0, 0] - 0.5 * velocity[0, 0])
    assert images.shape == (3, 3, height, width)


def test_config_seed_reaches_every_component():
    # The random tiny model (the trained demo model's text table is fixed: its weights were trained with it).
    a, b = compose(["model=tiny", "seed=0"]).model, compose(["model=tiny", "seed=1"]).model
    w0 = instantiate(a.denoiser).proj_out.weight
    w1 = instantiate(b.denoiser).proj_out.weight
    assert not torch.equal(w0, w1)
    t0 = instantiate(a.text_encoder).encode(["x"]).tokens
    t1 = instantiate(b.text_encoder).encode(["x"]).tokens
    assert not torch.equal(t0, t1)
    v0 = next(instantiate(a.vae).parameters())
    v1 = next(instantiate(b.vae).parameters())
    assert not torch.equal(v0, v1)
