"""CTSD 3.5 XS: the released model's module tree, checkpoint loading, structure, text and VAE.

No released file can be here: the key table of the released checkpoint (tests/data) stands for
it, the real-size model is built on the meta device (no memory), and tiny models stand for
the rest, saved and loaded through the same code users run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dwm.config import ConfigError, compose, instantiate
from dwm.models import check
from dwm.models.checkpoint import CheckpointError, build_denoiser, load_checkpoint, model_shapes, save_state_dict
from dwm.models.ctsd import CrossviewTemporalDiT

DATA = Path(__file__).resolve().parent / "data"
H, W = 64, 96  # layouts; latents 8x12, tokens 4x6
N, T, V = 1, 3, 3


def reference_table() -> dict[str, tuple[tuple[int, ...], str]]:
    """The released checkpoint's keys: key -> (shape, kind)."""
    table = {}
    for line in (DATA / "ctsd_35_xs_state_dict.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype, kind = line.split("\t")
        table[key] = (tuple(ast.literal_eval(shape)), kind)
    return table


def tiny(**kwargs) -> CrossviewTemporalDiT:
    return CrossviewTemporalDiT(seed=kwargs.pop("seed", 0), **kwargs).eval()


def inputs(model: CrossviewTemporalDiT, seed: int = 0, layout: torch.Tensor | None = None):
    """latents (N,T,V,16,8,12), timesteps (N,T,V) and a stacked context for `model`."""
    g = torch.Generator().manual_seed(seed)
    layout = (torch.rand(V, 6, H, W, generator=g) > 0.9).float() if layout is None else layout
    from dwm.models.base import TextEmbedding

    text = TextEmbedding(torch.randn(V, 16, 64, generator=g), torch.randn(V, 32, generator=g))
    ctx = model.frame_context(layout, torch.rand(V, 11, generator=g), text)
    ctx = {k: x.expand(N, T, *x.shape).contiguous() for k, x in ctx.items()}
    latents = torch.randn(N, T, V, 16, H // 8, W // 8, generator=g)
    timesteps = torch.linspace(200, 900, N * T * V).reshape(N, T, V)
    return latents, timesteps, ctx


# ---- the released module tree ---------------------------------------------------------------


def test_ctsd_35_xs_has_exactly_the_released_checkpoints_keys_and_shapes():
    cfg = compose({"model": "ctsd_35_xs"})
    with torch.device("meta"):
        model = instantiate(cfg, "model.denoiser")
    ours = model_shapes(model)
    table = reference_table()
    assert len(table) == 1049
    assert sorted(set(table) - set(ours)) == [] and sorted(set(ours) - set(table)) == []
    assert {k: s for k, (s, _) in table.items()} == ours
    params = sum(p.numel() for p in model.parameters())
    assert params == 2_114_186_834
    buffers = {name for name, _ in model.named_buffers() if name in ours}
    assert buffers == {k for k, (_, kind) in table.items() if kind == "buffer"} == {"pos_embed.pos_embed"}
    assert ours["pos_embed.pos_embed"] == (1, 147456, 1280)


# ---- loading a checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_saved_checkpoint_loads_back_strictly_and_gives_the_same_outputs(tmp_path, suffix):
    source, target = tiny(seed=0), tiny(seed=5)
    latents, timesteps, ctx = inputs(source)
    with torch.inference_mode():
        expected = source(latents, timesteps, ctx)
        assert not torch.allclose(target(latents, timesteps, ctx), expected)
    path = tmp_path / f"tiny{suffix}"
    save_state_dict(source, path)
    load_checkpoint(target, path)
    with torch.inference_mode():
        assert torch.equal(target(latents, timesteps, ctx), expected)

    # The same file through the config, onto a model built on the meta device, cast to bf16.
    cfg = compose({"model.checkpoint": str(path), "model.dtype": "bfloat16", "seed": "9"})
    built = build_denoiser(cfg, torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in built.parameters())
    assert torch.equal(built.proj_out.weight, source.proj_out.weight.to(torch.bfloat16))


def test_a_checkpoint_that_does_not_fit_is_refused_naming_every_key(tmp_path):
    model = tiny()
    state = model.state_dict()
    state.pop("proj_out.bias")
    state["adapter.extra.weight"] = torch.zeros(3)
    state["context_embedder.weight"] = torch.zeros(7, 7)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tiny(seed=1), path)
    message = str(refused.value)
    assert "missing keys: proj_out.bias" in message
    assert "unexpected keys: adapter.extra.weight" in message
    assert "context_embedder.weight: shape [7, 7] in the file" in message


def test_missing_or_unreadable_files_name_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.checkpoint=.*no such file"):
        build_denoiser(compose({"model.checkpoint": str(tmp_path / "nope.pth")}), torch.device("cpu"), torch.float32)
    # The real model never silently runs on random weights.
    with pytest.raises(ConfigError, match=r"model\.checkpoint is not set"):
        build_denoiser(compose({"model": "ctsd_35_xs"}), torch.device("cpu"), torch.float32)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        load_checkpoint(tiny(), junk)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint type .npz; allowed .pth"):
        load_checkpoint(tiny(), other)


def test_the_check_command_passes_a_good_file_and_names_what_is_wrong_in_a_bad_one(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    save_state_dict(tiny(), good)
    assert check.main([f"model.checkpoint={good}"]) == 0
    out = capsys.readouterr().out
    assert "ok: every key and shape matches" in out and "parameters" in out

    state = tiny().state_dict()
    state.pop("norm_out.linear.weight")
    state["time_mixers.0.mix_factor"] = torch.zeros(2)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    assert check.main([f"model.checkpoint={bad}"]) == 1
    err = capsys.readouterr().err
    assert "norm_out.linear.weight" in err and "time_mixers.0.mix_factor: shape [2]" in err
    assert "Traceback" not in err

    assert check.main(["model=ctsd_35_xs", f"model.checkpoint={tmp_path / 'missing.pth'}"]) == 2
    assert "model.checkpoint=" in capsys.readouterr().err
    # The released size on the meta device against a tiny file: every key is wrong, named.
    assert check.main(["model=ctsd_35_xs", f"model.checkpoint={good}"]) == 1
    assert "condition_image_adapter.zero_convs.5.weight" in capsys.readouterr().err


# ---- structure --------------------------------------------------------------------------------


def test_rowwise_crossview_attention_reaches_only_the_same_row_of_the_other_views():
    model = tiny()
    block = model.crossview_transformer_blocks[0]
    hp, wp, d = 4, 6, model.width
    hidden = torch.randn(T * V, hp * wp, d, generator=torch.Generator().manual_seed(1))
    emb = torch.zeros(1, T, V, 1, d)
    moved = hidden.clone().view(T, V, hp, wp, d)
    row = 2
    moved[:, 0, row] += torch.randn(T, wp, d, generator=torch.Generator().manual_seed(2))  # view 0, row 2
    moved = moved.view(T * V, hp * wp, d)
    with torch.inference_mode():
        base = model._crossview(block, hidden, emb, T, V, hp, wp).view(T, V, hp, wp, d)
        out = model._crossview(block, moved, emb, T, V, hp, wp).view(T, V, hp, wp, d)
        delta = (out - base).abs().amax(dim=(0, 3, 4))  # (V, hp)
        assert delta[1:, row].min() > 1e-4  # row 2 of views 1 and 2 see it
        others = [r for r in range(hp) if r != row]
        assert delta[:, others].max() == 0  # no other row of any view does

        # With the training rig's mask, the right view does not attend to the left one.
        masked = tiny(crossview_attention_mask=[[1, 1, 0], [1, 1, 1], [0, 1, 1]])
        mask = masked._view_mask(V, wp, hidden)
        block = masked.crossview_transformer_blocks[0]
        base = masked._crossview(block, hidden, emb, T, V, hp, wp, mask).view(T, V, hp, wp, d)
        out = masked._crossview(block, moved, emb, T, V, hp, wp, mask).view(T, V, hp, wp, d)
        delta = (out - base).abs().amax(dim=(0, 3, 4))
        assert delta[1, row] > 1e-4 and delta[2].max() == 0


def test_a_bad_view_mask_is_refused():
    with pytest.raises(ValueError, match="every view must attend to itself"):
        tiny(crossview_attention_mask=[[0, 1], [1, 1]])
    with pytest.raises(ValueError, match="V x V list of 0 and 1"):
        tiny(crossview_attention_mask=[[1, 2, 0]])


def test_zero_initialised_adapter_outputs_leave_the_layout_without_effect_until_trained():
    model = tiny(zero_init_adapter=True)
    empty = torch.zeros(V, 6, H, W)
    road = empty.clone()
    road[:, 3, :, W // 2] = 1.0
    road[:, 0:3, 8:24, 8:32] = 1.0
    with torch.inference_mode():
        a = model(*inputs(model, layout=empty))
        b = model(*inputs(model, layout=road))
        assert torch.equal(a, b)
        for conv in model.condition_image_adapter.zero_convs:
            conv.weight.add_(0.01 * torch.randn_like(conv.weight))
        a = model(*inputs(model, layout=empty))
        b = model(*inputs(model, layout=road))
        assert (a - b).abs().max() > 1e-3


def test_each_frames_timestep_reaches_its_own_modulation():
    model = tiny(temporal_layers=[], crossview_layers=[])
    latents, timesteps, ctx = inputs(model)
    seen = []
    handle = model.transformer_blocks[0].norm1.register_forward_hook(
        lambda _m, args, kwargs, _out: seen.append(kwargs.get("emb", args[-1]).clone()),  # temb (B, D)
        with_kwargs=True,
    )
    try:
        with torch.inference_mode():
            model(latents, timesteps, ctx)
            changed = timesteps.clone()
            changed[0, 1] = 17.0  # frame 1, all views
            model(latents, changed, ctx)
    finally:
        handle.remove()
    delta = (seen[1] - seen[0]).abs().amax(dim=-1).view(T, V)
    assert delta[1].min() > 1e-3 and delta[0].max() == 0 and delta[2].max() == 0


def test_the_serve_app_refuses_to_start_the_real_model_without_its_files(tmp_path):
    import deployments

    with pytest.raises(ConfigError, match=r"model\.checkpoint is not set"):
        deployments.app({"model": "ctsd_35_xs"})
    ckpt = tmp_path / "ctsd.pth"
    ckpt.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model\.sd35_dir is not set"):
        deployments.app({"model": "ctsd_35_xs", "model.checkpoint": str(ckpt)})
    with pytest.raises(ConfigError, match=r"model\.checkpoint=.*no such file"):
        deployments.app({"model.checkpoint": str(tmp_path / "gone.pth")})
