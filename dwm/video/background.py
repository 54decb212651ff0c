"""A `VideoEncoder` on its own thread, so that a slow or unreachable RTSP server (or disk)
never holds up the frame loop: frames wait in a short queue, and when it is full the oldest
waiting frame is dropped (a live stream would rather skip than fall behind).

An output that can come back (an RTSP server restarted) is reopened: with `retry_s`, a
connection error ends that encoder, the frames that come meanwhile are dropped (counted), and
a new encoder is tried with the next frame once `retry_s` has passed, as long as it fails;
`error` says why while it is down and is cleared when frames flow again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from dwm.video.encoder import StreamConnectionError, VideoEncoder

log = logging.getLogger(__name__)

_CLOSE = object()  # queue sentinel: flush, finish and stop


class BackgroundEncoder:
    """Encodes (strip, sim_time) pairs through a `VideoEncoder` built on the worker thread.

    open_encoder: builds the encoder (called on the thread: opening an RTSP output may wait
        for the server). max_pending: frames that may wait; beyond, the oldest goes.
    retry_s: reopen after a `StreamConnectionError`, at most every retry_s seconds (None: the
        first error ends the output, as for a file).
    """

    def __init__(self, open_encoder: Callable[[], VideoEncoder], max_pending: int = 30, name: str = "video",
                 retry_s: float | None = None):
        if not (isinstance(max_pending, int) and max_pending >= 1):
            raise ValueError(f"max_pending must be a whole number >= 1, got {max_pending!r}")
        self._open = open_encoder
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()  # makes drop-oldest-then-put atomic against other submitters
        self.published = 0
        self.dropped = 0
        self.error: str | None = None  # why the video stopped (or, with retry_s, is down now)
        self.reconnects = 0  # times the output came back after an error
        self.retry_s = retry_s
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"publisher-{name}", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray, sim_time: float) -> bool:
        """Queue a frame; never blocks. False when the video has stopped (see `error`) or is closed."""
        if self._closed or (self.error is not None and self.retry_s is None):
            return False
        with self._lock:
            while True:
                try:
                    self._queue.put_nowait((image, sim_time))
                    return True
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Publish what waits, finish the file / end the RTSP session, stop the thread (waits
        up to `timeout` s for room in the queue, then up to `timeout` s for the thread)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_CLOSE, timeout=timeout)  # after the frames that wait
        except queue.Full:  # the output is stuck: make room for the sentinel
            with self._lock:
                while True:
                    try:
                        self._queue.put_nowait(_CLOSE)
                        break
                    except queue.Full:
                        self._queue.get_nowait()
                        self.dropped += 1
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the video thread did not finish within %.1f s; left to end on its own", timeout)

    def _run(self) -> None:
        publisher: VideoEncoder | None = None
        next_try = 0.0  # monotonic time of the next reopening, while the output is down
        try:
            try:
                publisher = self._open()  # before the first frame: a file exists from the start
            except StreamConnectionError as e:
                if self.retry_s is None:
                    raise
                next_try = self._down(e)
            while True:
                item = self._queue.get()
                if item is _CLOSE:
                    break
                if publisher is None and time.monotonic() < next_try:
                    self.dropped += 1
                    continue
                try:
                    if publisher is None:
                        publisher = self._open()
                    publisher.publish(*item)
                except StreamConnectionError as e:
                    if self.retry_s is None:
                        raise
                    self.dropped += 1
                    if publisher is not None:
                        _close_quietly(publisher)
                    publisher, next_try = None, self._down(e)
                    continue
                self.published += 1
                if self.error is not None:  # back after an error
                    log.warning("video out back after: %s", self.error)
                    self.error, self.reconnects = None, self.reconnects + 1
        except Exception as e:  # recorded for the session's stats; the frame loop goes on
            self.error = f"{type(e).__name__}: {e}"
            log.warning("video out stopped: %s", self.error)
        finally:
            if publisher is not None:
                _close_quietly(publisher)

    def _down(self, error: StreamConnectionError) -> float:
        """Note the output down; returns when to try it again (monotonic s)."""
        if self.error is None:
            log.warning("video out down, reopening every %.1f s: %s", self.retry_s, error)
        self.error = f"{type(error).__name__}: {error}"
        return time.monotonic() + self.retry_s


def _close_quietly(publisher: VideoEncoder) -> None:
    try:
        publisher.close(raise_errors=False)
    except Exception:
        log.exception("closing the video publisher failed")
