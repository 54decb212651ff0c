"""What Serve and the actors cost: frames per second of 1 and of N sessions through the Serve
app against the bare library loop, same config, same machine, same run.

    python -m bench.bench_serve                                   # 20 frames per session, 1 and 4 sessions
    python -m bench.bench_serve --frames 40 pipeline.steps=6 pipeline.window=3

Bare loop: `DrivingSession`s sharing one world in this process, one world tick per round, and
per frame the publisher's work (compose the strip, encode the JPEG), with torch on as many
threads as the QueueServer actor gets (serve.denoiser.num_cpus). Serve: `deployments.app` on a
local Ray with the machine's CPUs; frames counted from the sessions' stats after their queues
have warmed up. Also: how long a control takes to reach the world, against one frame round,
and the memory each extra session adds to the actors (RSS, MB).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import requests  # noqa: E402
import torch  # noqa: E402

from dwm.conditions.builder import ConditionBuilder  # noqa: E402
from dwm.config import compose, instantiate  # noqa: E402
from dwm.pipelines.streaming import StreamingPipeline  # noqa: E402
from dwm.session import DrivingSession  # noqa: E402
from dwm.video.compose import compose_strip  # noqa: E402
from dwm.video.stills import encode_jpeg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bare_fps(overrides: list[str], sessions: int, frames: int) -> float:
    """Frames per second (all sessions together) of the library loop, after the warm-up."""
    cfg = compose(overrides)
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    model = StreamingPipeline.build_model(cfg)
    pipelines = [StreamingPipeline.from_config(cfg, builder.num_views, model=model) for _ in range(sessions)]
    drivers = [(DrivingSession.start(world, builder, p.depth, autopilot=True), p) for p in pipelines]
    quality, overlay = int(cfg.serve.jpeg_quality), bool(cfg.stream.overlay)

    def round_() -> int:
        out = 0
        for session, pipeline in drivers:
            for frame in session.step(world, pipeline):
                strip = compose_strip(frame.images, frame.conditions.layout if overlay else None)
                encode_jpeg(strip, quality)
                out += 1
        world.tick()
        return out

    while drivers[0][0].frames_out == 0:
        round_()
    start, made = time.perf_counter(), 0
    while made < frames * sessions:
        made += round_()
    took = time.perf_counter() - start
    world.close()
    return made / took


def actor_rss_mb() -> dict[str, float]:
    """Private resident memory (RssAnon, MB) of the Serve replicas on this machine, by
    deployment name. RssAnon leaves out the shared object store pages a replica has mapped."""
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if "ServeReplica:" not in cmdline:
                continue
            name = cmdline.split("ServeReplica:", 1)[1].split("\x00")[0].split(":")[1].split(".")[0].strip()
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    out[name] = out.get(name, 0.0) + int(line.split()[1]) / 1024
        except (OSError, IndexError):
            continue
    return out


class ServeRun:
    def __init__(self, overrides: list[str], max_sessions: int):
        import ray
        from ray import serve

        import deployments

        self.ray, self.serve = ray, serve
        ray.init(
            include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = dict(o.split("=", 1) for o in overrides)
        serve.run(deployments.app({**args, "serve.max_sessions": str(max_sessions), "serve.autopilot": "true"}))
        self.base = f"http://127.0.0.1:{port}"
        self.tokens: dict[str, str] = {}

    def create(self) -> str:
        body = requests.post(f"{self.base}/sessions", timeout=120).json()
        self.tokens[body["id"]] = body["token"]
        return body["id"]

    def stats(self, session_id: str) -> dict:
        return requests.get(f"{self.base}/sessions/{session_id}", timeout=60,
                            headers={"Authorization": f"Bearer {self.tokens[session_id]}"}).json()["stats"]

    def delete_all(self) -> None:
        for session_id, token in list(self.tokens.items()):
            requests.delete(f"{self.base}/sessions/{session_id}", headers={"Authorization": f"Bearer {token}"}, timeout=120)
        self.tokens.clear()

    def fps(self, sessions: int, frames: int) -> tuple[float, float]:
        """(frames per second of all sessions together, seconds per frame round)."""
        ids = [self.create() for _ in range(sessions)]
        while min(self.stats(i)["frames_out"] for i in ids) == 0:
            time.sleep(0.2)
        first = {i: self.stats(i)["frames_out"] for i in ids}
        start = time.perf_counter()
        while True:
            now = {i: self.stats(i)["frames_out"] for i in ids}
            if min(now[i] - first[i] for i in ids) >= frames:
                break
            time.sleep(0.05)
        took = time.perf_counter() - start
        made = sum(now[i] - first[i] for i in ids)
        return made / took, took / (made / sessions)

    def control_ms(self, samples: int = 20) -> float:
        """Median ms for a control to be applied in the world (the POST returns after that)."""
        session_id = self.create()
        token = self.tokens[session_id]
        times = []
        for k in range(samples):
            start = time.perf_counter()
            r = requests.post(
                f"{self.base}/sessions/{session_id}/control", json={"steer": 0.1 if k % 2 else -0.1},
                headers={"Authorization": f"Bearer {token}"}, timeout=60,
            )
            r.raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(0.05)
        return sorted(times)[len(times) // 2]

    def close(self) -> None:
        self.serve.shutdown()
        self.ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20, help="frames per session to time after the warm-up")
    parser.add_argument("--sessions", type=int, default=4, help="sessions of the many-session runs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (key=value)")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    torch.set_num_threads(max(1, math.floor(cfg.serve.denoiser.num_cpus)))
    n = args.sessions

    rows = []
    bare1 = bare_fps(args.overrides, 1, args.frames)
    bare_n = bare_fps(args.overrides, n, args.frames)

    run = ServeRun(args.overrides, max_sessions=n + 1)
    try:
        serve1, round1 = run.fps(1, args.frames)
        idle = actor_rss_mb()
        run.delete_all()
        serve_n, round_n = run.fps(n, args.frames)
        busy = actor_rss_mb()
        control = run.control_ms()
        run.delete_all()
    finally:
        run.close()

    rows = [
        ("bare loop", 1, bare1, "1.00 (baseline)"),
        ("Serve", 1, serve1, f"{serve1 / bare1:.2f} x bare, 1 session"),
        ("bare loop", n, bare_n, f"{bare_n / bare1:.2f} x bare, 1 session"),
        ("Serve", n, serve_n, f"{serve_n / serve1:.2f} x Serve, 1 session; {serve_n / bare_n:.2f} x bare, {n}"),
    ]
    print(f"\nconfig overrides: {' '.join(args.overrides) or '(none)'}; {args.frames} frames per session timed; "
          f"torch threads (bare) {torch.get_num_threads()}; CPUs {os.cpu_count()}\n")
    print(f"| {'setup':<9} | sessions | frames/s (all) | frames/s (each) | ratio |")
    print("|---|---|---|---|---|")
    for name, sessions, fps, ratio in rows:
        print(f"| {name:<9} | {sessions:>8} | {fps:>14.2f} | {fps / sessions:>15.2f} | {ratio} |")
    per_session = {k: (busy.get(k, 0.0) - idle.get(k, 0.0)) / (n - 1) for k in busy}
    print(f"\ncontrol to world: {control:.1f} ms median (HTTP POST returns once the World actor holds it); "
          f"one frame round: {round1 * 1000:.0f} ms with 1 session, {round_n * 1000:.0f} ms with {n} "
          f"-> {'within' if control < round1 * 1000 else 'NOT within'} one tick")
    print("memory per extra session (MB, private RSS by actor): "
          + ", ".join(f"{k} {v:+.1f}" for k, v in sorted(per_session.items()))
          + f"; total {sum(per_session.values()):+.1f}")


if __name__ == "__main__":
    main()
