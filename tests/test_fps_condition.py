"""The fps camera condition is the world's tick rate: one number for the model, the video and
the config, refused at start when an explicit `pipeline.fps` disagrees with the world."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from omegaconf import OmegaConf

from dwm.conditions.builder import ConditionBuilder
from dwm.config import ConfigError, compose, condition_fps, instantiate
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent


def test_pipeline_fps_defaults_to_following_the_world():
    assert compose().pipeline.fps is None


@pytest.mark.parametrize(
    "overrides, fps",
    [
        ([], 10.0),  # the embedded world's default tick, 0.1 s
        (["world.dt=0.2"], 5.0),
        (["world.dt=0.05"], 20.0),
        (["world=carla"], 10.0),  # Carla's default fixed_delta_seconds, 0.1 s
        (["world=carla", "world.fixed_delta_seconds=0.05"], 20.0),
        (["world.dt=0.2", "pipeline.fps=5.0"], 5.0),  # an explicit value that agrees
        (["world=carla", "world.fixed_delta_seconds=0.05", "pipeline.fps=20"], 20.0),
    ],
)
def test_the_fps_condition_follows_the_worlds_tick(overrides, fps):
    cfg = compose(overrides)
    assert condition_fps(cfg) == fps
    # A plain dict of the config (what the Serve replicas get) resolves the same.
    assert condition_fps(OmegaConf.to_container(cfg, resolve=True)) == fps


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["world.dt=0.2", "pipeline.fps=10.0"], ["pipeline.fps=10.0", "world.dt=0.2 s is 5.0 fps", "or 5.0"]),
        (["world=carla", "world.fixed_delta_seconds=0.05", "pipeline.fps=10"],
         ["pipeline.fps=10.0", "world.fixed_delta_seconds=0.05 s is 20.0 fps", "or 20.0"]),
        (["pipeline.fps=-1"], ["pipeline.fps=-1", "must be greater than 0"]),
    ],
)
def test_an_explicit_fps_that_disagrees_with_the_world_is_refused_naming_both(overrides, named):
    with pytest.raises(ConfigError) as error:
        condition_fps(compose(overrides))
    for words in named:
        assert words in str(error.value)
    assert "pipeline.fps=null" in str(error.value) or "greater than 0" in str(error.value)


def test_a_config_without_a_world_tick_is_refused():
    cfg = OmegaConf.to_container(compose(), resolve=True)
    del cfg["world"]["dt"]
    with pytest.raises(ConfigError, match=r"world\.dt or world\.fixed_delta_seconds"):
        condition_fps(cfg)


def test_the_conditions_carry_the_worlds_rate():
    cfg = compose(["world.dt=0.2"])
    builder = ConditionBuilder.from_config(cfg)
    assert builder.fps == 5.0
    world = instantiate(cfg, "world")
    try:
        frame = builder.build(world.observe(world.add_ego()))
    finally:
        world.close()
    assert frame.camera_params[:, 0].tolist() == [5.0] * builder.num_views
    with pytest.raises(ValueError, match=r"world\.dt=0\.2"):
        ConditionBuilder.from_config(compose(["world.dt=0.2", "pipeline.fps=10.0"]))


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dwm.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_run_refuses_a_disagreeing_fps_before_driving(tmp_path):
    out = tmp_path / "x.mp4"
    result = run_cli("world.dt=0.2", "pipeline.fps=10.0", f"out={out}", timeout=120)
    assert result.returncode == 2
    assert "pipeline.fps=10.0" in result.stderr and "world.dt=0.2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_run_video_and_conditions_agree_on_a_slower_tick(tmp_path):
    out = tmp_path / "slow.mp4"
    result = run_cli("frames=3", f"out={out}", "world.dt=0.2", "pipeline.steps=6", "pipeline.window=3")
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        times = [float(f.time) for f in container.decode(video=0)]
        rate = stream.codec_context.framerate or stream.average_rate
    assert len(times) == 3
    assert np.allclose(np.diff(times), 0.2, atol=2e-3)  # frames 0.2 s of sim time apart
    assert float(rate) == pytest.approx(5.0)  # and the stream says 5 fps, as the model was told


def test_serve_app_build_refuses_a_disagreeing_fps():
    import deployments

    with pytest.raises(ConfigError, match=r"pipeline\.fps=10\.0 disagrees.*world\.dt=0\.2 s is 5\.0 fps"):
        deployments.app({"world.dt": "0.2", "pipeline.fps": "10.0"})


def test_serve_session_video_is_made_at_the_worlds_rate(tmp_path, monkeypatch):
    from deployments import publisher as publisher_module

    opened: list[float] = []

    class Sink:
        def publish(self, image, sim_time):
            pass

        def close(self):
            pass

    def from_config(stream, record_path=None, rtsp_url=None, fps=None):
        opened.append(fps)
        return Sink()

    monkeypatch.setattr(publisher_module.VideoEncoder, "from_config", staticmethod(from_config))
    cfg = compose(["world.dt=0.2"])
    session = publisher_module.SessionPublisher(cfg, "s", overlay=False, record_path=tmp_path / "s.mp4")
    eventually(lambda: opened, "the session's encoder to open (on its own thread)")
    session.outputs["recording"].close()
    assert opened == [5.0]
