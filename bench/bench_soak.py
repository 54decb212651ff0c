"""Soak: many sessions driven for a long time through the Serve app, and sessions made and ended
over and over. What must hold: no error, flat memory, fair frames, no frame skipped.

    python -m bench.bench_soak                                   # 8 sessions, 10 minutes, 50 cycles
    python -m bench.bench_soak --sessions 4 --minutes 2 --cycles 20 pipeline.steps=6 pipeline.window=3

Each session is driven with a control every 0.1 s (10 Hz, steering back and forth) and its
MJPEG stream read at full speed by a reader of its own. Measured: HTTP errors (any answer
other than 200) and stream errors; the private resident memory (RssAnon) of every Serve
replica, sampled every 10 s, its change from the end of the warm-up (the first fifth of the
run) to the end (target: within 5 %); frames per session (target: within 20 % of each other);
frame indices a full-speed reader missed. Then `--cycles` sessions are made and ended one after
the other, and each replica's memory after them is compared with before (target: within 5 %).
The baseline of each memory figure is the same replica earlier in the same run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time

import requests

from bench.bench_serve import ServeRun, actor_rss_mb


class Driver(threading.Thread):
    """Controls one session at `hz` until stopped; counts the answers that were not 200."""

    def __init__(self, base: str, session_id: str, token: str, hz: float = 10.0):
        super().__init__(daemon=True)
        self.url = f"{base}/sessions/{session_id}/control"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.period, self.stop, self.sent, self.errors = 1.0 / hz, threading.Event(), 0, []

    def run(self) -> None:
        k = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            steer = 0.5 * math.sin(k / 20.0)
            try:
                r = requests.post(self.url, json={"steer": round(steer, 3), "throttle": 0.4}, headers=self.headers, timeout=30)
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code} {r.text[:120]}")
            except requests.RequestException as e:
                self.errors.append(repr(e)[:160])
            self.sent += 1
            k += 1
            next_at += self.period
            self.stop.wait(max(0.0, next_at - time.monotonic()))


class Reader(threading.Thread):
    """Reads one session's MJPEG stream as fast as it comes; keeps the frame indices."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.indices, self.stop, self.errors = url, [], threading.Event(), []

    def run(self) -> None:
        try:
            with requests.get(self.url, stream=True, timeout=120) as r:
                for line in r.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith(b"X-Frame-Index:"):
                        self.indices.append(int(line.split(b":")[1]))
        except requests.RequestException as e:
            if not self.stop.is_set():
                self.errors.append(repr(e)[:160])

    def missed(self) -> int:
        """Indices between the first and the last seen that this reader never got."""
        if len(self.indices) < 2:
            return 0
        return (self.indices[-1] - self.indices[0] + 1) - len(set(self.indices))


def change(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per replica, the relative change of its memory (after / before - 1)."""
    return {k: after[k] / before[k] - 1 for k in before if k in after and before[k] > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--cycles", type=int, default=50, help="sessions made and ended one after the other")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (key=value)")
    args = parser.parse_args()
    run = ServeRun(args.overrides, max_sessions=args.sessions)
    try:
        created = []
        for _ in range(args.sessions):
            r = requests.post(f"{run.base}/sessions", timeout=120)
            r.raise_for_status()
            created.append(r.json())
            run.tokens[created[-1]["id"]] = created[-1]["token"]
        drivers = [Driver(run.base, s["id"], s["token"]) for s in created]
        readers = [Reader(s["streams"]["mjpeg"]) for s in created]
        for thread in (*drivers, *readers):
            thread.start()
        duration = 60.0 * args.minutes
        start = time.monotonic()
        samples: list[tuple[float, dict[str, float]]] = []
        warm_frames = None
        while (elapsed := time.monotonic() - start) < duration:
            samples.append((elapsed, actor_rss_mb()))
            if warm_frames is None and elapsed >= duration / 5:
                warm_frames = [len(r.indices) for r in readers]
            time.sleep(min(10.0, duration - elapsed) if duration > elapsed else 0)
        samples.append((time.monotonic() - start, actor_rss_mb()))
        for thread in (*drivers, *readers):
            thread.stop.set()
        frames = [len(r.indices) - (warm_frames[i] if warm_frames else 0) for i, r in enumerate(readers)]
        warm_rss = next(rss for at, rss in samples if at >= duration / 5)
        end_rss = samples[-1][1]
        drift = change(warm_rss, end_rss)
        http_errors = sum(len(d.errors) for d in drivers)
        stream_errors = sum(len(r.errors) for r in readers)
        missed = sum(r.missed() for r in readers)
        sent = sum(d.sent for d in drivers)
        run.delete_all()

        before_cycles = actor_rss_mb()
        cycle_errors = 0
        for _ in range(args.cycles):
            r = requests.post(f"{run.base}/sessions", timeout=120)
            if r.status_code != 201:
                cycle_errors += 1
                continue
            body = r.json()
            r = requests.delete(f"{run.base}/sessions/{body['id']}", headers={"Authorization": f"Bearer {body['token']}"},
                                timeout=120)
            cycle_errors += r.status_code != 200
        after_cycles = actor_rss_mb()
        cycles = change(before_cycles, after_cycles)
    finally:
        run.close()

    def worst(d: dict[str, float]) -> str:
        name = max(d, key=lambda k: abs(d[k]))
        return f"{100 * d[name]:+.1f} % ({name})"

    fair = (max(frames) - min(frames)) / statistics.mean(frames) if frames and statistics.mean(frames) else float("nan")
    print(f"\n{args.sessions} sessions for {args.minutes:g} min, controls at 10 Hz each, one full-speed MJPEG reader each; "
          f"overrides: {' '.join(args.overrides) or '(none)'}\n")
    print("| what | value | target |")
    print("|---|---|---|")
    print(f"| controls sent / answered other than 200 | {sent} / {http_errors} | 0 errors |")
    print(f"| stream errors | {stream_errors} | 0 |")
    print(f"| frames per session after the warm-up | {min(frames)}-{max(frames)} (spread {100 * fair:.0f} % of the mean) | within 20 % |")
    print(f"| frame indices a full-speed reader missed | {missed} | 0 |")
    print(f"| replica memory, end of warm-up -> end | worst {worst(drift)} | within 5 % |")
    print(f"| {args.cycles} sessions made and ended: failures | {cycle_errors} | 0 |")
    print(f"| replica memory, before -> after the cycles | worst {worst(cycles)} | within 5 % |")
    print("\nmemory (RssAnon MB) per replica: warm-up end -> end; before -> after the cycles")
    for name in sorted(warm_rss):
        print(f"  {name}: {warm_rss[name]:.0f} -> {end_rss.get(name, float('nan')):.0f}; "
              f"{before_cycles.get(name, float('nan')):.0f} -> {after_cycles.get(name, float('nan')):.0f}")


if __name__ == "__main__":
    main()
