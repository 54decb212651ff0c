"""CTSD 3.5 XS: the cross-view temporal SD3 MMDiT of the released model, at any size.

`model=ctsd_35_xs` builds it at the released size (12 layers, width 1280, about 2.1 B
parameters) and loads the released checkpoint, whose keys are this module tree's names
exactly; `model=tiny`, the embedded default, is the same code at a tiny size with seeded
random weights, so the pipeline, the queue and the serving layer cannot tell them apart
except by speed and picture quality.

The structure (built from diffusers' SD3 pieces): an SD3.5 MMDiT (joint image/text attention,
a second image self-attention in the dual-attention layers, RMS q/k norms, adaLN-zero with a
timestep per image, so per frame and view); a layout image adapter whose features are added
to the image tokens before the first blocks; a camera embedding of the 11 camera scalars;
after every block a temporal attention block (each spatial token across the window's frames)
and after the odd blocks a row-wise cross-view attention block (each token row across the
views), both mixed in with learned sigmoid factors.

Shapes, for one forward: latents (N, T, V, C, h, w) are flattened to B = N*T*V images; each
image is S = (h/p)*(w/p) tokens of width D; prompts are L tokens.

Precision, as the reference infers (weights float16, torch autocast on CUDA): in a half
precision dtype (float16, or bfloat16) the model runs under `torch.autocast` of its dtype, and
every LayerNorm is computed in float32 and returns float32 (`Float32LayerNorm`; CUDA's
autocast does that for layer_norm, the CPU's does not, so it is made explicit); the q/k
RMSNorms compute their mean square in float32 themselves (diffusers' `RMSNorm`). Inputs may
come in any float dtype: the latents are cast to the model's dtype here, the timesteps and
the camera scalars enter their sinusoidal embeddings in float32. The velocity comes out in the
model's dtype; the queue takes it to float32 for its update (`dwm.pipelines.fifo`).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import (
    CombinedTimestepTextProjEmbeddings,
    PatchEmbed,
    TimestepEmbedding,
    Timesteps,
)
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.resnet import AlphaBlender
from torch import nn

from dwm.world.rig import CAMERA_PARAM_NAMES
from dwm.models.axial_blocks import AXIAL_QK_NORM_EPS, Float32LayerNorm, VTSelfAttentionBlock, float32_layer_norms
from dwm.models.base import Denoiser, FrameContext, TextEmbedding
from dwm.models.layout_adapter import LAYOUT_CHANNELS, VAE_DOWNSCALE, ImageAdapter

# Keys of a FrameContext built by `CrossviewTemporalDiT.frame_context`, with their per-frame shapes.
CONTEXT_KEYS = (
    "layout_features",  # (V, K, S, D): the adapter's residual for each of the first K blocks
    "prompt_tokens",  # (V, L, D): prompt tokens after `context_embedder`
    "pooled_embedding",  # (V, D): pooled prompt after `time_text_embed.text_embedder`
    "camera_embedding",  # (V, D): the 11 camera scalars through sinusoids and an MLP
)

__all__ = ["AXIAL_QK_NORM_EPS", "CONTEXT_KEYS", "CrossviewTemporalDiT", "Float32LayerNorm", "ImageAdapter"]


class CrossviewTemporalDiT(Denoiser):
    """The cross-view temporal MMDiT of CTSD 3.5 XS, at the size its arguments give.

    Constructor arguments are the config keys (conf/model/tiny.yaml, ctsd_35_xs.yaml). `seed`
    fixes every random weight: the same seed builds identical weights. `joint_attention_dim`
    and `pooled_projection_dim` must match the text encoder's token and pooled widths.
    crossview_attention_mask: optional V x V (1: view i attends to view j), e.g. the training
    rig's [[1,1,0],[1,1,1],[0,1,1]]; None: every view attends to every view (the reference's
    streaming). zero_init_adapter: see `ImageAdapter`.
    """

    def __init__(
        self,
        seed: int = 0,
        num_layers: int = 2,
        num_attention_heads: int = 2,
        attention_head_dim: int = 16,
        latent_channels: int = 16,
        patch_size: int = 2,
        sample_size: int = 32,
        pos_embed_max_size: int = 64,
        joint_attention_dim: int = 64,
        pooled_projection_dim: int = 32,
        qk_norm: str | None = "rms_norm",
        dual_attention_layers: list[int] | None = None,
        adapter_layers: int = 2,
        camera_frequencies: int = 32,
        temporal_layers: list[int] | None = None,
        crossview_layers: list[int] | None = None,
        axial_ff_mult: int = 2,
        merge_factor: float = 2.0,
        adapter_res_blocks: int = 2,
        zero_init_adapter: bool = False,
        crossview_attention_mask: list[list[int]] | None = None,
    ):
        super().__init__()
        every_layer = list(range(num_layers))
        temporal_layers = every_layer if temporal_layers is None else list(temporal_layers)
        crossview_layers = every_layer[1::2] if crossview_layers is None else list(crossview_layers)
        dual_attention_layers = (
            every_layer if dual_attention_layers is None else list(dual_attention_layers)
        )
        for key, layers in (
            ("temporal_layers", temporal_layers),
            ("crossview_layers", crossview_layers),
            ("dual_attention_layers", dual_attention_layers),
        ):
            if any(i not in every_layer for i in layers):
                raise ValueError(
                    f"{key}={layers}: every entry must be a block index in [0, {num_layers})"
                )
        if not 0 <= adapter_layers <= num_layers:
            raise ValueError(
                f"adapter_layers={adapter_layers}: must be in [0, num_layers={num_layers}]"
            )

        self.crossview_attention_mask = _parse_view_mask(crossview_attention_mask)
        self.latent_channels = latent_channels
        self.patch_size = patch_size
        self.adapter_layers = adapter_layers
        self.temporal_layers = temporal_layers
        self.crossview_layers = crossview_layers
        width = num_attention_heads * attention_head_dim
        self.width = width

        def axial_block() -> VTSelfAttentionBlock:
            return VTSelfAttentionBlock(
                width, num_attention_heads, attention_head_dim, axial_ff_mult, qk_norm
            )

        def index_embedding() -> TimestepEmbedding:
            return TimestepEmbedding(width, width * 4, out_dim=width)

        # Build under a private RNG so that the seed alone fixes the weights and the caller's
        # global RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # A sin-cos table for pos_embed_max_size^2 tokens, centre-cropped to each input.
            self.pos_embed = PatchEmbed(
                height=sample_size,
                width=sample_size,
                patch_size=patch_size,
                in_channels=latent_channels,
                embed_dim=width,
                pos_embed_max_size=pos_embed_max_size,
            )
            self.time_text_embed = CombinedTimestepTextProjEmbeddings(width, pooled_projection_dim)
            self.context_embedder = nn.Linear(joint_attention_dim, width)
            # The last block only reads the prompt tokens (no text update after it), as in SD3.
            self.transformer_blocks = nn.ModuleList(
                JointTransformerBlock(
                    dim=width,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=i == num_layers - 1,
                    qk_norm=qk_norm,
                    use_dual_attention=i in dual_attention_layers,
                )
                for i in range(num_layers)
            )
            self.norm_out = AdaLayerNormContinuous(
                width, width, elementwise_affine=False, eps=1e-6
            )
            self.proj_out = nn.Linear(width, patch_size * patch_size * latent_channels)

            self.condition_image_adapter = ImageAdapter(
                width, adapter_layers, patch_size, adapter_res_blocks, zero_init_adapter
            )
            # Each camera scalar -> sinusoid of `camera_frequencies` channels -> MLP to D.
            self.view_cam_proj = Timesteps(
                camera_frequencies, flip_sin_to_cos=True, downscale_freq_shift=0
            )
            self.view_embedding = TimestepEmbedding(
                camera_frequencies * len(CAMERA_PARAM_NAMES), width
            )
            # Frame / view indices -> sinusoid of D channels, then a per-layer MLP.
            self.index_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
            # Temporal and cross-view branches, each mixed in as sigmoid(m)*x + (1-sigmoid(m))*y.
            self.time_pos_embeds = nn.ModuleList(index_embedding() for _ in temporal_layers)
            self.temporal_transformer_blocks = nn.ModuleList(
                axial_block() for _ in temporal_layers
            )
            self.time_mixers = nn.ModuleList(
                AlphaBlender(merge_factor, "learned") for _ in temporal_layers
            )
            self.view_pos_embeds = nn.ModuleList(index_embedding() for _ in crossview_layers)
            self.crossview_transformer_blocks = nn.ModuleList(
                axial_block() for _ in crossview_layers
            )
            self.view_mixers = nn.ModuleList(
                AlphaBlender(merge_factor, "learned") for _ in crossview_layers
            )
        float32_layer_norms(self)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (the model's dtype)."""
        return self.context_embedder.weight.dtype

    def _precision(self) -> contextlib.AbstractContextManager:
        """Autocast to the model's dtype when it is half precision (float16, bfloat16), as the
        reference runs its float16 weights; nothing in float32."""
        param = self.context_embedder.weight
        if param.dtype not in (torch.float16, torch.bfloat16):
            return contextlib.nullcontext()
        return torch.autocast(param.device.type, dtype=param.dtype)

    @torch.no_grad()
    def frame_context(
        self, layout: torch.Tensor, camera_params: torch.Tensor, text: TextEmbedding
    ) -> FrameContext:
        """Per-frame work, done once in the frame's life (see `CONTEXT_KEYS` for the result).

        layout (V, 6, H, W) in [0, 1], H and W multiples of 8 * patch_size; camera_params
        (V, 11), see `CAMERA_PARAM_NAMES`; text: V prompts, tokens (V, L, joint_attention_dim)
        and pooled (V, pooled_projection_dim). Inputs may live on any device; the context
        lives on the model's device and dtype. The camera scalars enter their sinusoids in
        float32 whatever dtype they come in or the model has (in bfloat16 tx = 1.524 would be
        1.5234); the sinusoids (V*11, F) are then cast to the model's dtype. Views are
        independent here, so contexts built frame by frame and stacked equal one built for the
        whole stack.
        No autograd graph: a context lives across many denoising steps.
        """
        views = layout.shape[0]
        multiple = VAE_DOWNSCALE * self.patch_size
        if (
            layout.ndim != 4
            or layout.shape[1] != LAYOUT_CHANNELS
            or layout.shape[2] % multiple
            or layout.shape[3] % multiple
        ):
            raise ValueError(
                f"layout has shape {tuple(layout.shape)}; expected (V, {LAYOUT_CHANNELS}, H, W) "
                f"with H and W multiples of {multiple}"
            )
        if camera_params.shape != (views, len(CAMERA_PARAM_NAMES)):
            raise ValueError(
                f"camera_params has shape {tuple(camera_params.shape)}; expected ({views}, "
                f"{len(CAMERA_PARAM_NAMES)}): one row of {CAMERA_PARAM_NAMES} per view"
            )
        if text.tokens.ndim != 3 or text.pooled.ndim != 2:
            raise ValueError(
                f"text has tokens {tuple(text.tokens.shape)} and pooled "
                f"{tuple(text.pooled.shape)}; expected (P, L, D) and (P, D_pooled)"
            )
        if text.tokens.shape[0] != views or text.pooled.shape[0] != views:
            raise ValueError(
                f"text has {text.tokens.shape[0]} token rows and {text.pooled.shape[0]} pooled "
                f"rows; expected one prompt per view ({views})"
            )
        widths = (text.tokens.shape[-1], text.pooled.shape[-1])
        expected = (
            self.context_embedder.in_features,
            self.time_text_embed.text_embedder.linear_1.in_features,
        )
        if widths != expected:
            raise ValueError(
                f"text widths (tokens, pooled) = {widths} do not match the denoiser's "
                f"(joint_attention_dim, pooled_projection_dim) = {expected}"
            )
        param = self.context_embedder.weight
        layout, tokens, pooled = (
            x.to(param.device, param.dtype) for x in (layout, text.tokens, text.pooled)
        )
        scalars = camera_params.to(param.device, torch.float32).flatten()  # (V*11,)
        camera = self.view_cam_proj(scalars).to(param.dtype)  # (V*11, F)
        with self._precision():
            return {
                "layout_features": self.condition_image_adapter(layout),
                "prompt_tokens": self.context_embedder(tokens),
                "pooled_embedding": self.time_text_embed.text_embedder(pooled),
                "camera_embedding": self.view_embedding(camera.reshape(views, -1)),
            }

    def regions(self) -> list[nn.Module]:
        """The repeated blocks, the units `model.compile` compiles (see `dwm.models.compiled`)."""
        return [*self.transformer_blocks, *self.temporal_transformer_blocks, *self.crossview_transformer_blocks]

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: FrameContext
    ) -> torch.Tensor:
        """Velocity for N windows of T frames of V views.

        latents (N, T, V, C, h, w), any float dtype (the queue's float32), cast to the model's
        dtype here; timesteps (N, T, V) = sigma * 1000, each image gets its own adaLN
        modulation, their sinusoids computed in float32; context: `frame_context` results
        stacked into (N, T, V, ...) tensors. Returns (N, T, V, C, h, w) in the model's dtype.
        """
        n, t, v, c, h, w = self._check_inputs(latents, timesteps, context)
        with self._precision():
            return self._forward(latents.to(self.dtype), timesteps, context, n, t, v, c, h, w)

    def _forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: FrameContext,
        n: int, t: int, v: int, c: int, h: int, w: int,
    ) -> torch.Tensor:
        p = self.patch_size
        hp, wp = h // p, w // p
        batch = n * t * v
        ctx = {key: context[key].flatten(0, 2) for key in CONTEXT_KEYS}

        hidden = self.pos_embed(latents.reshape(batch, c, h, w)).contiguous()  # (B, S, D)
        # One timestep per image: each image gets its own adaLN modulation. The pooled-text
        # half of SD3's `time_text_embed` was done in frame_context. temb (B, D).
        time_proj = self.time_text_embed.time_proj(timesteps.reshape(batch)).to(hidden.dtype)
        temb = self.time_text_embed.timestep_embedder(time_proj) + ctx["pooled_embedding"]
        prompt = ctx["prompt_tokens"]  # (B, L, D)
        camera = ctx["camera_embedding"].view(n, t, v, 1, -1)
        # Window-relative frame indices 0..T-1 and view indices 0..V-1: (T, D), (V, D).
        frame_index = self.index_proj(torch.arange(t, device=hidden.device)).to(hidden.dtype)
        view_index = self.index_proj(torch.arange(v, device=hidden.device)).to(hidden.dtype)

        view_mask = self._view_mask(v, wp, hidden)  # (V*wp, V*wp) or None

        for i, block in enumerate(self.transformer_blocks):
            if i < self.adapter_layers:
                hidden = hidden + ctx["layout_features"][:, i]
            prompt, hidden = block(hidden_states=hidden, encoder_hidden_states=prompt, temb=temb)
            if i in self.temporal_layers:
                k = self.temporal_layers.index(i)
                emb = self.time_pos_embeds[k](frame_index).view(1, t, 1, 1, -1) + camera
                mixed = self._temporal(self.temporal_transformer_blocks[k], hidden, emb, n, t, v)
                hidden = self.time_mixers[k](hidden, mixed)
            if i in self.crossview_layers:
                k = self.crossview_layers.index(i)
                emb = self.view_pos_embeds[k](view_index).view(1, 1, v, 1, -1) + camera
                block_v = self.crossview_transformer_blocks[k]
                mixed = self._crossview(block_v, hidden, emb, n * t, v, hp, wp, view_mask)
                hidden = self.view_mixers[k](hidden, mixed)

        hidden = self.proj_out(self.norm_out(hidden, temb))  # (B, S, p*p*C)
        hidden = hidden.reshape(n, t, v, hp, wp, p, p, c)
        return torch.einsum("ntvhwpqc->ntvchpwq", hidden).reshape(n, t, v, c, h, w)

    def _view_mask(self, v: int, wp: int, like: torch.Tensor) -> torch.Tensor | None:
        """The cross-view mask as an additive (V*wp, V*wp) float mask over a row's tokens."""
        if self.crossview_attention_mask is None:
            return None
        allowed = self.crossview_attention_mask
        if allowed.shape != (v, v):
            raise ValueError(f"crossview_attention_mask is {tuple(allowed.shape)}, but the window has {v} views")
        allowed = allowed.to(like.device).repeat_interleave(wp, 0).repeat_interleave(wp, 1)
        mask = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
        return mask.masked_fill_(~allowed, float("-inf"))

    @staticmethod
    def _temporal(
        block: VTSelfAttentionBlock, hidden: torch.Tensor, emb: torch.Tensor, n: int, t: int, v: int
    ) -> torch.Tensor:
        """Each spatial token attends across the window's T frames (no causal mask).

        hidden (N*T*V, S, D); emb (N, T, V, 1, D): frame index + camera embedding.
        """
        s, d = hidden.shape[1:]
        x = hidden.reshape(n, t, v, s, d) + emb
        x = x.permute(0, 2, 3, 1, 4).reshape(n * v * s, t, d)
        x = block(x)
        return x.view(n, v, s, t, d).permute(0, 3, 1, 2, 4).reshape(n * t * v, s, d)

    @staticmethod
    def _crossview(
        block: VTSelfAttentionBlock,
        hidden: torch.Tensor,
        emb: torch.Tensor,
        nt: int,
        v: int,
        hp: int,
        wp: int,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Row-wise cross-view attention: each token row attends to the same row in all views
        (those `mask` allows).

        hidden (N*T*V, hp*wp, D); emb (N, T, V, 1, D): view index + camera embedding;
        mask: additive (V*wp, V*wp) or None.
        """
        d = hidden.shape[-1]
        x = hidden.reshape(nt, v, hp * wp, d) + emb.reshape(nt, v, 1, d)
        x = x.view(nt, v, hp, wp, d).permute(0, 2, 1, 3, 4).reshape(nt * hp, v * wp, d)
        x = block(x, None if mask is None else mask.expand(nt * hp, -1, -1))
        return x.view(nt, hp, v, wp, d).permute(0, 2, 1, 3, 4).reshape(nt * v, hp * wp, d)

    def _check_inputs(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: FrameContext
    ) -> tuple[int, ...]:
        # Shape checks only: they read Python ints and never synchronise with the device.
        if latents.ndim != 6 or latents.shape[3] != self.latent_channels:
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}; "
                f"expected (N, T, V, {self.latent_channels}, h, w)"
            )
        n, t, v, c, h, w = latents.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"latent size {h}x{w} must be a multiple of patch_size={self.patch_size}"
            )
        if timesteps.shape != (n, t, v):
            raise ValueError(
                f"timesteps has shape {tuple(timesteps.shape)}; expected (N, T, V) = {(n, t, v)}"
            )
        missing = [key for key in CONTEXT_KEYS if key not in context]
        if missing:
            raise ValueError(
                f"context lacks {missing}; build it with frame_context (keys {CONTEXT_KEYS})"
            )
        for key in CONTEXT_KEYS:
            if context[key].shape[:3] != (n, t, v):
                raise ValueError(
                    f"context[{key!r}] has shape {tuple(context[key].shape)}; "
                    f"expected leading (N, T, V) = {(n, t, v)}"
                )
        tokens = (h // self.patch_size) * (w // self.patch_size)
        if context["layout_features"].shape[4] != tokens:
            raise ValueError(
                f"the layout gives {context['layout_features'].shape[4]} tokens per image but "
                f"{h}x{w} latents have {tokens}: layout images must be {VAE_DOWNSCALE}x the "
                f"latent size ({VAE_DOWNSCALE * h}x{VAE_DOWNSCALE * w})"
            )
        return n, t, v, c, h, w


def _parse_view_mask(mask: list[list[int]] | None) -> torch.Tensor | None:
    """A V x V list of 0/1 -> bool tensor; each view must at least attend to itself."""
    if mask is None:
        return None
    allowed = torch.tensor(mask)
    if allowed.ndim != 2 or allowed.shape[0] != allowed.shape[1] or not bool(((allowed == 0) | (allowed == 1)).all()):
        raise ValueError(f"crossview_attention_mask={mask}: must be a V x V list of 0 and 1")
    allowed = allowed.bool()
    if not bool(allowed.diagonal().all()):
        raise ValueError(f"crossview_attention_mask={mask}: every view must attend to itself (1 on the diagonal)")
    return allowed
