"""What a driver joining costs the drivers already there: their frame interval while a new
session warms up its queue, against steady state, in one process (`push_many`, as the
QueueServer runs a round).

    python -m bench.bench_join                          # 2 sessions running, a 3rd joins
    python -m bench.bench_join --running 4 --rounds 12 pipeline.steps=12 pipeline.window=3

Rounds of k sessions are timed in steady state; then one session joins and the L rounds of
its warm-up are timed; then the k + 1 sessions' steady state. A round is one frame of every
running session, so its time is their frame interval. The join stall is the slowest round
of the warm-up over the steady round of k + 1 sessions (target <= 1.25).

Baseline, in the same run: the reference's start (gather T frames, then a 24-call warm-up
in one go), as a shared round would run it: the joining round's s calls with everybody, then
the newcomer's N - s calls alone; timed here as one round of k + 1 sessions plus N - s calls
of one session. Also: the share of a round spent outside model work (denoiser calls, frame
contexts, VAE decode): the loop's own cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dwm.conditions.builder import ConditionBuilder
from dwm.config import compose, instantiate
from dwm.pipelines.streaming import StreamingPipeline, push_many


class Timed:
    """Wraps a bound method and adds its seconds up."""

    def __init__(self, owner, name: str):
        self.seconds, self._fn = 0.0, getattr(owner, name)
        self._owner, self._name, self._had = owner, name, name in vars(owner)
        setattr(owner, name, self)

    def restore(self) -> None:
        if self._had:
            setattr(self._owner, self._name, self._fn)
        else:
            delattr(self._owner, self._name)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def drive(cfg, egos: int, frames: int) -> list[list]:
    """Conditions of `egos` cars over `frames` ticks: out[k][i] is car k's frame i."""
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    cars = [world.add_ego() for _ in range(egos)]
    for car in cars:
        world.set_autopilot(car, True)
    out: list[list] = [[] for _ in cars]
    for _ in range(frames):
        for k, car in enumerate(cars):
            out[k].append(builder.build(world.observe(car)))
        world.tick()
    world.close()
    return out


def measure_join(cfg, model, running: int = 2, rounds: int = 8) -> dict:
    """Rounds of `running` sessions, then one joining, then all of them (see the module).

    model: the `ModelParts` to run (its denoiser, frame_context and decoder are timed here).
    Returns seconds: steady_k, steady (k + 1 sessions), worst_join, mean_join, reference_join,
    first_frame (the newcomer's, from its first push), and loop_share (the fraction of a
    steady round outside model work); rounds_to_first (L)."""
    p = cfg.pipeline
    length = p.window * p.bands
    calls_per_push = p.steps // length
    denoise = Timed(model.denoiser, "forward")
    contexts = Timed(model.denoiser, "frame_context")
    decode = Timed(model.decoder, "decode")
    views = ConditionBuilder.from_config(cfg).num_views
    warm = length + 1  # pushes until a queue gives a frame every round
    total = warm + rounds + length + rounds
    scenes = drive(cfg, running + 1, total)
    queues = [StreamingPipeline.from_config(cfg, views, model=model, seed=k) for k in range(running + 1)]
    sync = torch.cuda.synchronize if torch.device(cfg.device).type == "cuda" else (lambda: None)

    def round_(active: list[int], i: int) -> tuple[float, float, int]:
        denoise.seconds = contexts.seconds = decode.seconds = 0.0
        start = time.perf_counter()
        out = push_many([(queues[k], scenes[k][i]) for k in active])
        sync()
        took = time.perf_counter() - start
        return took, took - denoise.seconds - contexts.seconds - decode.seconds, sum(map(len, out))

    try:
        sessions = list(range(running))
        i = 0
        for _ in range(warm):  # the first sessions' warm-up, untimed
            round_(sessions, i)
            i += 1
        before = []
        for _ in range(rounds):
            before.append(round_(sessions, i))
            i += 1
        joining, first_frame, waited = [], None, 0.0
        for _ in range(length):
            took, loop, frames = round_(sessions + [running], i)
            joining.append((took, loop, frames))
            waited += took
            if frames == running + 1 and first_frame is None:
                first_frame = waited
            i += 1
        after = []
        for _ in range(rounds):
            after.append(round_(sessions + [running], i))
            i += 1

        # The baseline's extra calls: N - s calls of one session alone, timed now.
        alone = StreamingPipeline.from_config(cfg, views, model=model, seed=99)
        shift = alone._begin(scenes[running][0])
        x, t, c = alone.step.inputs(shift.latents, shift.timesteps[0], shift.grid)
        with torch.inference_mode():
            model.denoiser(x, t, c)  # warm
            sync()
            start = time.perf_counter()
            for _ in range(p.steps - calls_per_push):
                model.denoiser(x, t, c)
            sync()
            extra = time.perf_counter() - start
    finally:
        for timed in (denoise, contexts, decode):
            timed.restore()

    steady = statistics.median(r[0] for r in after)
    return {
        "steady_k": statistics.median(r[0] for r in before), "steady": steady,
        "worst_join": max(r[0] for r in joining), "mean_join": statistics.mean(r[0] for r in joining),
        "reference_join": steady + extra, "first_frame": first_frame, "rounds_to_first": length,
        "extra_calls": p.steps - calls_per_push, "loop_share": statistics.median(r[1] / r[0] for r in after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", type=int, default=2, help="sessions already driving")
    parser.add_argument("--rounds", type=int, default=8, help="steady rounds timed before and after the join")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    p = cfg.pipeline
    r = measure_join(cfg, StreamingPipeline.build_model(cfg), args.running, args.rounds)
    steady = r["steady"]
    rows = [
        ("steady round, k sessions (ms)", f"{1e3 * r['steady_k']:.1f}", ""),
        ("steady round, k + 1 sessions (ms)", f"{1e3 * steady:.1f}", ""),
        ("slowest round while one joins (ms)", f"{1e3 * r['worst_join']:.1f}", f"{r['worst_join'] / steady:.2f} x steady (target <= 1.25)"),
        ("mean round while one joins (ms)", f"{1e3 * r['mean_join']:.1f}", ""),
        ("reference start: its joining round (ms)", f"{1e3 * r['reference_join']:.1f}", f"{r['reference_join'] / steady:.2f} x steady"),
        ("newcomer's first frame after (ms)", f"{1e3 * (r['first_frame'] or float('nan')):.1f}",
         f"{r['rounds_to_first']} rounds; the reference start: {r['rounds_to_first']} rounds + {r['extra_calls']} calls"),
        ("round outside model work", f"{100 * r['loop_share']:.1f} %", "of a steady round (target <= 2 %)"),
    ]
    print(f"k = {args.running} sessions driving, one joins; N={p.steps} T={p.window} B={p.bands} "
          f"(s={p.steps // (p.window * p.bands)}), model={cfg.model.name}, device={cfg.device}, "
          f"torch threads {torch.get_num_threads()}")
    print()
    print("| | value | |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
