"""CTSD 3.5 XS model calls: time per call, peak memory and achieved FLOP/s, random weights.

    python -m bench.bench_model                           # CPU: a reduced size (2 layers, width 320)
    python -m bench.bench_model --size real --device cuda --dtype float16   # on a GPU
    python -m bench.bench_model --size real --device cuda --peak-tflops 989  # and MFU

One call is what the queue makes per denoising step at the reference settings: 3 views
176x304 (latents 22x38, 209 tokens per image), a window of T=6 frames, classifier-free
guidance on, so 2 windows = 36 images and 154 prompt tokens each. FLOPs are counted exactly
(torch's FlopCounterMode on the meta device: matmuls, attention and convolutions of this
config). The baseline, in the same run on the same device and dtype, is one large square
matmul: the ratio says how much of what this device reaches on plain matmuls the model gets.

Per output frame the queue makes s = 4 such calls (B=1, N=24) and one frame context (the
layout adapter and embeddings of 2 x 3 images, computed once per frame); the reference
recomputes the adapter for all 36 images in each of its 4 calls: both costs are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dwm.config import compose, instantiate
from dwm.models.base import TextEmbedding
from dwm.models.compiled import compile_denoiser

SIZES = {
    "real": [],
    "reduced": ["model.denoiser.num_layers=2", "model.denoiser.num_attention_heads=5", "model.denoiser.adapter_layers=2"],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GUIDED, WINDOW, VIEWS, HEIGHT, WIDTH = 2, 6, 3, 176, 304


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inputs(model, device, dtype, views: int = VIEWS, rows: int = GUIDED):
    """A call's latents (rows, T, V, 16, h, w), timesteps and a stacked frame context."""
    g = torch.Generator().manual_seed(0)
    layout = (torch.rand(views, 6, HEIGHT, WIDTH, generator=g) > 0.9).float()
    text = TextEmbedding(
        torch.randn(views, 154, model.context_embedder.in_features, generator=g),
        torch.randn(views, model.time_text_embed.text_embedder.linear_1.in_features, generator=g),
    )
    with torch.inference_mode():
        ctx = model.frame_context(layout.to(device), torch.rand(views, 11, generator=g).to(device), text)
    ctx = {k: v.expand(rows, WINDOW, *v.shape).contiguous() for k, v in ctx.items()}
    latents = torch.randn(rows, WINDOW, views, 16, HEIGHT // 8, WIDTH // 8, generator=g).to(device, dtype)
    timesteps = torch.linspace(10, 1000, rows * WINDOW * views).reshape(rows, WINDOW, views).to(device)
    return (layout, text), (latents, timesteps, ctx)


def count_flops(cfg) -> tuple[float, float, float]:
    """FLOPs of one call (36 images), of one frame context (6 images) and of the adapter on 36."""
    with torch.device("meta"):
        model = instantiate(cfg, "model.denoiser")
    model = model.to("meta")  # parameters made outside the device context too
    (layout, text), (latents, timesteps, ctx) = inputs(model, torch.device("meta"), torch.float32)
    counts = []
    for fn in (
        lambda: model(latents, timesteps, ctx),
        lambda: model.frame_context(layout.to("meta").repeat(GUIDED, 1, 1, 1), torch.zeros(GUIDED * VIEWS, 11, device="meta"),
                                    TextEmbedding(text.tokens.to("meta").repeat(GUIDED, 1, 1), text.pooled.to("meta").repeat(GUIDED, 1))),
        lambda: model.condition_image_adapter(torch.zeros(GUIDED * WINDOW * VIEWS, 6, HEIGHT, WIDTH, device="meta")),
    ):
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            fn()
        counts.append(float(counter.get_total_flops()))
    return tuple(counts)


def measure_call(cfg, device: torch.device, dtype: torch.dtype, repeats: int = 5, compile: bool = False,
                 compile_mode: str = "default", compile_backend: str = "inductor", model=None,
                 matmul_n: int | None = None) -> dict:
    """One model call at the reference settings on `device` in `dtype`, and the same-run matmul.

    cfg: a `model=ctsd_35_xs` config (its denoiser's size); model: that denoiser already built
    (random weights are drawn here otherwise). Returns call_s (median), first_s (the first call,
    with compiling), call_flops, context_flops, adapter36_flops, achieved and matmul TFLOP/s,
    matmul_n (default 8192 on CUDA, 2048 on a CPU), params, peak (text)."""
    call_flops, context_flops, adapter36_flops = count_flops(cfg)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if model is None:
        with torch.device(device):
            model = instantiate(cfg, "model.denoiser")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    if compile:
        compile_denoiser(model, compile_mode, compile_backend)
    _, (latents, timesteps, ctx) = inputs(model, device, dtype)

    def call():
        with torch.inference_mode():
            model(latents, timesteps, ctx)

    start = time.perf_counter()
    call()  # the first call: compiles, when compiled
    sync(device)
    first_s = time.perf_counter() - start
    seconds = timed(call, device, repeats, warmup=2 if compile else 0)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated (model + one call)"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = f"{rss:.0f} MB peak RSS ({rss - rss_before:+.0f} MB for model + one call)"

    n = matmul_n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_s = timed(lambda: a @ b, device, repeats)
    return {
        "call_s": seconds, "first_s": first_s, "call_flops": call_flops, "context_flops": context_flops,
        "adapter36_flops": adapter36_flops, "achieved_tflops": call_flops / seconds / 1e12,
        "matmul_tflops": 2 * n**3 / matmul_s / 1e12, "matmul_n": n, "params": params, "peak": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="reduced")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on cuda (model.dtype), float32 on cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak at --dtype, for MFU")
    parser.add_argument("--compile", action="store_true", help="compile as model.compile does (regional, bucketed)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    cfg = compose(["model=ctsd_35_xs", "model.random_weights=true", *SIZES[args.size]])
    r = measure_call(cfg, device, dtype, args.repeats, args.compile, args.compile_mode, args.compile_backend)
    seconds, achieved, matmul_tflops, n = r["call_s"], r["achieved_tflops"], r["matmul_tflops"], r["matmul_n"]
    call_flops, context_flops, adapter36_flops = r["call_flops"], r["context_flops"], r["adapter36_flops"]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), {dtype}, torch {torch.__version__}, size {args.size} "
          f"({r['params'] / 1e9:.3f} B params), compile {args.compile}"
          f"{f' ({args.compile_mode}, {args.compile_backend})' if args.compile else ''}")
    print("| what | value |")
    print("|---|---|")
    print(f"| FLOP per call (36 images, exact count) | {call_flops / 1e12:.3f} T |")
    print(f"| time per call (median of {args.repeats}) | {seconds * 1e3:.1f} ms |")
    print(f"| first call{' (with compiling)' if args.compile else ''} | {r['first_s']:.1f} s |")
    print(f"| achieved | {achieved:.3f} TFLOP/s |")
    print(f"| baseline: {n}x{n} matmul, same run | {matmul_tflops:.3f} TFLOP/s |")
    print(f"| model / matmul | {achieved / matmul_tflops:.2f} |")
    if args.peak_tflops:
        print(f"| MFU (of {args.peak_tflops:g} TFLOP/s peak) | {100 * achieved / args.peak_tflops:.1f}% |")
    print(f"| peak memory | {r['peak']} |")
    per_frame = 4 * call_flops + context_flops
    reference = 4 * (call_flops + adapter36_flops)
    print(f"| FLOP per output frame (4 calls + 1 frame context) | {per_frame / 1e12:.2f} T |")
    print(f"| the reference's per frame (adapter in every call) | {reference / 1e12:.2f} T ({reference / per_frame:.2f}x) |")
    print(f"| frames/s at this call time (B=1, N=24, 1 session) | {1 / (4 * seconds):.3f} |")


if __name__ == "__main__":
    main()
