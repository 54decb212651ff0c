"""The one-GPU check: the released model's size on one GPU, measured in one command
(`bench/gpu_check.sh`), with nothing downloaded.

    bench/gpu_check.sh                                  # on a GPU machine: the real size, CUDA
    bench/gpu_check.sh --size tiny --device cpu --out /tmp/check.md   # the same steps, tiny, CPU

Steps, each timed and reported in one Markdown table (bench/results/gpu-<device>.md):

1. A random-weight checkpoint of the released size (CTSD 3.5 XS, the released key table: its
   keys and shapes are compared with `../shared/reference/ctsd_35_xs_state_dict.tsv` where
   that file is), written as .safetensors and read back strictly, and an SD3.5 folder of
   stand-in text encoders (the real classes and widths, one or two layers) and a random VAE
   of the real architecture (`dwm.models.stand_in`).
2. One model call at the reference settings (36 images): ms and achieved TFLOP/s against a
   matmul measured in the same run, float16 and bfloat16, eager and compiled (`model.compile`).
3. Sessions batched (1, 2, 4, 8): frames/s, control-to-picture latency (the L rounds between
   a frame's conditions going in and its picture coming out, against N model calls + 100 ms),
   peak GPU memory in total and per session, decode ms per frame.
4. A driver joining 2 others: their frame interval during the join over steady state, and the
   newcomer's time to its first frame (`bench.bench_join`).
5. The Serve app (`python -m deployments`) on that checkpoint and folder, 2 sessions driven
   over HTTP for 60 s (and until a control has reached the picture): their frames/s and
   control-to-picture latency from the sessions' stats.

`--size tiny --device cpu` runs every step on a tiny model in a few minutes (the test suite
does, so that the script works when a GPU runs it). The real size needs about 12 GB of disk
for the checkpoint, in --work (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from bench.bench_join import drive, measure_join
from bench.bench_model import DTYPES, measure_call
from dwm.config import compose, instantiate
from dwm.models.checkpoint import load_checkpoint, model_shapes, save_state_dict
from dwm.models.stand_in import REAL_VAE_BLOCKS, write_sd35_folder
from dwm.pipelines.streaming import StreamingPipeline, push_many

ROOT = Path(__file__).resolve().parents[1]
KEY_TABLE = ROOT.parent / "shared" / "reference" / "ctsd_35_xs_state_dict.tsv"
TINY = ["model.denoiser.num_layers=2", "model.denoiser.num_attention_heads=2", "model.denoiser.attention_head_dim=16",
        "model.denoiser.adapter_layers=2", "model.denoiser.camera_frequencies=32", "model.denoiser.pos_embed_max_size=64",
        "pipeline.steps=12", "pipeline.window=3",  # and a shorter queue (s = 4 as the reference's)
        "pipeline.resolution=[96,160]", "pipeline.output_size=[96,160]"]  # and smaller views (latents 12 x 20)
CPU = ["model.dtype=float32", "model.text_encoder.dtype=float32"]  # half precision is emulated on most CPUs


class Report:
    """The table's rows, printed as they come and written at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"  {what}: {value}  {note}", flush=True)

    def markdown(self) -> str:
        lines = ["| what | value | |", "|---|---|---|"]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in self.rows]
        return "\n".join(lines)


def released_key_table() -> dict[str, list[int]] | None:
    if not KEY_TABLE.is_file():
        return None
    table = {}
    for line in KEY_TABLE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            table[key] = json.loads(shape)
    return table


def write_checkpoint(args, work: Path, report: Report) -> list[str]:
    """Step 1. Returns the overrides that run the model on the files written."""
    size = TINY if args.size == "tiny" else []
    base = ["model=ctsd_35_xs", f"device={args.device}", *size, *(CPU if args.device == "cpu" else [])]
    start = time.perf_counter()
    cfg = compose([*base, "model.random_weights=true"])
    with torch.device(args.device):
        denoiser = instantiate(cfg, "model.denoiser")
    denoiser = denoiser.to(torch.float16)  # as released
    path = work / "ctsd_35_xs_random.safetensors"
    save_state_dict(denoiser, path)
    shapes = {k: list(v) for k, v in model_shapes(denoiser).items()}
    del denoiser
    table = released_key_table()
    if args.size == "real" and table is not None:
        same = table == shapes
        report.add("checkpoint keys against the released table", f"{len(shapes)} keys",
                   "identical keys and shapes" if same else "DIFFERENT from the released table")
    else:
        report.add("checkpoint keys", f"{len(shapes)} keys", "(the released table: 1049 keys, at the real size)")
    with torch.device("meta"):
        meta = instantiate(cfg, "model.denoiser")
    load_checkpoint(meta, path)  # strictly: every key and shape
    folder = write_sd35_folder(work / "sd3.5", REAL_VAE_BLOCKS if args.size == "real" else (16, 16, 32, 32))
    report.add("checkpoint and SD3.5 stand-in folder written", f"{time.perf_counter() - start:.1f} s",
               f"{path.stat().st_size / 2**30:.2f} GiB checkpoint, read back strictly")
    return [*base, f"model.checkpoint={path}", f"model.sd35_dir={folder}"]


def model_calls(args, overrides: list[str], report: Report) -> None:
    """Step 2."""
    cfg = compose([o for o in overrides if not o.startswith(("model.checkpoint=", "model.sd35_dir="))]
                  + ["model.random_weights=true"])
    device = torch.device(args.device)
    for name in ("float16", "bfloat16"):
        for compiled in (False, True):
            label = f"one call, {name}, {'compiled' if compiled else 'eager'}"
            try:
                r = measure_call(cfg, device, DTYPES[name], args.repeats, compiled, "default", args.compile_backend,
                                 matmul_n=512 if args.size == "tiny" else None)
            except Exception as e:  # one variant failing must not hide the others
                report.add(label, "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            first = f"; first call {r['first_s']:.1f} s (compiling)" if compiled else ""
            report.add(label, f"{1e3 * r['call_s']:.1f} ms",
                       f"{r['achieved_tflops']:.2f} TFLOP/s = {r['achieved_tflops'] / r['matmul_tflops']:.2f} x the "
                       f"same-run {r['matmul_n']}^2 matmul ({r['matmul_tflops']:.1f} TFLOP/s; target >= 0.65 compiled fp16){first}")
            torch._dynamo.reset()


def sessions_batched(args, overrides: list[str], report: Report) -> None:
    """Step 3."""
    cfg = compose(overrides)
    p = cfg.pipeline
    length, calls = p.window * p.bands, p.steps // (p.window * p.bands)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = StreamingPipeline.build_model(cfg)
    views = 3
    most = max(args.sessions)
    rounds = 4
    scenes = drive(cfg, most, length + 1 + length + rounds)
    one_session_peak = None
    for n in args.sessions:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        queues = [StreamingPipeline.from_config(cfg, views, model=model, seed=k) for k in range(n)]
        ends, starts, decode_s, decoded = [], [], 0.0, 0
        decode = model.decoder.decode

        def timed_decode(latents):
            nonlocal decode_s, decoded
            start = time.perf_counter()
            out = decode(latents)
            if cuda:
                torch.cuda.synchronize()
            decode_s += time.perf_counter() - start
            decoded += latents.shape[0] // views
            return out

        model.decoder.decode = timed_decode
        try:
            for i in range(len(scenes[0])):
                starts.append(time.perf_counter())
                push_many([(queues[k], scenes[k][i]) for k in range(n)])
                if cuda:
                    torch.cuda.synchronize()
                ends.append(time.perf_counter())
        finally:
            del model.decoder.decode
        # Steady rounds: after every queue gives a frame per round.
        steady = [ends[i] - starts[i] for i in range(length + 1, len(ends))]
        round_s = statistics.median(steady)
        # Frame i's conditions went in at round i; its picture came out at the end of round i + L - 1.
        latency = statistics.median(ends[i + length - 1] - starts[i] for i in range(length, len(ends) - length + 1))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if n == 1:
            one_session_peak = peak
        call_ms = 1e3 * round_s / calls
        report.add(f"{n} session{'s' if n > 1 else ''} batched", f"{n / round_s:.2f} frames/s",
                   f"{n / round_s / n:.2f} per session; round {1e3 * round_s:.0f} ms ({calls} calls, {call_ms:.0f} ms each)")
        report.add(f"{n} session{'s' if n > 1 else ''}: control to picture", f"{1e3 * latency:.0f} ms",
                   f"target <= N calls + 100 ms = {p.steps * call_ms + 100:.0f} ms")
        if cuda:
            per = f"; {(peak - one_session_peak) / (n - 1):.2f} GiB per extra session" if n > 1 and one_session_peak else ""
            report.add(f"{n} session{'s' if n > 1 else ''}: peak GPU memory", f"{peak:.2f} GiB", f"model, queues, activations{per}")
        if decoded:
            report.add(f"{n} session{'s' if n > 1 else ''}: VAE decode", f"{1e3 * decode_s / decoded:.1f} ms per frame",
                       f"{views} views, {cfg.model.get('vae_dtype', 'auto')} VAE dtype")
    del model


def join(args, overrides: list[str], report: Report) -> None:
    """Step 4."""
    cfg = compose(overrides)
    r = measure_join(cfg, StreamingPipeline.build_model(cfg), running=2, rounds=4)
    report.add("a driver joins 2 others: their slowest frame interval", f"{r['worst_join'] / r['steady']:.2f} x steady",
               f"target <= 1.25; the reference's start: {r['reference_join'] / r['steady']:.2f} x")
    report.add("the newcomer's first frame", f"{r['first_frame']:.2f} s",
               f"after its first {r['rounds_to_first']} rounds ({1e3 * r['steady']:.0f} ms each, 3 sessions)")
    report.add("a round outside model work", f"{100 * r['loop_share']:.1f} %", "target <= 2 %")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, token: str | None = None, timeout: float = 60.0):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=timeout) as r:
        return json.loads(r.read())


def serve_app(args, overrides: list[str], report: Report) -> None:
    """Step 5."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    app = [a for a in overrides if not a.startswith("device=")] + [f"device={args.device}", f"serve.http_port={port}"]
    if args.device.startswith("cuda"):
        app += ["serve.denoiser.num_gpus=1"]  # Ray shows an actor only the GPUs it reserved
    log = open(args.work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "deployments", *app], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    start = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the Serve app exited ({proc.returncode}); see {args.work / 'serve.log'}")
            try:
                http("GET", f"{base}/sessions", timeout=5)
                break
            except OSError:
                if time.perf_counter() - start > args.serve_start_s:
                    raise RuntimeError(f"the Serve app did not answer within {args.serve_start_s} s") from None
                time.sleep(1)
        report.add("Serve app up", f"{time.perf_counter() - start:.0f} s", "python -m deployments on the checkpoint")
        sessions = [http("POST", f"{base}/sessions", {"seed": k}) for k in range(2)]
        first = time.perf_counter()
        steer, stats = 0.3, {}
        until = time.perf_counter() + args.serve_seconds
        # At least serve_seconds, and on until every session has shown a control (bounded).
        while time.perf_counter() < until or (
            time.perf_counter() < until + args.serve_start_s
            and any(st["control_latency_s"] is None for st in stats.values())
        ):
            for s in sessions:
                http("POST", f"{base}/sessions/{s['id']}/control", {"steer": steer, "autopilot": False}, s["token"])
                stats[s["id"]] = http("GET", f"{base}/sessions/{s['id']}", token=s["token"])["stats"]
            steer = -steer
            time.sleep(1.0)
        for s in sessions:
            final = http("DELETE", f"{base}/sessions/{s['id']}", token=s["token"])["stats"]
            stats[s["id"]] = final
        took = time.perf_counter() - first
        frames = [st["frames_out"] for st in stats.values()]
        latency = [st["control_latency_s"] for st in stats.values() if st["control_latency_s"] is not None]
        report.add("Serve app, 2 sessions over HTTP", f"{sum(frames) / took:.2f} frames/s",
                   f"{min(frames)}-{max(frames)} frames each in {took:.0f} s (warm-up included)")
        report.add("Serve app: control to picture", f"{1e3 * statistics.median(latency):.0f} ms" if latency else "none yet",
                   "from the sessions' stats (control_latency_s)")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu-{os.cpu_count()}core"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="the report (default bench/results/gpu-<device>.md)")
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoint is written (default: a temporary folder)")
    parser.add_argument("--sessions", default=None, help="session counts, e.g. 1,2,4,8 (tiny: 1,2)")
    parser.add_argument("--serve-seconds", type=float, default=None, help="how long the Serve app is driven (60; tiny: 10)")
    parser.add_argument("--serve-start-s", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager: trace without generating code")
    parser.add_argument("--skip", default="", help="steps to leave out: calls,sessions,join,serve")
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    args.sessions = [int(n) for n in (args.sessions or ("1,2" if tiny else "1,2,4,8")).split(",")]
    args.serve_seconds = args.serve_seconds if args.serve_seconds is not None else (10.0 if tiny else 60.0)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device (--device cpu --size tiny checks the script)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    name = device_name(args.device)
    out = args.out or ROOT / "bench" / "results" / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.md"
    skip = set(filter(None, args.skip.split(",")))
    report = Report()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        args.work = Path(args.work or tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        print(f"gpu check: {name}, size {args.size}, torch {torch.__version__}", flush=True)
        overrides = write_checkpoint(args, args.work, report)
        steps = [("calls", model_calls), ("sessions", sessions_batched), ("join", join), ("serve", serve_app)]
        failed = []
        for step, run in steps:
            if step in skip:
                continue
            print(f"[{time.perf_counter() - began:5.0f} s] {step}", flush=True)
            step_start = time.perf_counter()
            try:
                run(args, overrides, report)
                report.add(f"step {step} took", f"{time.perf_counter() - step_start:.0f} s")
            except Exception as e:  # report it and go on: the other steps still say something
                report.add(f"step {step}", "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                failed.append(step)
    took = time.perf_counter() - began
    p = compose(overrides).pipeline
    recipe = "the reference recipe" if (p.steps, p.window, p.bands) == (24, 6, 1) else "a shorter queue"
    header = (f"# One-GPU check: {name}\n\n`bench/gpu_check.sh --size {args.size} --device {args.device}`, "
              f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.python_version()}, "
              f"{took:.0f} s in all. Random weights of the {'released' if not tiny else 'tiny'} size; "
              f"{recipe}: 3 views {p.resolution[0]}x{p.resolution[1]}, window {p.window}, {p.steps} steps, "
              f"{p.bands} band(s), guidance {p.guidance}.\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + report.markdown() + "\n")
    print(f"\n{report.markdown()}\n\nwritten to {out} ({took:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
