"""The Publisher of one driving session: JPEG frames for HTTP viewers, H.264 to RTSP / MP4.

Back-pressure: `offer` never blocks the frame loop. Viewers read the newest JPEG only (a slow
viewer skips frames, it never holds one back); the H.264 output runs on its own thread with
a short queue (see `BackgroundEncoder`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dwm.config import condition_fps
from dwm.pipelines.streaming import GeneratedFrame
from dwm.video.background import BackgroundEncoder
from dwm.video.compose import compose_strip
from dwm.video.encoder import VideoEncoder
from dwm.video.stills import encode_jpeg

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class JpegFrame:
    index: int  # the session's frame index (0 for the first frame out of its queue)
    sim_time: float  # s, the moment the frame shows
    jpeg: bytes
    control_seq: int = 0  # the newest control the frame shows (GeneratedFrame.control_seq)


class StreamClosed(Exception):
    """The session's stream has ended (the session was deleted)."""


class SessionPublisher:
    """overlay: draw the layout over the views; rtsp_url / record_path: H.264 outputs (or None)."""

    def __init__(
        self,
        cfg: DictConfig,
        name: str,
        overlay: bool,
        rtsp_url: str | None = None,
        record_path: Path | None = None,
    ):
        self.quality = int(cfg.serve.jpeg_quality)
        self.overlay = overlay
        self.side_by_side = bool(cfg.stream.side_by_side)
        # One encoder thread per output, so that an RTSP server going away never ends the
        # recording (and a full disk never ends the stream).
        stream, fps, pending = cfg.stream, condition_fps(cfg), int(cfg.serve.video_queue)
        self.outputs: dict[str, BackgroundEncoder] = {}
        if rtsp_url:
            self.outputs["rtsp"] = BackgroundEncoder(
                lambda: VideoEncoder.from_config(stream, rtsp_url=rtsp_url, fps=fps), pending, f"{name}-rtsp",
                retry_s=float(stream.rtsp.retry_s),  # a restarted RTSP server gets the stream again
            )
        self._name, self._stream, self._fps, self._pending_limit = name, stream, fps, pending
        self.recording_path: Path | None = None  # the MP4 being written, if one is
        self.recordings: list[Path] = []  # the finished MP4s, oldest first
        if record_path:
            self.start_recording(record_path)
        self.latest: JpegFrame | None = None
        self.viewers = 0
        self.skipped = 0  # frames replaced by a newer one before they were encoded
        self.closed = False
        self._closing = False
        self._changed = asyncio.Condition()
        self._pending: GeneratedFrame | None = None
        self._encoder: asyncio.Task | None = None

    def offer(self, frame: GeneratedFrame) -> None:
        """Hand over a generated frame (from the event loop; returns at once)."""
        if self._closing:
            return
        if self._pending is not None:  # encoding has fallen behind: the newer frame wins
            self.skipped += 1
        self._pending = frame
        if self._encoder is None or self._encoder.done():
            self._encoder = asyncio.create_task(self._encode_pending())

    async def _encode_pending(self) -> None:
        while self._pending is not None:
            frame, self._pending = self._pending, None
            try:
                strip, jpeg = await asyncio.to_thread(self._encode, frame)
            except Exception:
                log.exception("encoding frame %d failed; the stream goes on with the next", frame.index)
                self.skipped += 1
                continue
            sim_time = float(frame.conditions.sim_time)
            for output in self.outputs.values():
                output.submit(strip, sim_time)
            async with self._changed:
                self.latest = JpegFrame(frame.index, sim_time, jpeg, frame.control_seq)
                self._changed.notify_all()

    def _encode(self, frame: GeneratedFrame) -> tuple[np.ndarray, bytes]:
        layout = frame.conditions.layout if self.overlay else None
        cameras = frame.conditions.camera_images if self.side_by_side else None
        strip = compose_strip(frame.images, layout, cameras)  # (h or 2h, V*w, 3) uint8
        return strip, encode_jpeg(strip, self.quality)

    async def next_frame(self, after: int, timeout: float) -> JpegFrame | None:
        """The newest frame once its index is above `after`; None if none came within `timeout` s."""

        def ready() -> bool:
            return self.closed or (self.latest is not None and self.latest.index > after)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
            except asyncio.TimeoutError:
                return None
        if self.closed:
            raise StreamClosed("the session's stream has ended")
        return self.latest

    async def close(self) -> None:
        """End the viewers' streams, finish the MP4 and the RTSP session."""
        if self._closing:
            return
        self._closing = True
        if self._encoder is not None:
            await self._encoder  # the frames already handed over still go out
        self.closed = True
        async with self._changed:
            self._changed.notify_all()
        for output in self.outputs.values():
            await asyncio.to_thread(output.close)
        if self.recording_path is not None:
            self.recordings.append(self.recording_path)
            self.recording_path = None

    def end(self) -> None:
        """`close` from synchronous code (the app shutting down): the frame being encoded is
        dropped; the MP4 and the RTSP session are finished before this returns."""
        self._closing = self.closed = True
        if self._encoder is not None:
            self._encoder.cancel()
        for output in self.outputs.values():
            output.close()

    def start_recording(self, path: Path) -> None:
        """Record the frames from now on into a new MP4 at `path` (from the event loop)."""
        stream, fps = self._stream, self._fps
        self.outputs["recording"] = BackgroundEncoder(
            lambda: VideoEncoder.from_config(stream, record_path=path, fps=fps), self._pending_limit, f"{self._name}-mp4"
        )
        self.recording_path = path

    async def stop_recording(self) -> Path | None:
        """Finish the MP4 being written (its frames so far all in it); returns its path, or None
        when none was being written."""
        output = self.outputs.pop("recording", None)
        path, self.recording_path = self.recording_path, None
        if output is None:
            return None
        await asyncio.to_thread(output.close)
        self.recordings.append(path)
        return path

    def backlog(self) -> int:
        """Frames waiting for the H.264 encoders (the most behind of RTSP and recording)."""
        return max((output.pending for output in self.outputs.values()), default=0)

    def output_stats(self, kind: str) -> dict | None:
        """{published, dropped, error, reconnects} of the "rtsp" or "recording" output; None without one.
        Frames skipped before encoding (see `offer`) count as dropped."""
        output = self.outputs.get(kind)
        if output is None:
            return None
        return {"published": output.published, "dropped": output.dropped + self.skipped, "error": output.error,
                "reconnects": output.reconnects}
