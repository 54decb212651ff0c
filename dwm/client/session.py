"""A driving session for programs (agents, scripts): start it, send controls, take its frames
as numpy arrays. Two ways to run one, with the same methods:

    with Session.in_process(["world.map=roundabout"], seed=3) as s:   # the library, no Ray
        seq = s.control(throttle=0.5, steer=-0.1)
        frame = s.next_frame()          # frame.views (V, h, w, 3) uint8, frame.control_seq
    with Session.over_http("http://127.0.0.1:8000", {"seed": 3}) as s:   # a running Serve app
        ...

Each frame carries its index, the simulation time it shows, the sequence number of the newest
control it shows (`control(...)` returns each control's number) and, when asked, the layout
the world draws now (hdmap and box images: what an agent steers by) and the ego's state.
"""

from __future__ import annotations

import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import cv2
import numpy as np

from dwm.client.api import ApiError, SessionClient

FRAME_TIMEOUT_S = 300.0  # s an HTTP frame may take: the queue's warm-up on a busy CPU server


@dataclass(frozen=True)
class EgoState:
    speed: float  # m/s, signed (negative when reversing)
    lane_offset: float | None  # m from the centre of its lane, positive left; None: the world cannot tell
    sim_time: float  # s, the moment of this state (the world now, not the moment the views show)


@dataclass(frozen=True)
class Frame:
    """One frame of a session.

    index: the session's frame count, 0 for its first.
    sim_time: s, the moment the views show.
    control_seq: the sequence number of the newest control the views show (0: none yet).
    views: (V, h, w, 3) uint8 RGB, the generated views in rig order; None when the session
        does not generate (`generate=False`).
    hdmap, boxes: (V, H, W, 3) uint8 RGB layout images of the world now (map lines; 3D
        boxes), None unless asked for (`layout=True`).
    ego: the ego's state now, None unless asked for (`layout=True`).
    """

    index: int
    sim_time: float
    control_seq: int
    views: np.ndarray | None
    hdmap: np.ndarray | None = None
    boxes: np.ndarray | None = None
    ego: EgoState | None = None


class Session(ABC):
    """A driving session; see the module's text. A context manager: leaving it closes it."""

    camera_names: list[str]

    @staticmethod
    def in_process(overrides: Sequence[str] = (), *, seed: int | None = None, autopilot: bool = False,
                   generate: bool = True, layout: bool = True) -> LocalSession:
        """A world and a queue in this process, composed from `conf/` with Hydra `overrides`.
        generate=False: no denoising, one frame per world tick at once (layout and ego
        state only): the fast way to train or test an agent on the layout."""
        return LocalSession(overrides, seed=seed, autopilot=autopilot, generate=generate, layout=layout)

    @staticmethod
    def over_http(url: str, options: Mapping | None = None, *, layout: bool = True,
                  timeout: float = FRAME_TIMEOUT_S) -> HttpSession:
        """A new session of the Serve app at `url`; options: `POST /sessions`' (seed,
        autopilot, overlay, record). ApiError names what the server refused."""
        return HttpSession(url, options, layout=layout, timeout=timeout)

    @abstractmethod
    def control(self, **changes) -> int:
        """Merge changes (throttle [0, 1], steer [-1, 1] (negative left), brake [0, 1], reverse,
        hand_brake, autopilot) into the sticky control; returns the control's sequence number.
        ValueError (in process) or ApiError (over HTTP) names a bad field or value."""

    @abstractmethod
    def next_frame(self) -> Frame:
        """The next frame (waits for it)."""

    def frames(self) -> Iterator[Frame]:
        while True:
            yield self.next_frame()

    @abstractmethod
    def close(self) -> None:
        """End the session (its car leaves the world)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def layout_images(conditions) -> tuple[np.ndarray, np.ndarray]:
    """A ConditionFrame's (hdmap, boxes) images, each (V, H, W, 3) uint8 RGB at the model
    resolution, converted as the app's layout.png converts them."""
    from dwm.pipelines.decode import to_uint8_views

    return tuple(to_uint8_views(images, images.shape[-2:]).numpy()
                 for images in (conditions.map_images, conditions.box_images))


class LocalSession(Session):
    """The session on the library in this process: its own world, builder and queue."""

    def __init__(self, overrides: Sequence[str] = (), *, seed: int | None = None, autopilot: bool = False,
                 generate: bool = True, layout: bool = True):
        from dwm.conditions.builder import ConditionBuilder
        from dwm.config import compose, instantiate
        from dwm.pipelines.streaming import StreamingPipeline
        from dwm.session import DrivingSession

        overrides = [*overrides, *([f"seed={int(seed)}"] if seed is not None else [])]
        self.cfg = compose(overrides)
        self.world = instantiate(self.cfg, "world")
        self.builder = ConditionBuilder.from_config(self.cfg)
        self.camera_names = list(self.builder.rig.names)
        self.pipeline = StreamingPipeline.from_config(self.cfg, views=self.builder.num_views) if generate else None
        depth = self.pipeline.depth if generate else 0
        self.session = DrivingSession.start(self.world, self.builder, depth, autopilot=autopilot)
        self.layout = layout
        self._closed = False

    def control(self, **changes) -> int:
        return self.session.apply_control(self.world, **changes)["seq"]

    def next_frame(self) -> Frame:
        if self._closed:
            raise RuntimeError("the session is closed")
        while True:
            if self.pipeline is not None:
                out = self.session.step(self.world, self.pipeline)
            else:  # the conditions are the frame: the session counts it in and out at once
                seen = self.session.controls_applied
                observation = self.world.observe(self.session.ego_id)
                conditions = self.session.build(observation)
                self.session.pushed(observation, conditions, seen)
                out = self.session.delivered([SimpleNamespace(images=None)])
            self.world.tick()
            if out:
                return self._frame(out[0])

    def _frame(self, generated) -> Frame:
        views = None if generated.images is None else generated.images.numpy()
        hdmap = boxes = ego = None
        if self.layout:
            newest = self.session.last_observation
            hdmap, boxes = layout_images(self.session.last_conditions.unpack())
            ego = EgoState(float(newest.ego_speed), newest.lane_offset, float(newest.sim_time))
        return Frame(generated.index, float(generated.conditions.sim_time), generated.control_seq, views,
                     hdmap, boxes, ego)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.session.close(self.world)
            self.world.close()


class HttpSession(Session):
    """The session in a running Serve app, over its HTTP API: the frames come from its MJPEG
    stream (the views side by side, cut apart here), the layout from `layout.png`, the ego's
    state from the session's stats."""

    def __init__(self, url: str, options: Mapping | None = None, *, layout: bool = True,
                 timeout: float = FRAME_TIMEOUT_S):
        self.client = SessionClient.create(url, dict(options or {}))
        self.layout, self.timeout = layout, timeout
        try:
            state = self.client.state()
            self._video_url = state["streams"]["mjpeg"]
            if self._video_url.startswith("/"):
                self._video_url = url.rstrip("/") + self._video_url
            self.camera_names = list(state.get("cameras") or [])
            self._stream = None
            self._closed = False
        except BaseException:
            self.client.delete()
            raise

    def control(self, **changes) -> int:
        return self.client.control(**changes)["seq"]

    def next_frame(self) -> Frame:
        if self._closed:
            raise RuntimeError("the session is closed")
        if self._stream is None:
            request = urllib.request.Request(self._video_url, headers={"Authorization": f"Bearer {self.client.token}"})
            try:
                self._stream = urllib.request.urlopen(request, timeout=self.timeout)
            except OSError as err:
                raise ApiError(f"cannot open the session's video at {self._video_url}: {err}") from None
        headers, jpeg = read_mjpeg_part(self._stream)
        strip = decode_image(jpeg)
        views = split_strip(strip, self._views())
        hdmap = boxes = ego = None
        if self.layout:
            hdmap, boxes = (self._layout(kind) for kind in ("map", "boxes"))
            stats = self.client.state()["stats"]
            ego = EgoState(float(stats["ego_speed"]), stats.get("lane_offset"), float(stats["sim_time"]))
        return Frame(int(headers["x-frame-index"]), float(headers["x-sim-time"]),
                     int(headers.get("x-control-seq", 0)), views, hdmap, boxes, ego)

    def _views(self) -> int:
        if not self.camera_names:
            raise ApiError("the server does not say how many cameras the session has (state 'cameras')")
        return len(self.camera_names)

    def _layout(self, kind: str) -> np.ndarray | None:
        request = urllib.request.Request(f"{self.client.url.rstrip('/')}/sessions/{self.client.id}/layout.png?kind={kind}",
                                         headers={"Authorization": f"Bearer {self.client.token}"})
        with urllib.request.urlopen(request, timeout=self.client.timeout) as answer:
            if answer.status == 204:
                return None
            return split_strip(decode_image(answer.read()), self._views())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.close()
        try:
            self.client.delete()
        except ApiError as err:
            if err.status != 404:  # already ended is ended
                raise


def read_mjpeg_part(stream) -> tuple[dict[str, str], bytes]:
    """The next part of a multipart/x-mixed-replace stream: (its headers, lower-case names;
    its body, Content-Length bytes). EOFError when the stream has ended."""
    line = b""
    while not line.startswith(b"--"):  # the boundary line
        line = stream.readline()
        if not line:
            raise EOFError("the video stream ended (the session is over)")
    headers = {}
    while True:
        line = stream.readline()
        if not line:
            raise EOFError("the video stream ended in a frame's headers")
        line = line.strip()
        if not line:
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    body = stream.read(length)
    if len(body) != length:
        raise EOFError("the video stream ended in a frame")
    return headers, body


def decode_image(data: bytes) -> np.ndarray:
    """A JPEG or PNG -> (H, W, 3) uint8 RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not an image the server would send (JPEG or PNG)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def split_strip(strip: np.ndarray, views: int) -> np.ndarray:
    """(h, V * w, 3) views side by side -> (V, h, w, 3)."""
    h, width, _ = strip.shape
    if width % views:
        raise ValueError(f"a strip {width} px wide does not hold {views} views of one width")
    return np.ascontiguousarray(strip.reshape(h, views, width // views, 3).transpose(1, 0, 2, 3))

