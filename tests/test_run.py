"""End to end: `python -m dwm.run` drives the whole loop and writes a video a player can read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dwm.run", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def decode(path: Path) -> tuple[list[np.ndarray], list[float]]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return [f.to_ndarray(format="rgb24") for f in frames], [float(f.time) for f in frames]


@pytest.mark.parametrize(
    "overrides, views",
    [
        ([], 3),
        (["world.map=roundabout", "pipeline.bands=2", "stream.overlay=false"], 3),
        (["rig=nusc_6views", "world.map=intersection", "pipeline.guidance=1.0"], 6),
    ],
    ids=["default", "roundabout-2-bands", "6-views"],
)
def test_run_writes_a_video_of_the_asked_frames(tmp_path, overrides, views):
    out = tmp_path / "drive.mp4"
    result = run_cli("frames=6", f"out={out}", *overrides)
    assert result.returncode == 0, result.stderr
    assert "warming up the queue" in result.stderr  # progress is shown during the warm-up

    images, times = decode(out)
    assert len(images) == 6
    assert images[0].shape == (172, 304 * views, 3)
    # Timestamps follow simulation time: one 0.1 s tick per frame.
    assert np.allclose(np.diff(times), 0.1, atol=2e-3)
    # The picture moves: consecutive frames differ.
    assert np.abs(images[0].astype(int) - images[-1].astype(int)).mean() > 1.0


def test_run_same_seed_same_video_different_seed_different(tmp_path):
    paths = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        paths[name] = tmp_path / f"{name}.mp4"
        result = run_cli("frames=2", f"out={paths[name]}", f"seed={seed}", "pipeline.steps=6", "pipeline.window=3")
        assert result.returncode == 0, result.stderr
    a, b, c = (decode(paths[k])[0] for k in "abc")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "override, named",
    [
        ("world.map=moon", "moon"),
        ("world=moon", "world"),
        ("pipeline.stepz=3", "pipeline.stepz"),
        ("pipeline.bands=5", "bands"),
        ("frames=0", "frames"),
    ],
)
def test_run_bad_override_fails_clearly(tmp_path, override, named):
    result = run_cli(override, f"out={tmp_path / 'x.mp4'}", timeout=120)
    assert result.returncode == 2
    assert "error:" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_run_stopped_with_sigterm_keeps_the_video(tmp_path):
    import signal
    import time

    out = tmp_path / "stopped.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dwm.run", "frames=100000", f"out={out}",
         "pipeline.steps=6", "pipeline.window=3"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stderr:  # progress lines; the first "frame" line means frames are out
            if line.startswith("frame "):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in rest
    images, _ = decode(out)
    assert len(images) >= 1 and images[0].shape == (172, 912, 3)
