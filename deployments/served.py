"""A driving session as the Serve app holds it (`ServedSession`: the `DrivingSession` with its
id, tokens, options, publisher and stream paths), and reading the errors other actors raise."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import asdict

from ray.exceptions import RayActorError

from deployments import metrics
from deployments.publisher import SessionPublisher
from dwm.session import DrivingSession
from dwm.world.base import UnknownEgoError, WorldUnavailableError

MAX_VIEW_TOKENS = 64  # viewer tokens per session (its own included)


MAX_ENDED_REMEMBERED = 4096  # ended sessions whose driver still hears "ended" (the oldest are forgotten)


class EndedSessions:
    """The ids of the sessions that ended most recently, each with a digest of its driver's
    token (not the token): the driver asking after an ended session hears that it ended
    (404), anyone else that their token is not its (403), as while it ran; and new sessions
    do not take these ids. Bounded: past `limit`, the oldest are forgotten."""

    def __init__(self, limit: int = MAX_ENDED_REMEMBERED):
        self.limit = limit
        self._digests: OrderedDict[str, bytes] = OrderedDict()

    def add(self, session_id: str, token: str) -> None:
        self._digests[session_id] = _digest(token)
        while len(self._digests) > self.limit:
            self._digests.popitem(last=False)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._digests

    def __iter__(self):
        return iter(self._digests)

    def ended_by(self, session_id: str, token: str | None) -> bool:
        """Whether `token` was the driver's token of the ended session `session_id`."""
        digest = self._digests.get(session_id)
        return bool(token) and digest is not None and secrets.compare_digest(_digest(token), digest)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_session_id(taken: Container[str], draw: Callable[[], str] = lambda: secrets.token_hex(8)) -> str:
    """A new session id: 64 random bits (16 hex digits), none of the `taken` ones. Ids are in
    URLs and listed by GET /sessions, so they need not be secret (the token is), but they must
    not be guessed into a collision."""
    while (session_id := draw()) in taken:
        pass
    return session_id


class ServedSession:
    """A driving session as the app serves it: the `DrivingSession` (control, frames, stats)
    with what HTTP needs around it: its id, tokens, options, publisher and stream paths.

    Two kinds of token: the driver's (`token`: drive, end, share, and see), and read-only
    viewer tokens (`view_tokens`: see the state, video and layout). The first viewer token is
    minted with the session and goes into its stream URLs (`?token=`), so a URL handed to a
    player never carries the driver's token; `POST /sessions/{id}/share` mints more."""

    def __init__(
        self,
        session_id: str,
        token: str,
        session: DrivingSession,
        publisher: SessionPublisher,
        options: dict,
        rtsp_url: str | None,
        model: dict | None = None,
    ):
        self.id, self.token, self.session = session_id, token, session
        self.model = model or {}  # `dwm.models.checkpoint.weights_summary`
        self.publisher, self.options, self.rtsp_url = publisher, options, rtsp_url
        self.watch = secrets.token_urlsafe(18)  # the viewer token of the session's own stream URLs
        self.view_tokens: set[str] = {self.watch}
        self._reported = (0, None)  # frames out, control latency: as last reported to the metrics
        self.created = time.time()
        self.control_lock = asyncio.Lock()  # one control merge at a time

    def streams(self, view_token: str | None = None) -> dict:
        """The stream paths; view_token: a viewer token put into the MJPEG URL (None: none)."""
        query = f"?token={view_token}" if view_token else ""
        return {"mjpeg": f"/sessions/{self.id}/video.mjpg{query}", "rtsp": self.rtsp_url}

    def may_drive(self, token: str | None) -> bool:
        # Compared as bytes: compare_digest raises TypeError for non-ASCII str, and any
        # malformed token is simply not the session's.
        return bool(token) and secrets.compare_digest(token.encode("utf-8", "surrogatepass"), self.token.encode("utf-8"))

    def view_token_for(self, token: str | None) -> str | None:
        """The viewer token that `token` opens this session with: the driver's token opens it
        with the session's own; a viewer token with itself; anything else with none."""
        if self.may_drive(token):
            return self.watch
        given = token.encode("utf-8", "surrogatepass") if token else b""
        return next((v for v in self.view_tokens if token and secrets.compare_digest(given, v.encode("utf-8"))), None)

    def state(self, sim_time: float, world_error: str | None = None, view_token: str | None = None,
              denoiser_error: str | None = None, waiting: str | None = None) -> dict:
        """The session's answer (`schemas.SessionState`); sim_time: the world's now; view_token:
        the viewer token in its stream URLs; world_error / denoiser_error: why that part cannot
        be reached now, if it cannot (the world's reason first); waiting: why the session has
        no denoiser queue now, if it has none."""
        stats = self.session.stats(sim_time)
        if world_error:
            state = "world unavailable"
        elif denoiser_error:
            state = "denoiser unavailable"
        elif waiting:
            state = "waiting"
        else:
            state = "running" if stats.frames_out else "warming"
        latency_s = stats.control_latency_s
        # The queue's warm-up: frames pushed of those until the first picture (1 once pictures come).
        progress = 1.0 if stats.frames_out else round(min(stats.frames_in / (stats.queue_depth + 1), 1.0), 3)
        return {
            "id": self.id,
            "state": state,
            "progress": progress,
            "error": world_error or denoiser_error or waiting,
            "ego": self.session.ego_id,
            "cameras": list(self.session.builder.rig.names),
            "model": self.model,
            "created": self.created,
            "options": self.options,
            "control": self.session.control_state(),
            "streams": self.streams(view_token),
            "stats": {
                **asdict(stats),
                "fps": round(stats.fps, 3),
                "control_latency_s": None if latency_s is None else round(latency_s, 4),
                "viewers": self.publisher.viewers,
                "rtsp": self.publisher.output_stats("rtsp"),
                "recording": self.publisher.output_stats("recording"),
                "recordings": len(self.publisher.recordings),
            },
        }

    def report_metrics(self) -> None:
        """Hand the session's news since the last call to the app's metrics (`deployments.metrics`)."""
        stats, tags = self.session.stats(), {"session": self.id}
        frames, latency = self._reported
        if stats.frames_out > frames:
            metrics.frames_out().inc(stats.frames_out - frames, tags=tags)
        metrics.frames_skipped().set(self.publisher.skipped, tags=tags)
        measured = (stats.control_latency_frames, stats.control_latency_s)
        if stats.control_latency_s is not None and measured != latency:  # a control has just been shown
            metrics.control_latency().observe(stats.control_latency_s)
        self._reported = (stats.frames_out, measured)
        metrics.session_fps().set(stats.fps, tags=tags)
        metrics.queue_depth().set(stats.queue_depth, tags=tags)
        metrics.encoder_backlog().set(self.publisher.backlog(), tags=tags)

    def ended_metrics(self) -> None:
        """The session has ended: its gauges fall to 0 (Ray keeps a series' last value)."""
        tags = {"session": self.id}
        for gauge in (metrics.session_fps, metrics.queue_depth, metrics.encoder_backlog):
            gauge().set(0, tags=tags)


def world_unavailable(err: BaseException) -> WorldUnavailableError | None:
    """The WorldUnavailableError behind an error from the World actor (Ray wraps it), if any."""
    # The original first: Ray's wrapper is an instance of the class too, but its text carries
    # the remote traceback.
    for candidate in (getattr(err, "cause", None), err.__cause__, err):
        if isinstance(candidate, WorldUnavailableError):
            return candidate
    return None


def unknown_ego(err: BaseException) -> UnknownEgoError | None:
    """The UnknownEgoError behind an error from the World actor (Ray wraps it), if any."""
    for candidate in (getattr(err, "cause", None), err.__cause__, err):
        if isinstance(candidate, UnknownEgoError):
            return candidate
    return None


def actor_died(err: BaseException) -> bool:
    """Whether `err` says the replica called died (Serve starts a new one), rather than the call failing in it."""
    return isinstance(err, RayActorError)  # ActorDiedError, ActorUnavailableError


def cause_of(err: BaseException) -> str:
    """The message of the error raised inside another actor (Ray wraps it with its traceback)."""
    cause = getattr(err, "cause", None) or err
    return str(cause).strip().splitlines()[-1]
