"""What two ways of keeping a replica's memory flat cost and give: a fixed glibc mmap threshold
(the MALLOC_MMAP_THRESHOLD_ environment variable) and `malloc_trim` after every round
(`deployments.memory`, `serve.trim_every_s`), against glibc's default. The QueueServer's work (one batched push of every session's frame a
round) in child processes, the three in turn (A B C A B C ...), on the same frames.

    python -m bench.bench_malloc                          # 8 sessions, 60 rounds, 3 pairs, 131072
    python -m bench.bench_malloc --threshold 131072 --pairs 3 pipeline.steps=6 pipeline.window=3

Each child opens the sessions' queues around one model (`SessionQueues`, as the QueueServer
replica does), builds every round's conditions from one embedded world with a car per
session, pushes the rounds and reports rounds per second after the queues' warm-up and its
private resident memory (RssAnon) at the end of the warm-up and at the end. glibc reads
MALLOC_MMAP_THRESHOLD_ when a process starts, hence the children. The ratio of each pair is
the figure to read (the machine's speed drifts between them).

Measured (bench/results/soak-cpu-2core.md): the threshold keeps memory flat at half the speed,
the trim keeps it flat at the same speed; the app trims (`serve.trim_every_s`, 1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(sessions: int, rounds: int, overrides: list[str], trim: bool) -> dict:
    import torch

    from deployments.memory import trim_heap

    from deployments.queue_server import SessionQueues
    from dwm.conditions.builder import ConditionBuilder
    from dwm.config import compose, instantiate

    cfg = compose(overrides)
    threads = cfg.serve.denoiser.torch_threads
    if threads:
        torch.set_num_threads(int(threads))
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    queues = SessionQueues(cfg)
    egos = {f"s{k}": world.add_ego() for k in range(sessions)}
    depth = max(queues.open(sid, builder.num_views, seed=k) for k, sid in enumerate(egos))
    warm = depth + 2
    started = warm_rss = None
    for r in range(warm + rounds):
        if r == warm:
            started, warm_rss = time.perf_counter(), rss_anon_mb()
        frames = {sid: builder.build_packed(world.observe(ego)) for sid, ego in egos.items()}
        queues.push_many({sid: f.without_cameras() for sid, f in frames.items()})
        world.tick()
        if trim:
            trim_heap()
    took = time.perf_counter() - started
    world.close()
    return {"rounds_per_s": rounds / took, "rss_warm_mb": warm_rss, "rss_end_mb": rss_anon_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=60, help="rounds timed after the queues' warm-up")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each setting")
    parser.add_argument("--threshold", type=int, default=131072, help="MALLOC_MMAP_THRESHOLD_ of the threshold runs (bytes)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (key=value)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.sessions, args.rounds, args.overrides, args.trim)))
        return

    # name -> (MALLOC_MMAP_THRESHOLD_, malloc_trim after every round)
    settings = {"glibc default": (None, False), f"threshold {args.threshold}": (str(args.threshold), False),
                "malloc_trim every round": (None, True)}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    command = [sys.executable, "-m", "bench.bench_malloc", "--child", "--sessions", str(args.sessions),
               "--rounds", str(args.rounds), *args.overrides]
    for pair in range(args.pairs):
        for name, (threshold, trim) in settings.items():
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            if threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = threshold
            out = subprocess.run(command + ["--trim"] * trim, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"pair {pair + 1}, {name}: {runs[name][-1]}", file=sys.stderr)

    base, *others = settings
    print(f"\n{args.sessions} sessions, {args.rounds} rounds after the warm-up, {args.pairs} pairs; "
          f"overrides: {' '.join(args.overrides) or '(none)'}\n")
    print("| setting | rounds/s (median) | RssAnon end of warm-up -> end, MB (median) | growth |")
    print("|---|---|---|---|")
    for name in settings:
        rs = runs[name]
        warm = statistics.median(r["rss_warm_mb"] for r in rs)
        end = statistics.median(r["rss_end_mb"] for r in rs)
        print(f"| {name} | {statistics.median(r['rounds_per_s'] for r in rs):.3f} | {warm:.0f} -> {end:.0f} "
              f"| {100 * (end / warm - 1):+.1f} % |")
    print()
    for name in others:
        ratios = [y["rounds_per_s"] / x["rounds_per_s"] for x, y in zip(runs[base], runs[name])]
        print(f"speed with {name} / {base}, run by run: {', '.join(f'{r:.3f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
