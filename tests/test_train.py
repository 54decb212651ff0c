"""Training the demo model: what someone running `python -m dwm.train` relies on."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch

from dwm.config import compose
from dwm.pipelines.streaming import StreamingPipeline
from dwm.train.__main__ import main, random_crops, training_config
from dwm.train.dataset import EncodedWindow
from dwm.train.objectives import sample_sigmas, shifted
from dwm.train.scenes import SceneWindows

SMALL = ["pipeline.resolution=[96,160]", "pipeline.output_size=[96,160]", "train.scenes.worlds=2",
         "train.scenes.frames_per_world=20", "train.vae.crop=32", "train.checkpoint_every=2",
         "train.denoiser.windows_kept=3", "train.denoiser.warmup=2"]


def test_training_windows_are_the_worlds_pictures_with_the_conditions_the_model_is_given():
    cfg = training_config(SMALL)
    windows = SceneWindows(cfg, seed=4)
    a, b = next(windows), next(windows)
    t, v = int(cfg.pipeline.window), len(cfg.rig.cameras)
    assert a.images.shape == (t, v, 3, 96, 160) and a.layout.shape == (t, v, 6, 96, 160)
    assert a.camera_params.shape == (t, v, 11) and len(a.captions) == t and len(a.captions[0]) == v
    assert -1.0 <= float(a.images.min()) and float(a.images.max()) <= 1.0
    # The picture is a camera's: sky at the top, ground at the bottom.
    top, bottom = a.images[:, :, :, :8], a.images[:, :, :, -8:]
    assert float((top - bottom).abs().mean()) > 0.1
    assert not torch.equal(a.images, b.images)  # windows come from different drives in turn
    # Same seed, same windows: a held-out seed gives other scenes.
    again = next(SceneWindows(cfg, seed=4))
    assert torch.equal(again.images, a.images) and torch.equal(again.layout, a.layout)
    assert not torch.equal(next(SceneWindows(cfg, seed=5)).images, a.images)


def test_kept_windows_give_back_their_layouts_exactly():
    cfg = training_config(SMALL)
    window = next(SceneWindows(cfg, seed=1))
    latents = torch.randn(6, 3, 16, 12, 20)
    kept = EncodedWindow.of(window, latents)
    back = kept.window()
    assert torch.equal(back.layout, window.layout) and torch.equal(back.camera_params, window.camera_params)
    assert back.captions == window.captions
    assert torch.equal(kept.latents.float(), latents.half().float())
    assert sum(len(f.layout_zlib) for f in kept.frames) < window.layout.numel() // 4  # compressed


def test_noise_levels_are_one_per_frame_some_in_the_queues_pattern():
    g = torch.Generator().manual_seed(0)
    sigmas = sample_sigmas(4000, 6, 3.0, 0.5, g)
    assert sigmas.shape == (4000, 6) and float(sigmas.min()) > 0.0 and float(sigmas.max()) < 1.0
    u = sigmas / (3.0 - 2.0 * sigmas)  # the shift undone
    assert torch.allclose(shifted(u, 3.0), sigmas, atol=1e-6)
    steps = torch.diff(u, dim=1)
    queue = torch.isclose(steps, torch.full_like(steps, 1 / 6), atol=1e-5).all(dim=1)
    assert 0.45 < float(queue.float().mean()) < 0.55  # the others: independent per frame
    assert float(u[~queue].std(dim=1).mean()) > 0.2


def test_crops_are_squares_on_the_latent_grid():
    images = torch.arange(2 * 3 * 96 * 160, dtype=torch.float32).reshape(2, 3, 96, 160)
    crops = random_crops(images, 40, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 40, 40)
    for image, crop in zip(images, crops):
        y, x = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 160)
        assert y % 8 == 0 and x % 8 == 0 and torch.equal(image[:, y:y + 40, x:x + 40], crop)


def test_training_writes_weights_the_demo_model_loads_and_resumes_where_it_stopped(tmp_path, caplog):
    out = tmp_path / "run"
    args = [f"train.out={out}", *SMALL, "train.vae.steps=3", "train.denoiser.steps=4"]
    assert main(args) == 0
    for name in ("vae.safetensors", "denoiser.safetensors", "vae.pt", "denoiser.pt", "windows.pt"):
        assert (out / name).is_file(), name
    for curve in ("vae_loss.png", "denoiser_loss.png"):
        picture = cv2.imread(str(out / curve))
        assert picture is not None and picture.shape[:2] == (400, 720)
        assert (picture[..., 0] != picture[..., 2]).any()  # the blue running mean is drawn
    vae_before = (out / "vae.safetensors").read_bytes()
    state = torch.load(out / "denoiser.pt", weights_only=False)
    assert state["step"] == 4 and len(state["losses"]) == 4

    # Longer: the VAE is done and kept, the denoiser goes on from step 4.
    caplog.set_level(logging.INFO, logger="dwm.train")
    assert main([*args[:-1], "train.denoiser.steps=6"]) == 0
    assert "vae: done" in caplog.text and "denoiser: resumed at step 4" in caplog.text
    assert (out / "vae.safetensors").read_bytes() == vae_before
    assert torch.load(out / "denoiser.pt", weights_only=False)["step"] == 6

    # The weights load strictly into model=demo and make frames.
    cfg = compose(["model=demo", f"model.checkpoint={out / 'denoiser.safetensors'}",
                   f"model.vae.checkpoint={out / 'vae.safetensors'}", *SMALL[:2], "pipeline.steps=6", "pipeline.window=3"])
    model = StreamingPipeline.build_model(cfg)
    trained = {k: v for k, v in model.denoiser.state_dict().items()}
    from safetensors.torch import load_file

    saved = load_file(out / "denoiser.safetensors")
    assert trained.keys() == saved.keys() and all(torch.equal(trained[k], saved[k]) for k in saved)


def test_a_bad_override_or_missing_weights_say_what_to_do(tmp_path, capsys):
    assert main([f"train.out={tmp_path}", "train.vae.stepz=3"]) == 2
    assert "train.vae.stepz" in capsys.readouterr().err
    with pytest.raises(Exception, match="python -m dwm.train"):
        StreamingPipeline.build_model(compose(["model=demo", f"model.checkpoint={tmp_path / 'none.safetensors'}"]))


def test_loss_curve_tracks_the_losses(tmp_path):
    from dwm.train.curve import plot_losses

    plot_losses(list(np.linspace(1.0, 0.01, 300)), tmp_path / "c.png", "falling")
    picture = cv2.imread(str(tmp_path / "c.png"))
    blue = np.argwhere((picture[..., 0] > 150) & (picture[..., 2] < 100))  # the running mean (BGR)
    left, right = blue[blue[:, 1] < 150], blue[blue[:, 1] > 600]
    assert left[:, 0].mean() < right[:, 0].mean()  # falling loss: high (small y) on the left
