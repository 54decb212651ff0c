"""End to end: `python -m dwm.run` drives the whole loop and writes a video a player can read."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
AT_ONCE = 2  # commands run side by side (CI has 2 cores)
HAVE_CARLA = importlib.util.find_spec("carla") is not None


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dwm.run", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


SEED_RUNS = (("a", 0), ("b", 0), ("c", 1))  # two runs with one seed, one with another
BAD_TIMEOUT_S = 120


def seed_run(seed: int) -> tuple[str, ...]:
    return ("frames=2", f"seed={seed}", "pipeline.steps=6", "pipeline.window=3")


def commands(item) -> dict[str, tuple[tuple[str, ...], float]]:
    """The commands a test of this module runs: its name for each -> (arguments but `out`,
    timeout)."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if item.originalname == "test_run_writes_a_video_of_the_asked_frames":
        return {"video": (("frames=6", *params["overrides"]), 600)}
    if item.originalname == "test_run_same_seed_same_video_different_seed_different":
        return {name: (seed_run(seed), 600) for name, seed in SEED_RUNS}
    if item.originalname == "test_run_bad_override_fails_clearly":
        return {"bad": ((params["override"],), BAD_TIMEOUT_S)}
    return {}


class Runs:
    """The `python -m dwm.run` commands of this module's selected tests, all started when the
    first of them asks, AT_ONCE at a time: a short run is mostly Python importing torch and
    the rest (one core's work), so on two cores two runs take little more than one. Each test
    then takes its commands' results (exit status, output, video) and asserts on them as if it
    had run them itself."""

    def __init__(self, folder: Path, items) -> None:
        self.folder = folder
        self._pool = ThreadPoolExecutor(AT_ONCE)
        self._runs: dict[tuple[str, str], tuple[Future, Path]] = {}
        for item in items:
            for name, (args, timeout) in commands(item).items():
                out = folder / f"{len(self._runs)}" / f"{name}.mp4"
                out.parent.mkdir()
                future = self._pool.submit(run_cli, *args, f"out={out}", timeout=timeout)
                self._runs[(item.nodeid, name)] = future, out

    def result(self, request, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        """The exit status and output of the test's command `name`, and the path of its video."""
        future, out = self._runs[(request.node.nodeid, name)]
        return future.result(), out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    wanted = [item for item in request.session.items if item.module is request.module]
    r = Runs(tmp_path_factory.mktemp("runs"), wanted)
    try:
        yield r
    finally:
        r.close()


def decode(path: Path) -> tuple[list[np.ndarray], list[float]]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return [f.to_ndarray(format="rgb24") for f in frames], [float(f.time) for f in frames]


@pytest.mark.parametrize(
    "overrides, views, rows",
    [
        ([], 3, 1),
        (["world.map=roundabout", "pipeline.bands=2", "stream.overlay=false"], 3, 1),
        (["rig=nusc_6views", "world.map=intersection", "pipeline.guidance=1.0"], 6, 1),
        (["stream.side_by_side=true"], 3, 2),
        pytest.param(["world.map=tests/data/town_grid_rht.xodr"], 3, 1,
                     marks=pytest.mark.skipif(not HAVE_CARLA, reason="OpenDRIVE maps need the carla client")),
    ],
    ids=["default", "roundabout-2-bands", "6-views", "side-by-side", "opendrive-file"],
)
def test_run_writes_a_video_of_the_asked_frames(runs, request, overrides, views, rows):
    result, out = runs.result(request, "video")  # frames=6 out=... *overrides
    assert result.returncode == 0, result.stderr
    assert "warming up the queue" in result.stderr  # progress is shown during the warm-up

    images, times = decode(out)
    assert len(images) == 6
    assert images[0].shape == (172 * rows, 304 * views, 3)
    if rows == 2:  # the world's camera under the generated views: a blue sky over grey road
        sky, road = images[0][172:182].astype(int), images[0][-10:, 304:608].astype(int)
        assert (sky[..., 2] > sky[..., 0] + 40).mean() > 0.9
        assert (np.ptp(road, axis=-1) < 20).mean() > 0.5
    # Timestamps follow simulation time: one 0.1 s tick per frame.
    assert np.allclose(np.diff(times), 0.1, atol=2e-3)
    # The picture moves: consecutive frames differ.
    assert np.abs(images[0].astype(int) - images[-1].astype(int)).mean() > 1.0


def test_run_same_seed_same_video_different_seed_different(runs, request):
    paths = {}
    for name, _seed in SEED_RUNS:  # frames=2 seed=... pipeline.steps=6 pipeline.window=3
        result, paths[name] = runs.result(request, name)
        assert result.returncode == 0, result.stderr
    a, b, c = (decode(paths[k])[0] for k in "abc")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "override, named",
    [
        ("world.map=moon", "moon"),
        ("world.map=maps/Town99.xodr", "world.map='maps/Town99.xodr': no such file"),
        ("world=moon", "world"),
        ("pipeline.stepz=3", "pipeline.stepz"),
        ("pipeline.bands=5", "bands"),
        ("frames=0", "frames"),
    ],
)
def test_run_bad_override_fails_clearly(runs, request, override, named):
    result, out = runs.result(request, "bad")  # override out=...
    assert result.returncode == 2
    assert "error:" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_run_stopped_with_sigterm_keeps_the_video(tmp_path):
    import signal

    out = tmp_path / "stopped.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dwm.run", "frames=100000", f"out={out}",
         "pipeline.steps=6", "pipeline.window=3"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        # The frames bar counts a frame once it has gone to the video, so from a count of 1
        # on the run is stopped with frames written and more to come.
        shown = ""
        while not re.search(r"frames:[^\r\n]*\| *[1-9]\d*/100000", shown):
            chunk = proc.stderr.read(1)
            assert chunk, f"the run ended before a frame was counted: {shown[-2000:]}"
            shown += chunk
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in rest
    images, _ = decode(out)
    assert len(images) >= 1 and images[0].shape == (172, 912, 3)


def test_run_refuses_cfg_parallel_naming_the_serve_app():
    from dwm.config import ConfigError
    from dwm.run import run

    with pytest.raises(ConfigError, match="pipeline.cfg_parallel=true .*serve run deployments:app"):
        run(["pipeline.cfg_parallel=true", "out=null"])
