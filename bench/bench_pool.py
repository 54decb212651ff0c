"""The denoiser pool on the CPU: B stage actors per pipeline against the queue in one process.

    python -m bench.bench_pool                       # B in {2, 4}, 1 and 4 sessions
    python -m bench.bench_pool --bands 2 --sessions 4 --rounds 200
    python -m bench.bench_pool --bands 2 4 --sessions 1 4 device=cuda model=ctsd_35_xs model.random_weights=true

Tiny model, 3 views, N=12, T=3 (so L = 3B: s = 4, 2, 1). For each B and session count, in the
same run on the same conditions: the single-process queue (`push_many` over every session's
`StreamingPipeline`, bands batched in one call), and one pipeline of B stage actors (Ray
started with B declared GPUs, one band each) run two ways: rounds as plain Ray calls, every
hand-over carried through the coordinator (`serve.stage.compiled_graph=false`, the earlier
path), and rounds as a compiled graph, stage handing to stage over shared memory (the
default). On this 2-core CPU the stages share the cores, so this measures the pool's cost,
not a GPU's gain. Throughput: frames out per second over the timed rounds, all sessions.
Latency: from a frame's conditions entering to its picture leaving, in rounds (shifts) and
seconds. Per path: the round's overhead (its wall time beyond the slowest stage's own work)
against that work, and each stage's idle fraction (the share of the rounds' wall time it
did no work). Hand-over: bytes per frame handed between stages, and the time to move one
such frame to another process, in a Ray call of its own and through a compiled graph's
channel, against one model call of a stage.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402
from ray.dag import InputNode  # noqa: E402

from deployments.stages import StagePipeline  # noqa: E402
from dwm.conditions.builder import ConditionBuilder  # noqa: E402
from dwm.conditions.packed import PackedConditions  # noqa: E402
from dwm.config import compose, instantiate  # noqa: E402
from dwm.pipelines.fifo import LatentFrame  # noqa: E402
from dwm.pipelines.stages import FrameInputs, handed_bytes  # noqa: E402
from dwm.pipelines.streaming import StreamingPipeline, push_many  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(bands: int, overrides: list[str] = ()):
    return compose([
        "pipeline.steps=12", "pipeline.window=3", f"pipeline.bands={bands}", "world.vehicles=8",
        "serve.stage.num_gpus=1", "serve.stage.num_cpus=0.1", "serve.stage.torch_threads=1", *overrides,
    ])


def conditions(cfg, sessions: int, frames: int) -> list[list[PackedConditions]]:
    """frames[i][k]: session k's conditions of round i (egos driving on autopilot)."""
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    egos = [world.add_ego() for _ in range(sessions)]
    for ego in egos:
        world.set_autopilot(ego, True)
    out = []
    for _ in range(frames):
        out.append([PackedConditions.pack(builder.build(world.observe(e))) for e in egos])
        world.tick()
    world.close()
    return out


class Timing:
    """Frames out and the latency of each, from per-round push times."""

    def __init__(self):
        self.entered: dict[tuple[str, int], float] = {}
        self.latency_s: list[float] = []
        self.frames = 0

    def pushed(self, sid: str, k: int) -> None:
        self.entered[(sid, k)] = time.perf_counter()

    def left(self, sid: str, k: int) -> None:
        self.latency_s.append(time.perf_counter() - self.entered.pop((sid, k)))
        self.frames += 1


def run_single(cfg, frames, warm: int):
    torch.set_num_threads(1)
    model = StreamingPipeline.build_model(cfg)
    sids = [f"s{k}" for k in range(len(frames[0]))]
    queues = {sid: StreamingPipeline.from_config(cfg, 3, model=model, seed=k) for k, sid in enumerate(sids)}
    timing, out_count = Timing(), {sid: 0 for sid in sids}
    start = None
    for i, row in enumerate(frames):
        if i == warm:
            start, timing.frames, timing.latency_s = time.perf_counter(), 0, []
        for sid in sids:
            timing.pushed(sid, i)
        for sid, got in zip(sids, push_many([(queues[s], c.unpack()) for s, c in zip(sids, row)])):
            for _ in got:
                timing.left(sid, out_count[sid])
                out_count[sid] += 1
    return timing.frames / (time.perf_counter() - start), timing


def run_pool(cfg, frames, warm: int):
    pool = StagePipeline(cfg)
    sids = [f"s{k}" for k in range(len(frames[0]))]
    for k, sid in enumerate(sids):
        pool.open(sid, 3, k)
    timing = Timing()
    start = None
    try:
        for i, row in enumerate(frames):
            if i == warm:
                start, timing.frames, timing.latency_s = time.perf_counter(), 0, []
                pool.handover = type(pool.handover)()  # the timed rounds only
            for sid in sids:
                timing.pushed(sid, i)
            for sid, got in pool.push_many(dict(zip(sids, row))).items():
                for index, _ in got:
                    timing.left(sid, index)
        return timing.frames / (time.perf_counter() - start), timing, pool.handover.stats()
    finally:
        pool.shutdown()


@ray.remote(num_cpus=0.1)
class Receiver:
    def receive(self, f: LatentFrame) -> int:
        return f.latent.numel()


def handover_cost(cfg, frame: PackedConditions, repeats: int = 50) -> tuple[int, float, float, float]:
    """Bytes of one handed-on frame (latent, caption embedding, compact conditions); median ms
    to move it to another process in a Ray call, and through a compiled graph's channel;
    median ms of one stage model call (guided window of one band)."""
    model = StreamingPipeline.build_model(cfg)
    latent = torch.randn(3, 16, 22, 38)
    # With its caption embedding, as a frame is handed when its session's captions change.
    handed = LatentFrame(latent, 4, FrameInputs(frame, model.text_encoder.encode(frame.captions), 0))

    def median_ms(move) -> float:
        move()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            move()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    receiver = Receiver.remote()
    call_move = median_ms(lambda: ray.get(receiver.receive.remote(handed)))
    with InputNode() as inp:
        graph = receiver.receive.bind(inp).experimental_compile()
    graph_move = median_ms(lambda: ray.get(graph.execute(handed)))
    graph.teardown()
    x = torch.randn(2, 3, 3, 16, 22, 38)
    ctx = model.denoiser.frame_context(frame.unpack().layout, frame.unpack().camera_params, model.text_encoder.encode(frame.captions))
    ctx = {k: v.expand(2, 3, *v.shape).contiguous() for k, v in ctx.items()}
    ts = torch.full((2, 3, 3), 500.0)
    with torch.inference_mode():
        model.denoiser(x, ts, ctx)
        calls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.denoiser(x, ts, ctx)
            calls.append(time.perf_counter() - t0)
    return handed_bytes(handed), call_move, graph_move, 1e3 * statistics.median(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bands", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--sessions", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=24, help="timed rounds after the queues run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (e.g. device=cuda model=ctsd_35_xs ...)")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, num_gpus=max(args.bands), include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 2**20, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    rows = []
    for bands in args.bands:
        warm = 3 * bands + 1  # rounds until every queue has warmed up and given a frame
        for sessions in args.sessions:
            cfg = config(bands, args.overrides)
            frames = conditions(cfg, sessions, warm + args.rounds)
            single_fps, single = run_single(cfg, frames, warm)
            paths = {}
            for name, graph in (("calls", "false"), ("graph", "true")):
                paths[name] = run_pool(config(bands, [*args.overrides, f"serve.stage.compiled_graph={graph}"]), frames, warm)
            rows.append((bands, sessions, single_fps, statistics.median(single.latency_s), paths))
            print(f"B={bands} sessions={sessions}: single {single_fps:.2f} fps, "
                  + ", ".join(f"{n} {p[0]:.2f} fps" for n, p in paths.items()), flush=True)
    nbytes, call_ms, graph_ms, model_ms = handover_cost(config(1, args.overrides), frames[0][0])
    print(f"\ntiny model, 3 views, N=12, T=3, {args.rounds} timed rounds; torch 1 thread per stage and in the "
          "single process; 2 CPUs. calls: rounds as Ray calls through the coordinator; graph: a compiled graph")
    print("| B | sessions | path | fps | / single | latency s (single) | round overhead ms | slowest stage ms "
          "| overhead / stage | stage idle |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bands, sessions, s_fps, s_lat, paths in rows:
        for name, (fps, timing, h) in paths.items():
            over, work = h["overhead_ms_per_round"], h["stage_work_ms_per_round"]
            idle = " ".join(f"{100 * i:.0f}%" for i in h["stage_idle"])
            print(f"| {bands} | {sessions} | {name} | {fps:.2f} | {fps / s_fps:.2f} | "
                  f"{statistics.median(timing.latency_s):.2f} ({s_lat:.2f}) | {over:.1f} | {work:.1f} | "
                  f"{100 * over / work:.1f}% | {idle} |")
    print(f"\nhand-over of one frame: {nbytes} bytes; to another process {call_ms:.2f} ms in a Ray call, "
          f"{graph_ms:.2f} ms through a compiled graph's channel; one stage model call {model_ms:.1f} ms")
    ray.shutdown()


if __name__ == "__main__":
    main()
