"""The Serve app on a simulated 4-node cluster: how the work of each actor kind grows with the
sessions, with one session owner against several (`serve.sessions.owners`, with as many World
replicas) and one denoiser pipeline against several (`serve.pipelines`), in the same run.

    python -m bench.bench_cluster                                  # 1:8, 1:16, 2:8, 4:16 (owners:sessions)
    python -m bench.bench_cluster --runs 1:8:1,4:8:4 --seconds 45  # owners:sessions:pipelines
    python -m bench.bench_cluster --runs 1:16,1:32,4:16,4:32 --seconds 120

`ray.cluster_utils.Cluster` starts a head and 3 worker nodes (real raylets) on this machine,
each declaring a GPU; the tiny model at its smallest settings runs on the CPU. For each
owners:sessions[:pipelines] run (one pipeline unless given) the app is deployed, the sessions are started on autopilot, and once every
one has made a frame, each Serve replica's CPU time (/proc: user + system) and each session's
frames are measured over `--seconds`. Printed per run: CPU seconds per frame of each actor kind
(all its replicas), the busiest replica of each kind as CPU seconds per second (its load) and
its share of all the replicas' CPU, and the frames per session (min-max and their spread). The
baseline is the one-owner run at the same session count. Bytes between nodes are not measured:
every node of this cluster is on this machine's loopback.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import requests  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import deployments  # noqa: E402

SMALLEST = {"pipeline.steps": "6", "pipeline.window": "3", "pipeline.resolution": "[96,160]",
            "pipeline.output_size": "[96,160]", "world.vehicles": "8", "serve.public_viewing": "true",
            "serve.graceful_shutdown_s": "1.0", "serve.sessions.num_cpus": "0.1", "serve.world.num_cpus": "0.1",
            "serve.ingress.num_cpus": "0.1", "serve.denoiser.num_cpus": "0.5"}
TICK = os.sysconf("SC_CLK_TCK")


def replica_cpu(app: str) -> dict[str, tuple[str, float]]:
    """pid -> (deployment, CPU seconds so far) of the Serve replicas of `app` on this machine."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            marker = f"ServeReplica:{app}:"
            if marker not in cmdline:
                continue
            kind = cmdline.split(marker, 1)[1].split("\x00")[0].split(".")[0].strip()
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            out[proc.name] = (kind, (int(fields[11]) + int(fields[12])) / TICK)  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return out


def frames_out(base: str) -> dict[str, int]:
    return {s["id"]: s["stats"]["frames_out"] for s in requests.get(f"{base}/sessions", timeout=120).json()}


def measure(base: str, owners: int, sessions: int, pipelines: int, seconds: float) -> dict:
    app = f"cluster-{owners}-{sessions}-{pipelines}"
    overrides = {**SMALLEST, "serve.sessions.owners": str(owners), "serve.world.replicas": str(owners),
                 "serve.max_sessions": str(sessions), "serve.pipelines": str(pipelines)}
    serve.run(deployments.app(overrides), name=app, route_prefix="/")
    try:
        for _ in range(sessions):
            r = requests.post(f"{base}/sessions", json={"autopilot": True}, timeout=300)
            r.raise_for_status()
        deadline = time.monotonic() + 1800
        while min(frames_out(base).values()) < 1:  # every queue warmed up
            if time.monotonic() > deadline:
                raise TimeoutError("the sessions made no frame in 30 minutes")
            time.sleep(1.0)
        cpu0, frames0, t0 = replica_cpu(app), frames_out(base), time.monotonic()
        time.sleep(seconds)
        cpu1, frames1, t1 = replica_cpu(app), frames_out(base), time.monotonic()
        placed = sorted(len(p["sessions"]) for p in requests.get(f"{base}/pipelines", timeout=120).json()["pipelines"])
    finally:
        serve.delete(app)
    wall = t1 - t0
    made = {sid: frames1[sid] - frames0.get(sid, 0) for sid in frames1}
    total_frames = sum(made.values())
    used = {pid: (kind, cpu1[pid][1] - cpu0[pid][1]) for pid, (kind, _) in cpu1.items() if pid in cpu0}
    all_cpu = sum(c for _, c in used.values()) or 1e-9
    kinds = {}
    for kind, cpu in used.values():
        k = kinds.setdefault(kind, {"cpu": 0.0, "busiest": 0.0, "replicas": 0})
        k["cpu"] += cpu
        k["busiest"] = max(k["busiest"], cpu)
        k["replicas"] += 1
    per_session = list(made.values())
    mean = statistics.mean(per_session)
    return {
        "owners": owners, "sessions": sessions, "pipelines": pipelines, "placed": placed, "frames": total_frames, "wall": wall,
        "frames_range": (min(per_session), max(per_session)),
        "spread": (max(per_session) - min(per_session)) / mean if mean else float("nan"),
        "kinds": {kind: {"cpu_per_frame": k["cpu"] / max(total_frames, 1), "busiest_load": k["busiest"] / wall,
                         "busiest_share": k["busiest"] / all_cpu, "replicas": k["replicas"]}
                  for kind, k in sorted(kinds.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="1:8,1:16,2:8,4:16",
                        help="owners:sessions[:pipelines] runs, in order (one pipeline unless given)")
    parser.add_argument("--seconds", type=float, default=90.0, help="measured window of each run")
    args = parser.parse_args()
    runs = [(*(int(x) for x in run.split(":")), 1)[:3] for run in args.runs.split(",")]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 300 * 2**20})
    for _ in range(3):
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=300 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    with socket.socket() as probe:  # a free local port for Serve's HTTP proxy
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    base = f"http://127.0.0.1:{port}"
    results = []
    try:
        for owners, sessions, pipelines in runs:
            results.append(measure(base, owners, sessions, pipelines, args.seconds))
            r = results[-1]
            print(f"owners {owners}, {sessions} sessions, {pipelines} pipelines (sessions on each: {r['placed']}): "
                  f"{r['frames']} frames in {r['wall']:.0f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()

    print(f"\n4 nodes (a head and 3 workers, 1 declared GPU each) on this machine; the tiny model, "
          f"{' '.join(f'{k}={v}' for k, v in SMALLEST.items() if k.startswith('pipeline'))}; "
          f"measured over {args.seconds:.0f} s once every session has made a frame\n")
    kinds = sorted({kind for r in results for kind in r["kinds"]})
    print("| owners | pipelines | sessions | frames per session (spread) | " + " | ".join(
        f"{k}: CPU s/frame, busiest load, its share" for k in kinds) + " |")
    print("|---|---|---|---|" + "---|" * len(kinds))
    for r in results:
        cells = []
        for kind in kinds:
            k = r["kinds"].get(kind)
            cells.append("-" if k is None else
                         f"{k['cpu_per_frame']:.3f}, {k['busiest_load']:.2f}, {100 * k['busiest_share']:.0f} % ({k['replicas']})")
        lo, hi = r["frames_range"]
        print(f"| {r['owners']} | {r['pipelines']} | {r['sessions']} | {lo}-{hi} ({100 * r['spread']:.0f} %) | " + " | ".join(cells) + " |")
    print("\nbusiest load: the busiest replica's CPU seconds per second; its share: of all the replicas' CPU "
          "in the run; (n): replicas of that kind")


if __name__ == "__main__":
    main()
