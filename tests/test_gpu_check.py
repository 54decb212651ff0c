"""`bench/gpu_check.sh`, the one-GPU check, run on a tiny model on the CPU: every step runs and
lands in the report, so the script works the day a GPU runs it at the released size."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("calls", "sessions", "join", "serve")


def test_the_gpu_check_runs_every_step_on_a_tiny_model_and_writes_its_table(tmp_path):
    out = tmp_path / "check.md"
    result = subprocess.run(
        [str(ROOT / "bench" / "gpu_check.sh"), "--size", "tiny", "--device", "cpu", "--out", str(out),
         "--work", str(tmp_path / "work"), "--sessions", "1", "--serve-seconds", "5", "--repeats", "1",
         "--compile-backend", "aot_eager"],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert "FAILED" not in table
    for step in STEPS:
        assert f"| step {step} took |" in table
    # What each step must say, with numbers.
    for row in ("one call, float16, eager", "one call, float16, compiled", "one call, bfloat16, eager",
                "one call, bfloat16, compiled", "1 session batched", "1 session: control to picture",
                "1 session: VAE decode", "a driver joins 2 others", "the newcomer's first frame",
                "Serve app, 2 sessions over HTTP", "Serve app: control to picture"):
        line = next((l for l in table.splitlines() if l.startswith(f"| {row}")), None)
        assert line is not None, f"no row {row!r} in:\n{table}"
        assert any(c.isdigit() for c in line.split("|")[2]), line
    assert (tmp_path / "work" / "ctsd_35_xs_random.safetensors").is_file()


def test_the_gpu_check_says_so_when_there_is_no_gpu(tmp_path):
    result = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--device", "cuda", "--out", str(tmp_path / "x.md")],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "no CUDA device" in result.stderr
    assert not (tmp_path / "x.md").exists()
