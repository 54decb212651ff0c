"""Frame-loop overhead and memory: the whole loop per frame against the bare model calls it makes.

    python -m bench.bench_loop                  # 60 frames, default config
    python -m bench.bench_loop --frames 1000    # also shows whether memory stays flat
    python -m bench.bench_loop world.map=roundabout pipeline.bands=2

One frame of the loop = observe + conditions + text + frame context + queue shift (its s
denoiser calls) + VAE decode + compose + H.264 encode + world tick. The baseline, measured in
the same run on the same inputs, is the bare model work of a frame: the model's frame context
(layout adapter, camera and prompt embeddings: once per frame), the s denoiser calls on the
same batch and one VAE decode, back to back. Overhead = loop / bare - 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from dwm.conditions.builder import ConditionBuilder
from dwm.config import compose, condition_fps, instantiate
from dwm.pipelines.streaming import StreamingPipeline
from dwm.session import DrivingSession
from dwm.video.compose import compose_strip
from dwm.video.encoder import VideoEncoder


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Recorder:
    """Wraps a callable, recording its arguments once and its wall time on every call."""

    def __init__(self, fn):
        self.fn, self.seconds, self.last_args = fn, 0.0, None

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.last_args = (args, kwargs)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="frames to time after the warm-up")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    cfg = compose(args.overrides)
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    pipeline = StreamingPipeline.from_config(cfg, views=builder.num_views)
    session = DrivingSession.start(world, builder, pipeline.depth, ego_id="bench", autopilot=True)
    denoise = Recorder(pipeline.denoiser.forward)
    context = Recorder(pipeline.denoiser.frame_context)
    decode = Recorder(pipeline.decoder.decode)
    pipeline.denoiser.forward = denoise
    pipeline.denoiser.frame_context = context
    pipeline.decoder.decode = decode

    loop_times: list[float] = []
    model_times: list[float] = []
    memory: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp, VideoEncoder.from_config(
        cfg.stream, os.path.join(tmp, "bench.mp4"), fps=condition_fps(cfg)
    ) as publisher:
        while pipeline.warming:  # fill and warm the queue, untimed
            session.step(world, pipeline)
            world.tick()
        for n in range(1, args.frames + 1):
            denoise.seconds = context.seconds = decode.seconds = 0.0
            start = time.perf_counter()
            for frame in session.step(world, pipeline):
                layout = frame.conditions.layout if cfg.stream.overlay else None
                publisher.publish(compose_strip(frame.images, layout), frame.conditions.sim_time)
            world.tick()
            loop_times.append(time.perf_counter() - start)
            model_times.append(denoise.seconds + context.seconds + decode.seconds)
            if n in (1, 100, 250, 500, 1000) or n == args.frames:
                memory[n] = rss_mb()
                print(f"frame {n}: RSS {memory[n]:.1f} MB", file=sys.stderr, flush=True)

    # The bare baseline: the same model calls of one frame, back to back, on the last inputs.
    (d_args, d_kwargs), (v_args, v_kwargs) = denoise.last_args, decode.last_args
    c_args, c_kwargs = context.last_args
    bare: list[float] = []
    with torch.inference_mode():
        for _ in range(min(args.frames, 30)):
            start = time.perf_counter()
            context.fn(*c_args, **c_kwargs)
            for _ in range(pipeline.queue.steps_per_shift):
                denoise.fn(*d_args, **d_kwargs)
            decode.fn(*v_args, **v_kwargs)
            bare.append(time.perf_counter() - start)

    loop_ms = statistics.median(loop_times) * 1e3
    inside_ms = statistics.median(model_times) * 1e3
    bare_ms = statistics.median(bare) * 1e3
    print(f"\nframe loop, {cfg.model.name} model, {builder.num_views} views, "
          f"N={cfg.pipeline.steps} T={cfg.pipeline.window} B={cfg.pipeline.bands} "
          f"guidance={cfg.pipeline.guidance}, {args.frames} frames, median per frame")
    print(f"| {'what':<46} | {'ms':>8} | {'vs bare':>8} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|")
    print(f"| {'bare model calls (context, s denoiser, decode)':<46} | {bare_ms:8.1f} | {1.0:8.2f} |")
    print(f"| {'model calls inside the loop':<46} | {inside_ms:8.1f} | {inside_ms / bare_ms:8.2f} |")
    print(f"| {'whole loop per frame':<46} | {loop_ms:8.1f} | {loop_ms / bare_ms:8.2f} |")
    print(f"\nloop overhead: {100 * (loop_ms / bare_ms - 1):.1f}% of the bare model time "
          f"({100 * (loop_ms - inside_ms) / loop_ms:.1f}% of the loop outside model calls); "
          f"target <= 10%")
    print("\nresident memory")
    print(f"| {'frame':>6} | {'RSS MB':>8} |")
    print(f"|{'-' * 8}|{'-' * 10}|")
    for n, mb in memory.items():
        print(f"| {n:>6} | {mb:8.1f} |")
    if 100 in memory and args.frames >= 1000:
        change = 100 * (memory[args.frames] / memory[100] - 1)
        print(f"\nRSS change from frame 100 to frame {args.frames}: {change:+.1f}% (target within 5%)")
    world.close()


if __name__ == "__main__":
    main()
