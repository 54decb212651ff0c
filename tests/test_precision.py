"""The model is fed at the reference's precision: the queue, its noise and its hand-over in
float32 whatever the model's dtype; the model in float16 (or bfloat16) under autocast with
its layer norms in float32; camera scalars into their sinusoids in float32; the axial q/k
RMSNorm eps of diffusers' `Attention`."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.normalization import RMSNorm
from torch import nn

from dwm.config import compose, instantiate
from dwm.models.base import TextEmbedding
from dwm.models.ctsd import AXIAL_QK_NORM_EPS, CrossviewTemporalDiT, Float32LayerNorm
from dwm.pipelines.fifo import LATENT_DTYPE, LatentFrame, QueueFront, QueueSchedule
from dwm.pipelines.stages import BandStage, SessionFront
from dwm.pipelines.streaming import StreamingPipeline, frame_contexts, frame_shape, model_dtype
from tests.driving import packed_drive

HALF = [torch.float16, torch.bfloat16]
SMALL = {"pipeline.steps": "6", "pipeline.window": "3", "pipeline.resolution": "[64,96]"}
H, W = 64, 96  # layout pixels; latents 8 x 12
N, T, V = 2, 3, 3


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(scope="module")
def tiny_float32() -> CrossviewTemporalDiT:
    return instantiate(compose(), "model.denoiser").eval().requires_grad_(False)


def half_copy(model: CrossviewTemporalDiT, dtype: torch.dtype) -> CrossviewTemporalDiT:
    half = instantiate(compose(), "model.denoiser").eval().requires_grad_(False)
    half.load_state_dict(model.state_dict())
    return half.to(dtype)


def inputs(model: CrossviewTemporalDiT, seed: int = 0):
    """A window batch: latents (N, T, V, 16, 8, 12) float32 (the queue's), timesteps (N, T, V)
    float32, and the stacked context of one frame's conditions."""
    g = torch.Generator().manual_seed(seed)
    layout = (torch.rand(V, 6, H, W, generator=g) > 0.8).float()
    cameras = torch.rand(V, 11, generator=g)
    text = TextEmbedding(
        torch.randn(V, 16, model.context_embedder.in_features, generator=g),
        torch.randn(V, model.time_text_embed.text_embedder.linear_1.in_features, generator=g),
    )
    with torch.no_grad():
        ctx = model.frame_context(layout, cameras, text)
    ctx = {k: x.expand(N, T, *x.shape).contiguous() for k, x in ctx.items()}
    latents = torch.randn(N, T, V, 16, H // 8, W // 8, generator=g)
    timesteps = torch.linspace(20, 980, N * T * V).reshape(N, T, V)
    return latents, timesteps, ctx


# -- the queue and its hand-over stay float32 ------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=dtype_name)
def test_a_half_precision_pipelines_queue_keeps_float32_latents(dtype):
    cfg = compose({**SMALL, "model.dtype": dtype_name(dtype)})
    pipeline = StreamingPipeline.from_config(cfg, views=3)
    assert all(p.dtype == dtype for p in pipeline.denoiser.parameters())
    seen: list[torch.dtype] = []  # what the first layer of the model computes in
    pipeline.denoiser.pos_embed.proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    frames = [c.unpack() for c in packed_drive(cfg, 5)[0]]
    out = [f for frame in frames for f in pipeline.push(frame)]
    assert len(out) == 5 - pipeline.depth
    assert seen and set(seen) == {dtype}  # the model ran in its dtype ...
    for band in pipeline.queue.bands:  # ... and the queue kept float32 between its steps
        assert band.latents.dtype == torch.float32
    assert LATENT_DTYPE == torch.float32


@pytest.mark.parametrize("dtype", HALF, ids=dtype_name)
def test_the_stage_hand_over_and_the_noise_are_float32_with_a_half_precision_model(dtype):
    cfg = compose({**SMALL, "model.dtype": dtype_name(dtype), "pipeline.bands": "2"})
    p = cfg.pipeline
    model = StreamingPipeline.build_model(cfg)
    schedule = QueueSchedule(p.steps, p.window, p.bands)
    stage = BandStage(model.denoiser, None, 0, schedule, guidance=p.guidance, resolution=p.resolution,
                      dtype=model_dtype(cfg))
    front = SessionFront(QueueFront(schedule, frame_shape(3, 16, p.resolution), seed=0), model.text_encoder, 3)
    stage.open("s", front.empty_text)
    handed: list[LatentFrame] = []
    for conditions in packed_drive(cfg, 7)[0]:
        pushed, entries = front.enter(conditions)
        assert all(e.frame.latent.dtype == torch.float32 for e in entries)  # the noise
        mine = [e for e in entries if e.band == 0]  # this test holds band 0 only
        handed += stage.step({"s": mine} if mine else {}, {"s": pushed}).values()
    assert handed and all(f.latent.dtype == torch.float32 for f in handed)
    assert all(0 < f.index < p.steps for f in handed)  # partly denoised, handed on to band 1


def test_an_update_below_the_models_precision_is_kept_by_the_queue():
    # A bfloat16 model whose velocity is tiny: every Euler step moves a latent by far less
    # than bfloat16's spacing. The queue must keep the sum of those steps.
    from dwm.pipelines.fifo import BandedFifoQueue

    velocity = torch.tensor(1e-3, dtype=torch.bfloat16)
    given: list[torch.Tensor] = []

    def half_model(latents, timesteps, payloads):
        given.append(latents.clone())
        return torch.full(latents.shape, float(velocity), dtype=torch.bfloat16)  # (B, T, V, C, h, w)

    queue = BandedFifoQueue(4, 2, 1, (2, 2, 3, 3), seed=5)
    queue.push("a", half_model)
    first = queue.push("b", half_model)  # the warm-up: "a" has all its 4 steps
    assert all(x.dtype == torch.float32 for x in given)
    noise = given[0][0, 0]  # slot 0 at the first warm-up call: "a"'s noise
    assert first.latent.dtype == torch.float32
    # Flow from sigma 1 to 0 with a constant velocity v: x0 = noise - v.
    torch.testing.assert_close(first.latent, noise - float(velocity), rtol=0, atol=1e-6)
    # The premise: the same steps applied to a bfloat16 latent are lost (where |x| >= 0.5,
    # bfloat16's spacing is at least 2^-8 = 0.0039, above twice each step's dt * v <= 6e-4).
    x = noise.to(torch.bfloat16)
    for dt in (queue.schedule.sigmas[1:] - queue.schedule.sigmas[:-1]):
        x = (x.float() + dt * velocity.float()).to(torch.bfloat16)
    large = noise.abs() >= 0.5
    assert large.any() and torch.equal(x[large], noise.to(torch.bfloat16)[large])


# -- the model's numerics ------------------------------------------------------------------


def test_the_released_model_runs_float16_by_default_and_bfloat16_is_an_option():
    assert compose(["model=ctsd_35_xs"]).model.dtype == "float16"
    assert model_dtype(compose(["model=ctsd_35_xs"])) == torch.float16
    assert model_dtype(compose(["model=ctsd_35_xs", "model.dtype=bfloat16"])) == torch.bfloat16


@pytest.mark.parametrize("dtype", HALF, ids=dtype_name)
def test_a_half_precision_model_runs_under_autocast_with_float32_layer_norms(tiny_float32, dtype):
    model = half_copy(tiny_float32, dtype)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(type(m) is Float32LayerNorm for m in norms)
    assert model.state_dict().keys() == tiny_float32.state_dict().keys()

    checked = {"norm": 0, "linear": 0}

    def norm_hook(module, args, out):
        (x,) = args
        assert out.dtype == torch.float32
        weight = None if module.weight is None else module.weight.float()
        bias = None if module.bias is None else module.bias.float()
        expected = F.layer_norm(x.float(), module.normalized_shape, weight, bias, module.eps)
        assert torch.equal(out, expected)
        checked["norm"] += 1

    def linear_hook(module, args, out):
        assert torch.is_autocast_enabled("cpu") and out.dtype == dtype
        checked["linear"] += 1

    for m in norms:
        m.register_forward_hook(norm_hook)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    latents, timesteps, ctx = inputs(model)
    assert all(x.dtype == dtype for x in ctx.values())
    with torch.no_grad():
        out = model(latents, timesteps, ctx)
        reference = tiny_float32(*inputs(tiny_float32))
    assert checked["norm"] >= len(norms) and checked["linear"] > 0
    assert out.dtype == dtype and out.shape == latents.shape
    # The half-precision model computes what the float32 one does, to its precision.
    error = (out.float() - reference).norm() / reference.norm()
    assert error < (0.02 if dtype == torch.float16 else 0.1)
    assert not torch.is_autocast_enabled("cpu")  # the autocast ends with the call


@pytest.mark.parametrize("dtype", HALF, ids=dtype_name)
def test_the_qk_rms_norms_of_a_half_precision_model_compute_in_float32(tiny_float32, dtype):
    model = half_copy(tiny_float32, dtype)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    checked = []

    def hook(module, args, out):
        (x,) = args
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.eps)
        assert torch.equal(out, normed.to(dtype) * module.weight)
        checked.append(module)

    for m in norms:
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(*inputs(model))
    assert len(set(map(id, checked))) == len(norms) > 0


def test_a_float32_model_is_unchanged_by_the_half_precision_path(tiny_float32):
    # No autocast and plain layer norm arithmetic in float32.
    latents, timesteps, ctx = inputs(tiny_float32)
    seen = []
    tiny_float32.proj_out.register_forward_hook(lambda m, a, out: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.no_grad():
        out = tiny_float32(latents, timesteps, ctx)
    assert out.dtype == torch.float32 and seen == [False]
    x = torch.randn(4, tiny_float32.width)
    norm = tiny_float32.temporal_transformer_blocks[0].norm1
    assert torch.equal(norm(x), F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))


# -- camera scalars ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=dtype_name)
def test_camera_scalars_enter_their_sinusoids_in_float32(tiny_float32, dtype):
    model = half_copy(tiny_float32, dtype)
    cameras = torch.zeros(2, 11)
    cameras[:, 0] = 10.0
    cameras[:, 8] = torch.tensor([1.524, 1.525])  # tx: equal in bfloat16, not in float32
    assert cameras[0, 8].to(torch.bfloat16) == cameras[1, 8].to(torch.bfloat16)
    into_mlp = []
    model.view_embedding.register_forward_pre_hook(lambda m, args: into_mlp.append(args[0]))
    layout = torch.zeros(2, 6, H, W)
    text = TextEmbedding(torch.zeros(2, 4, model.context_embedder.in_features),
                         torch.zeros(2, model.time_text_embed.text_embedder.linear_1.in_features))
    with torch.no_grad():
        # Given in float64, as the rig computes them: taken as float32, never rounded to `dtype`.
        ctx = model.frame_context(layout, cameras.double(), text)
    frequencies = model.view_cam_proj.num_channels
    sinusoids = get_timestep_embedding(cameras.flatten(), frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(into_mlp[0], sinusoids.to(dtype).reshape(2, -1))
    assert not torch.equal(into_mlp[0][0], into_mlp[0][1])
    assert not torch.equal(ctx["camera_embedding"][0], ctx["camera_embedding"][1])


def test_the_pipeline_hands_the_model_float32_camera_scalars():
    cfg = compose({**SMALL, "model.dtype": "bfloat16"})
    model = StreamingPipeline.build_model(cfg)
    frame = packed_drive(cfg, 1)[0][0].unpack()
    frame.camera_params[:, 8] = torch.tensor([1.524, 1.525, 1.526])
    scalars = []
    model.denoiser.view_cam_proj.register_forward_pre_hook(lambda m, args: scalars.append(args[0]))
    text = model.text_encoder.encode(frame.captions)
    frame_contexts(model.denoiser, None, frame, text, (64, 96), torch.device("cpu"), torch.bfloat16)
    assert scalars[0].dtype == torch.float32
    assert torch.equal(scalars[0], frame.camera_params.float().flatten())


# -- the temporal and cross-view attention ---------------------------------------------------


def test_axial_qk_rms_norm_eps_is_diffusers_attention_default(tiny_float32):
    assert inspect.signature(Attention.__init__).parameters["eps"].default == AXIAL_QK_NORM_EPS == 1e-5
    axial = [*tiny_float32.temporal_transformer_blocks, *tiny_float32.crossview_transformer_blocks]
    assert axial
    for block in axial:
        assert block.attn1.norm_q.eps == block.attn1.norm_k.eps == 1e-5
    # The MMDiT blocks keep SD3's own q/k eps.
    for block in tiny_float32.transformer_blocks:
        assert block.attn.norm_q.eps == 1e-6
