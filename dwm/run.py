"""Drive one ego car through the whole frame loop in one process, no Ray.

    python -m dwm.run frames=60 out=drive.mp4
    python -m dwm.run world.map=roundabout rig=nusc_3views pipeline.bands=2 stream.rtsp.url=rtsp://127.0.0.1:8554/dwm

Arguments are Hydra overrides of `conf/` (the same config the Serve app composes). The ego
drives on autopilot. The video goes to `out` (MP4) and, when `stream.rtsp.url` is set, to
`{stream.rtsp.url}/run` over RTSP.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

from tqdm import tqdm

from dwm.conditions.builder import ConditionBuilder
from dwm.config import ConfigError, compose, condition_fps, instantiate
from dwm.pipelines.streaming import GeneratedFrame, StreamingPipeline
from dwm.session import DrivingSession
from dwm.video.compose import compose_strip
from dwm.video.encoder import StreamConnectionError, VideoEncoder, session_rtsp_url


class Progress:
    """The run's progress on stderr, as tqdm bars: the queue's warm-up, then the frames out
    (with the simulation time and the ego's speed). Piped to a file, a line every few seconds."""

    def __init__(self, frames: int, depth: int, stream=sys.stderr):
        self.frames, self.stream = frames, stream
        self.started = time.perf_counter()
        tty = stream.isatty()
        self._bar_options = {"file": stream, "unit": "frame", "mininterval": 0.1 if tty else 2.0, "ascii": not tty}
        self._warm = tqdm(total=depth + 1, desc="warming up the queue", leave=False, **self._bar_options)
        self._frames: tqdm | None = None

    def warming(self) -> None:
        self._warm.update(1)

    def frame(self, frame: GeneratedFrame, speed: float) -> None:
        if self._frames is None:
            self._warm.close()
            self._frames = tqdm(total=self.frames, desc="frames", **self._bar_options)
        self._frames.set_postfix_str(f"sim {frame.conditions.sim_time:.1f} s, ego {speed * 3.6:.0f} km/h", refresh=False)
        self._frames.update(1)

    def done(self, path: str | None) -> None:
        self._warm.close()
        if self._frames is not None:
            self._frames.close()
        took = time.perf_counter() - self.started
        where = f" -> {path}" if path else ""
        self.stream.write(f"{self.frames} frames in {took:.1f} s{where}\n")


def run(overrides: list[str]) -> int:
    cfg = compose(overrides)
    if int(cfg.frames) < 1:
        raise ConfigError(f"frames={cfg.frames}: must be at least 1")
    if cfg.pipeline.cfg_parallel:
        raise ConfigError("pipeline.cfg_parallel=true shares each model call between two processes, which "
                          "the Serve app runs (serve run deployments:app pipeline.cfg_parallel=true); "
                          "python -m dwm.run runs one: leave it false here")
    # One world tick per frame: the video's frame rate is the fps the model is told.
    fps = condition_fps(cfg)
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    pipeline = StreamingPipeline.from_config(cfg, views=builder.num_views)
    session = DrivingSession.start(world, builder, pipeline.depth, ego_id="ego", autopilot=True)
    rtsp = session_rtsp_url(cfg.stream.rtsp.url, "run") if cfg.stream.rtsp.url else None
    if cfg.out is None and rtsp is None:
        raise ConfigError("nothing to write: set out=FILE.mp4 and/or stream.rtsp.url=rtsp://HOST:PORT/PATH")
    progress = Progress(int(cfg.frames), session.queue_depth)
    with VideoEncoder.from_config(cfg.stream, cfg.out, rtsp, fps=fps) as publisher:
        written = 0
        while written < cfg.frames:
            if pipeline.warming:
                progress.warming()
            for frame in session.step(world, pipeline):
                layout = frame.conditions.layout if cfg.stream.overlay else None
                cameras = frame.conditions.camera_images if cfg.stream.side_by_side else None
                publisher.publish(compose_strip(frame.images, layout, cameras), frame.conditions.sim_time)
                written += 1
                progress.frame(frame, session.last_observation.ego_speed)
            world.tick()
    session.close(world)
    world.close()
    progress.done(cfg.out)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # The library's own news (e.g. compiling the model) on stderr, beside the progress bars.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM ends the run like Ctrl-C: the video written so far is finished, not lost.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (ConfigError, StreamConnectionError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the frames written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
