"""Control-to-picture latency as a driver sees it: from sending a control to the first video
frame that shows it (the frame's `control_seq`), median and p95, in ms and in frames, for 1 and
for N sessions through the Serve app, against the library loop in this process (same config,
same run) as the baseline.

    python -m bench.bench_latency                                      # 12 controls per session, 1 and 4 sessions
    python -m bench.bench_latency --controls 20 pipeline.steps=6 pipeline.window=3

Each session sends a control, reads frames (in process: `next_frame`; over HTTP: the MJPEG
stream, which gives the newest frame each time) until one carries that control's sequence
number, then sends the next. Frames counts how many frames that took (the queue's depth + 1
at least: a control shows in the first frame observed after it).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from dwm.client.session import Session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(session: Session, controls: int) -> list[tuple[float, int]]:
    """(ms, frames) from each control to the first frame showing it."""
    frame = session.next_frame()  # the warm-up is not a control's latency
    out = []
    for k in range(controls):
        start = time.perf_counter()
        seq = session.control(steer=0.1 if k % 2 else -0.1, throttle=0.4)
        before = frame.index
        while frame.control_seq < seq:
            frame = session.next_frame()
        out.append((1e3 * (time.perf_counter() - start), frame.index - before))
    return out


def in_threads(make, sessions: int, controls: int) -> list[tuple[float, int]]:
    results: list[list[tuple[float, int]]] = [[] for _ in range(sessions)]
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            with make(k) as session:
                results[k] = measure(session, controls)
        except BaseException as err:  # reported below, not lost in a thread
            errors.append(err)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for rs in results for r in rs]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else values[0]


def serve_app(overrides: list[str], max_sessions: int):
    import ray
    from ray import serve

    import deployments

    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = dict(o.split("=", 1) for o in overrides)
    serve.run(deployments.app({**args, "serve.max_sessions": str(max_sessions)}))
    return f"http://127.0.0.1:{port}", lambda: (serve.shutdown(), ray.shutdown())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controls", type=int, default=12, help="controls timed per session")
    parser.add_argument("--sessions", type=int, default=4, help="sessions of the many-session run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (key=value)")
    args = parser.parse_args()
    n, rows = args.sessions, []
    local = in_threads(lambda k: Session.in_process(args.overrides, seed=k, layout=False), 1, args.controls)
    rows.append(("library, in process", 1, local))
    base, stop = serve_app(args.overrides, n + 1)
    try:
        for sessions in (1, n):
            rows.append(("Serve app, HTTP", sessions, in_threads(
                lambda k: Session.over_http(base, {"seed": k}, layout=False), sessions, args.controls)))
    finally:
        stop()
    baseline = statistics.median(ms for ms, _ in local)
    print(f"\nconfig overrides: {' '.join(args.overrides) or '(none)'}; {args.controls} controls per session; "
          f"CPUs {os.cpu_count()}\n")
    print("| setup | sessions | median ms | p95 ms | median frames | p95 frames | median ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, sessions, samples in rows:
        ms = [m for m, _ in samples]
        frames = [float(f) for _, f in samples]
        print(f"| {name} | {sessions} | {statistics.median(ms):.0f} | {p95(ms):.0f} | {statistics.median(frames):.0f} "
              f"| {p95(frames):.0f} | {statistics.median(ms) / baseline:.2f} x library |")


if __name__ == "__main__":
    main()
