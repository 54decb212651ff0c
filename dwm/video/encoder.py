"""H.264 video out through PyAV: an MP4 recording and/or a live RTSP push.

Each sink (file, RTSP) has its own encoder with the same settings. That keeps the two
bitstreams independent: only the RTSP path appends an access-unit delimiter to every packet
(see `ACCESS_UNIT_DELIMITER`), the file keeps exactly what x264 wrote, and encoding a 912x172
strip costs about 1.6 ms. The RGB -> YUV 4:2:0 conversion is done once per frame and shared.

Frame timestamps follow the simulation clock: time base 1/1000 s, pts = round(sim_time * 1000).
The stream clock never runs backwards. When a frame's sim time is not after the previous
frame's (a repeated moment, or a world that was reset), the frame is placed one frame
interval (1/fps) after the previous frame, and later frames keep the sim clock's steps from
there on (the offset is kept). No frame is dropped.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, get_args

import av
import numpy as np

from dwm.settings import RtspTransport

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 1000)  # s per pts tick
# Access-unit delimiter NAL (Annex B start code, type 9, any slice type). FFmpeg's RTSP/H.264
# reader holds each frame until it sees the start of the next access unit; an AUD right
# after the frame ends it, so the receiver shows the frame at once instead of one frame
# interval late (measured: 503 ms at 2 fps without it, about 2 ms with it). A delimiter after
# the very last frame would reach the reader alone at teardown, an access unit without a
# picture ("missing picture in access unit", "no frame!"): closing the stream sends the last
# picture once more, one frame interval later, without one (`_RtspSink.close`).
ACCESS_UNIT_DELIMITER = b"\x00\x00\x00\x01\x09\xf0"
RTSP_TRANSPORTS = get_args(RtspTransport)
_SESSION_ID = re.compile(r"^[A-Za-z0-9._-]+$")


class StreamConnectionError(ConnectionError):
    """The RTSP server could not be reached, or it dropped the connection."""


@dataclass(frozen=True)
class _EncoderSettings:
    codec: str
    rate: Fraction  # nominal frames per second
    options: dict[str, str]  # encoder options (x264: preset, tune, crf, g)
    step: int  # pts ticks of one frame interval (1/fps)


def session_rtsp_url(base_url: str, session_id: str) -> str:
    """The RTSP URL of one driving session: `{base_url}/{session_id}` (config `stream.rtsp.url`)."""
    _check_rtsp_url(base_url)
    if not _SESSION_ID.match(session_id):
        raise ValueError(
            f"session id {session_id!r} cannot be put in an RTSP path: use letters, digits, '.', '_' and '-'"
        )
    return f"{base_url.rstrip('/')}/{session_id}"


class VideoEncoder:
    """Encodes RGB frames to H.264 and writes them to an MP4 file and/or pushes them over RTSP.

    The frame size is taken from the first frame; every later frame must have the same size.
    H.264 in YUV 4:2:0 needs even sizes: a frame with an odd height or width is padded by
    one row / column that repeats its last one (a warning is logged once).

    Not thread-safe: call `publish` from one thread. Usable as a context manager;
    `close()` flushes the encoders and finishes the file; closing twice does nothing.
    """

    def __init__(
        self,
        record_path: str | Path | None = None,
        rtsp_url: str | None = None,
        fps: float = 10.0,
        codec: str = "libx264",
        preset: str = "ultrafast",
        tune: str | None = "zerolatency",
        crf: int | float = 20,
        gop: int = 10,
        transport: str = "tcp",
        connect_timeout: float = 10.0,
    ) -> None:
        """
        record_path: MP4 (or other container, by extension) file to write; its folder must exist.
        rtsp_url: `rtsp://host:port/path` of an RTSP server that accepts publishers (MediaMTX).
        fps: nominal frame rate (frames per second of sim time); timestamps come from
            `publish(sim_time=...)`, the rate is a hint for players and the step of the
            clock rule in the module docstring.
        codec, preset, tune, crf, gop: encoder and its x264 settings (`gop`: frames between key
            frames); `tune=None` leaves the tuning unset.
        transport: how RTSP carries the media, "tcp" or "udp".
        connect_timeout: s to wait for the RTSP server (and for each write to it).
        """
        if record_path is None and rtsp_url is None:
            raise ValueError("VideoEncoder needs a record_path, an rtsp_url, or both; got neither")
        if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if not (isinstance(gop, int) and gop >= 1):
            raise ValueError(f"gop must be a whole number of frames >= 1, got {gop!r}")
        if transport not in RTSP_TRANSPORTS:
            raise ValueError(f"RTSP transport must be one of {RTSP_TRANSPORTS}, got {transport!r}")
        if rtsp_url is not None:
            _check_rtsp_url(rtsp_url)
        self.fps = float(fps)
        options = {"preset": str(preset), "crf": str(crf), "g": str(gop)}
        if tune is not None:
            options["tune"] = str(tune)
        # PyAV takes the rate as an int or Fraction, not a float.
        step = max(1, round(1 / (self.fps * TIME_BASE)))
        settings = _EncoderSettings(codec, Fraction(self.fps).limit_denominator(1001), options, step)
        _check_encoder_settings(settings)
        # Frame interval in pts ticks, the step used when sim time does not advance.
        self._step = step

        self._sinks: list[_Sink] = []
        try:
            if record_path is not None:
                self._sinks.append(_FileSink(Path(record_path), settings))
            if rtsp_url is not None:
                self._sinks.append(_RtspSink(rtsp_url, settings, transport, connect_timeout))
        except BaseException:
            self._close_sinks(flush=False)
            raise

        self._size: tuple[int, int] | None = None  # (H, W) of the frames given
        self._padded: np.ndarray | None = None  # (H', W', 3) buffer for odd sizes, reused
        self._last_pts: int | None = None
        self._pts_offset = 0
        self._frames = 0
        self._closed = False

    @classmethod
    def from_config(
        cls,
        stream_cfg: Mapping[str, Any],
        record_path: str | Path | None = None,
        rtsp_url: str | None = None,
        *,
        fps: float = 10.0,
    ) -> VideoEncoder:
        """Build from the `stream` config group (codec, preset, tune, crf, gop, rtsp.transport).

        The RTSP URL is given here, not read from `stream.rtsp.url`, since each driving
        session has its own (see `session_rtsp_url`). fps: `dwm.config.condition_fps` of the config.
        """
        rtsp_cfg = stream_cfg.get("rtsp") or {}
        return cls(
            record_path=record_path,
            rtsp_url=rtsp_url,
            fps=fps,
            codec=stream_cfg.get("codec", "libx264"),
            preset=stream_cfg.get("preset", "ultrafast"),
            tune=stream_cfg.get("tune", "zerolatency"),
            crf=stream_cfg.get("crf", 20),
            gop=stream_cfg.get("gop", 10),
            transport=rtsp_cfg.get("transport", "tcp"),
        )

    @property
    def frames_published(self) -> int:
        return self._frames

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, image: np.ndarray, sim_time: float) -> None:
        """Encode and send one frame.

        image: (H, W, 3) uint8 RGB, e.g. the strip from `compose_strip`.
        sim_time: s, the simulation time the frame shows (its timestamp).
        """
        if self._closed:
            raise RuntimeError("this VideoEncoder is closed; create a new one to publish again")
        frame = av.VideoFrame.from_ndarray(self._even_sized(image), format="rgb24")
        frame = frame.reformat(format="yuv420p")  # once, shared by the sinks
        frame.pts = self._next_pts(sim_time)
        frame.time_base = TIME_BASE
        try:
            for sink in self._sinks:
                sink.write(frame)
        except BaseException:
            # A sink that failed leaves the publisher unusable; finish the others cleanly.
            self.close(raise_errors=False)
            raise
        self._frames += 1

    def close(self, raise_errors: bool = True) -> None:
        """Flush the encoders, finish the file and end the RTSP session. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        error = self._close_sinks(flush=True)
        if error is not None and raise_errors:
            raise error

    def __enter__(self) -> VideoEncoder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception, still finish what was written, but let the original error through.
        self.close(raise_errors=exc_type is None)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close(raise_errors=False)

    def _close_sinks(self, flush: bool) -> BaseException | None:
        first: BaseException | None = None
        for sink in self._sinks:
            try:
                sink.close(flush)
            except Exception as e:  # keep closing the others
                first = first or e
        return first

    def _even_sized(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> the same, padded to even sizes by repeating the last row/column."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            shape = image.shape if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"a published frame must be an (H, W, 3) RGB numpy array, got {shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"a published frame must be uint8 (0..255), got dtype {image.dtype}")
        h, w = image.shape[:2]
        if self._size is None:
            if h < 2 or w < 2:
                raise ValueError(f"a published frame must be at least 2x2 pixels, got {h}x{w} (HxW)")
            self._size = (h, w)
            if h % 2 or w % 2:
                self._padded = np.empty((h + h % 2, w + w % 2, 3), np.uint8)
                log.warning(
                    "frames of %dx%d (HxW) are padded to %dx%d: H.264 in YUV 4:2:0 needs even sizes",
                    h, w, *self._padded.shape[:2],
                )
        elif (h, w) != self._size:
            raise ValueError(
                f"frame size changed from {self._size[0]}x{self._size[1]} to {h}x{w} (HxW); "
                "all frames of one stream must have the size of the first"
            )
        if self._padded is None:
            return np.ascontiguousarray(image)
        buf = self._padded
        buf[:h, :w] = image
        buf[h:, :w] = image[h - 1 :]
        buf[:, w:] = buf[:, w - 1 : w]
        return buf

    def _next_pts(self, sim_time: float) -> int:
        """sim time (s) -> pts in TIME_BASE ticks, strictly increasing (rule: module docstring)."""
        if not (isinstance(sim_time, numbers.Real) and math.isfinite(sim_time)):
            raise ValueError(f"sim_time must be a finite number of seconds, got {sim_time!r}")
        pts = round(float(sim_time) / TIME_BASE) + self._pts_offset
        if self._last_pts is not None and pts <= self._last_pts:
            moved = self._last_pts + self._step
            log.log(
                logging.WARNING if self._pts_offset == 0 else logging.DEBUG,
                "sim time %.3f s is not after the previous frame; the stream clock moves on by one "
                "frame interval instead and keeps that shift",
                sim_time,
            )
            self._pts_offset += moved - pts
            pts = moved
        self._last_pts = pts
        return pts


class _Sink:
    """One output container with its own H.264 stream, added when the first frame arrives."""

    def __init__(self, container: av.container.OutputContainer, settings: _EncoderSettings) -> None:
        self._container = container
        self._settings = settings
        self._stream: av.video.stream.VideoStream | None = None
        self._last: av.VideoFrame | None = None  # the last frame written

    def write(self, frame: av.VideoFrame) -> None:
        if self._stream is None:
            self._stream = self._add_stream(frame)
        for packet in self._stream.encode(frame):
            self._mux(packet)
        self._last = frame

    def close(self, flush: bool) -> None:
        try:
            if flush and self._stream is not None:
                self._finish()
        finally:
            self._container.close()

    def _finish(self) -> None:
        """Flush the encoder into the container."""
        for packet in self._stream.encode(None):
            self._mux(packet)

    def _add_stream(self, frame: av.VideoFrame) -> av.video.stream.VideoStream:
        s = self._settings
        stream = self._container.add_stream(s.codec, rate=s.rate, options=dict(s.options))
        stream.width = frame.width
        stream.height = frame.height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = TIME_BASE
        return stream

    def _mux(self, packet: av.Packet) -> None:
        self._container.mux(packet)


class _FileSink(_Sink):
    def __init__(self, path: Path, settings: _EncoderSettings) -> None:
        if not path.parent.is_dir():
            raise FileNotFoundError(
                f"cannot record video to {str(path)!r}: the folder {str(path.parent)!r} does not exist"
            )
        try:
            container = av.open(str(path), mode="w")
        except ValueError as e:
            raise ValueError(
                f"cannot record video to {str(path)!r}: no container format for its extension "
                "(use .mp4 or .mkv)"
            ) from e
        except OSError as e:
            raise OSError(f"cannot record video to {str(path)!r}: {e}") from e
        super().__init__(container, settings)


class _RtspSink(_Sink):
    """Pushes to an RTSP server (ANNOUNCE/RECORD). The connection is made on the first mux,
    which holds the GIL through the handshake: milliseconds with a server up, at most
    `timeout` with one that does not answer."""

    def __init__(self, url: str, settings: _EncoderSettings, transport: str, timeout: float) -> None:
        self._url = url
        try:
            # FFmpeg connects lazily: a missing server shows up on the first mux, not here.
            # `timeout` (us) bounds each socket wait: without it a server that accepts the TCP
            # connection but never answers blocks the first mux forever.
            container = av.open(
                url,
                mode="w",
                format="rtsp",
                options={"rtsp_transport": transport, "timeout": str(round(timeout * 1e6))},
                timeout=timeout,
            )
        except OSError as e:
            raise StreamConnectionError(f"cannot open the RTSP output {url!r}: {e}") from e
        super().__init__(container, settings)
        self._connected = False

    def _mux(self, packet: av.Packet) -> None:
        if packet.size == 0:
            return
        # Copy the packet with an AUD appended so the receiver shows it without waiting for the
        # next one (see ACCESS_UNIT_DELIMITER). Only here: an MP4 stores length-prefixed NALs.
        out = av.Packet(bytes(packet) + ACCESS_UNIT_DELIMITER)
        out.pts = packet.pts
        out.dts = packet.dts
        out.time_base = packet.time_base
        out.stream = packet.stream
        out.is_keyframe = packet.is_keyframe
        try:
            self._container.mux(out)
        except (OSError, av.error.FFmpegError) as e:
            if not self._connected:
                raise StreamConnectionError(
                    f"no RTSP server accepts publishers at {self._url!r} ({type(e).__name__}: {e}). "
                    "Start one first: MediaMTX (`docker run --rm -p 8554:8554 bluenviron/mediamtx`) "
                    "or any RTSP server that accepts publishers; or set stream.rtsp.url to one that runs"
                ) from e
            raise StreamConnectionError(f"the RTSP server at {self._url!r} dropped the stream ({e})") from e
        self._connected = True

    def _finish(self) -> None:
        """Repeat the last picture one frame interval later and send it, and whatever the encoder
        still holds, without delimiters: the stream then ends on a picture, not on a lone AUD."""
        if self._last is None or not self._connected:
            return super()._finish()
        again = self._last.reformat()  # a copy, so the caller's frame keeps its pts
        again.pts = self._last.pts + self._settings.step
        again.time_base = TIME_BASE
        packets = [*self._stream.encode(again), *self._stream.encode(None)]
        for packet in packets:
            if packet.size:
                self._container.mux(packet)


def _check_encoder_settings(settings: _EncoderSettings) -> None:
    """Open the encoder once on a tiny frame size so that bad settings fail at start (about 5 ms)."""
    try:
        ctx = av.CodecContext.create(settings.codec, "w")
    except Exception:
        raise ValueError(
            f"unknown video encoder {settings.codec!r} (config stream.codec): FFmpeg here has no "
            "encoder of that name; libx264 is the default"
        ) from None
    ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = 16, 16, "yuv420p", TIME_BASE
    ctx.options = dict(settings.options)
    try:
        ctx.open()
    except av.error.FFmpegError as e:
        raise ValueError(
            f"the {settings.codec} encoder rejects the settings {settings.options} "
            "(config stream.preset / stream.tune / stream.crf / stream.gop)"
        ) from e


def _check_rtsp_url(url: str) -> None:
    if not (isinstance(url, str) and re.match(r"^rtsps?://[^/\s]+", url)):
        raise ValueError(f"an RTSP URL must look like rtsp://host:port/path, got {url!r}")
