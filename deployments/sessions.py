"""The SessionManager actor: creates, runs and ends the driving sessions.

Each session has a `SessionRunner` here (its ego, conditions builder, publisher, sticky control
and stats). Frames are made in rounds: observe every session's ego at one simulation time,
build their conditions, hand them to the Denoiser in one call, then give each session's new
frame to its publisher. The clock (`serve.clock`): `lockstep` ticks the world once per round
(while the model works); `realtime` ticks it every `world.dt` s of wall time, and each round
samples the newest state. Controls go straight to the World actor between rounds' calls: they
never wait for generation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.denoiser import GeneratedImages
from deployments.errors import (
    InvalidRequest, MissingToken, SessionLimit, SessionNotFound, WorldGone, WrongToken, refusals,
)
from deployments.publisher import JpegFrame, SessionPublisher, StreamClosed
from dwm.conditions.builder import ConditionBuilder
from dwm.conditions.frame import ConditionFrame
from dwm.conditions.packed import PackedConditions
from dwm.pipelines.streaming import GeneratedFrame
from dwm.streaming.compose import compose_strip
from dwm.streaming.encoder import session_rtsp_url
from dwm.streaming.stills import encode_png
from dwm.world.base import Observation, VehicleControl, WorldUnavailableError

log = logging.getLogger("ray.serve")

LAYOUT_KINDS = ("map", "boxes", "both")


@dataclass
class _ControlSent:
    seq: int  # the session's control counter after this control
    wall: float  # time.monotonic() when the world had it
    frames_out: int  # frames out of the queue by then


class SessionRunner:
    """One driving session: its ego in the shared world, its conditions and its video."""

    def __init__(
        self,
        session_id: str,
        token: str,
        ego_id: str,
        depth: int,
        builder: ConditionBuilder,
        publisher: SessionPublisher,
        options: dict,
        control: VehicleControl,
        autopilot: bool,
        rtsp_url: str | None,
        fps_window: float,
    ):
        self.id, self.token, self.ego_id, self.depth = session_id, token, ego_id, depth
        self.builder, self.publisher, self.options = builder, publisher, options
        self.control, self.autopilot, self.rtsp_url = control, autopilot, rtsp_url
        self.created = time.time()
        self.fps_window = fps_window
        self.control_lock = asyncio.Lock()  # one control merge at a time
        self.frames_in = 0
        self.frames_out = 0
        self.last_observation: Observation | None = None
        self.last_conditions: ConditionFrame | None = None
        self.shown_sim_time: float | None = None
        self._out_times: deque[float] = deque()  # monotonic s of recent frames out
        # Control-to-frame latency: each pushed frame remembers the control counter its
        # observation saw; the first frame out that saw a control measures that control.
        self.control_seq = 0
        self._controls_sent: deque[_ControlSent] = deque()
        self._pushed_seqs: deque[int] = deque()
        self._queued: deque[ConditionFrame] = deque()  # conditions in the queue, oldest first
        self.latency_frames: int | None = None
        self.latency_s: float | None = None
        self.restarts = 0  # queue rebuilds after a denoiser stage died
        self.gap_frames = 0  # frames lost in them: conditions pushed that never became pictures

    def controlled(self) -> None:
        """The world holds a new control of this session."""
        self.control_seq += 1
        self._controls_sent.append(_ControlSent(self.control_seq, time.monotonic(), self.frames_out))

    def fps_condition(self, observation: Observation) -> float | None:
        """realtime: 1 / the simulated seconds since this session's previous observation
        (None for the first: the builder's, 1 / the world's tick)."""
        last = self.last_observation
        if last is None or observation.sim_time <= last.sim_time:
            return None
        return 1.0 / (observation.sim_time - last.sim_time)

    def pushed(self, observation: Observation, conditions: ConditionFrame, seq: int) -> None:
        self.last_observation, self.last_conditions = observation, conditions
        self.frames_in += 1
        self._pushed_seqs.append(seq)
        self._queued.append(conditions)

    def restarted(self, lost: int) -> None:
        """The session's queue was rebuilt (a denoiser stage died): the `lost` frames inside it
        never come out; the new queue warms up and the stream goes on."""
        log.warning("driving session %s: denoiser queue rebuilt, %d frames lost", self.id, lost)
        self.restarts += 1
        self.gap_frames += lost
        self._queued.clear()
        self._pushed_seqs.clear()

    def deliver(self, generated: list[GeneratedImages]) -> None:
        """Frames out of the queue: the k-th frame out shows the k-th conditions pushed."""
        now = time.monotonic()
        for out in generated:
            frame = GeneratedFrame(out.images, self._queued.popleft(), out.index, out.index + self.depth + 1)
            seq = self._pushed_seqs.popleft()
            self.frames_out += 1
            self.shown_sim_time = float(frame.conditions.sim_time)
            self._out_times.append(now)
            shown = None
            while self._controls_sent and self._controls_sent[0].seq <= seq:
                shown = self._controls_sent.popleft()
            if shown is not None:
                self.latency_frames = self.frames_out - shown.frames_out
                self.latency_s = now - shown.wall
            self.publisher.offer(frame)
        while self._out_times and now - self._out_times[0] > self.fps_window:
            self._out_times.popleft()

    def fps(self) -> float:
        now = time.monotonic()
        times = [t for t in self._out_times if now - t <= self.fps_window]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-9)

    def fps_conditioned(self) -> float | None:
        """The fps camera scalar of the newest conditions (column 0 of camera_params (V, 11))."""
        if self.last_conditions is None:
            return None
        return float(self.last_conditions.camera_params[0, 0])

    def streams(self) -> dict:
        return {"mjpeg": f"/sessions/{self.id}/video.mjpg", "rtsp": self.rtsp_url}

    def state(self, sim_time: float, world_error: str | None = None) -> dict:
        obs = self.last_observation
        if world_error:
            state = "world unavailable"
        else:
            state = "running" if self.frames_out else "warming"
        return {
            "id": self.id,
            "state": state,
            "error": world_error,
            "ego": self.ego_id,
            "created": self.created,
            "options": self.options,
            "control": {**asdict(self.control), "autopilot": self.autopilot},
            "streams": self.streams(),
            "stats": {
                "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "fps": round(self.fps(), 3),
                "queue_depth": self.depth,
                "ego_speed": obs.ego_speed if obs else 0.0,
                "sim_time": obs.sim_time if obs else sim_time,
                "shown_sim_time": self.shown_sim_time,
                "fps_condition": self.fps_conditioned(),
                "control_latency_frames": self.latency_frames,
                "control_latency_s": None if self.latency_s is None else round(self.latency_s, 4),
                "queue_restarts": self.restarts,
                "gap_frames": self.gap_frames,
                "viewers": self.publisher.viewers,
                "rtsp": self.publisher.output_stats("rtsp"),
                "recording": self.publisher.output_stats("recording"),
            },
        }


def world_unavailable(err: BaseException) -> WorldUnavailableError | None:
    """The WorldUnavailableError behind an error from the World actor (Ray wraps it), if any."""
    # The original first: Ray's wrapper is an instance of the class too, but its text carries
    # the remote traceback.
    for candidate in (getattr(err, "cause", None), err.__cause__, err):
        if isinstance(candidate, WorldUnavailableError):
            return candidate
    return None


def _cause(err: BaseException) -> str:
    """The message of the error raised inside another actor (Ray wraps it with its traceback)."""
    cause = getattr(err, "cause", None) or err
    return str(cause).strip().splitlines()[-1]


@serve.deployment(name="SessionManager", num_replicas=1, max_ongoing_requests=1000)
class SessionManager:
    """Owns the sessions (one replica: sessions live in its memory)."""

    async def __init__(self, world: DeploymentHandle, denoiser: DeploymentHandle, cfg: dict):
        self.cfg: DictConfig = OmegaConf.create(cfg)
        self.world, self.denoiser = world, denoiser
        self.sessions: dict[str, SessionRunner] = {}
        self.sim_time = 0.0
        self.rounds = 0
        self._starting = 0  # sessions being set up, counted against max_sessions
        self._round = asyncio.Lock()  # held while a round uses its sessions
        self._wake = asyncio.Event()  # a session was added
        self.realtime = self.cfg.serve.clock == "realtime"
        self._ticked = asyncio.Event()  # realtime: the world has ticked
        self._sampled = -math.inf  # realtime: sim time of the last round's observations
        self._denoising: asyncio.Task | None = None  # the last round's push, then its delivery
        self.world_error: str | None = None  # why the world cannot be reached now, if it cannot
        self._tasks = [asyncio.create_task(self._rounds())]
        if self.realtime:
            self.dt = float(await self.world.dt.remote())
            self._tasks.append(asyncio.create_task(self._wall_clock()))

    # ------------------------------------------------------------------ the clock

    async def _rounds(self) -> None:
        """Frame rounds while sessions exist. lockstep: each round ticks the world once.
        realtime: each round samples the newest state (waiting for a tick newer than the
        last round's) and the world ticks on its own (`_wall_clock`)."""
        while True:
            if not self.sessions:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.realtime and self.sim_time <= self._sampled:
                self._ticked.clear()
                await self._ticked.wait()
                continue
            try:
                async with self._round:
                    await self._run_round(list(self.sessions.values()))
                self.world_error = None
            except asyncio.CancelledError:
                raise
            except Exception as err:
                await self._round_failed(err, "a frame round failed; starting the next one")

    async def _run_round(self, runners: list[SessionRunner]) -> None:
        """Observe, build and hand over one round. Pipelined: the model works on the previous
        round's conditions while this one observes and builds; a session's pushes stay in order
        (one push in flight at a time)."""
        seqs = {r.id: r.control_seq for r in runners}  # controls the world holds before observing
        observations = await self.world.observe_many.remote([r.ego_id for r in runners])
        # realtime: the fps condition follows the simulated time between a session's frames.
        fps = {r.id: r.fps_condition(observations[r.ego_id]) if self.realtime else None for r in runners}

        def build() -> tuple[dict[str, ConditionFrame], dict[str, PackedConditions]]:
            built = {r.id: r.builder.build(observations[r.ego_id], fps=fps[r.id]) for r in runners}
            return built, {key: PackedConditions.pack(frame) for key, frame in built.items()}

        conditions, packed = await asyncio.to_thread(build)
        for r in runners:
            r.pushed(observations[r.ego_id], conditions[r.id], seqs[r.id])
        tick = None if self.realtime else self.world.tick.remote()  # lockstep: one tick per round
        await self._frames_out()
        self._denoising = asyncio.create_task(self._denoise(runners, packed))
        if tick is not None:
            self.sim_time = await tick
        else:
            self._sampled = max(o.sim_time for o in observations.values())
        self.rounds += 1

    async def _round_failed(self, err: Exception, what: str) -> None:
        """A world that cannot be reached (a Carla server gone) is news for every session, not
        a crash: its message shows in their state until the world answers again, and the
        rounds go on calling it (which is what reconnects it). Anything else is logged."""
        unavailable = world_unavailable(err)
        if unavailable is None:
            log.exception(what)
            await asyncio.sleep(1.0)
            return
        if self.world_error != str(unavailable):
            log.warning("the world is unavailable: %s", unavailable)
        self.world_error = str(unavailable)
        await asyncio.sleep(min(max(unavailable.retry_in or 1.0, 0.2), 5.0))

    async def _denoise(self, runners: list[SessionRunner], packed: dict[str, PackedConditions]) -> None:
        try:
            result = await self.denoiser.push_many.remote(packed)
        except Exception:
            log.exception("the denoiser failed on a round; its frames are lost")
            return
        for r in runners:
            if r.id in result.restarted:
                r.restarted(result.restarted[r.id])
            r.deliver(result.images.get(r.id, []))

    async def _frames_out(self) -> None:
        """Wait until the last round's frames are out and handed to the publishers."""
        if self._denoising is not None:
            await asyncio.shield(self._denoising)

    async def _wall_clock(self) -> None:
        """realtime: tick the world every `dt` s of wall time while sessions exist. A late tick
        is not made up for with a burst: the world slows down instead."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if not self.sessions:
                await asyncio.sleep(self.dt)
                next_at = loop.time()
                continue
            next_at += self.dt
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = loop.time()
            try:
                self.sim_time = await self.world.tick.remote()
                self.world_error = None
            except Exception as err:
                await self._round_failed(err, "a world tick failed")
            self._ticked.set()

    # ------------------------------------------------------------------ requests

    @refusals
    async def create(self, options: dict) -> dict:
        limit = int(self.cfg.serve.max_sessions)
        if len(self.sessions) + self._starting >= limit:
            raise SessionLimit(
                f"this server runs at most {limit} driving sessions at once (config serve.max_sessions) "
                "and all are taken: delete one or try again later"
            )
        record = bool(options.get("record", False))
        record_dir = self.cfg.serve.record_dir
        if record and not record_dir:
            raise InvalidRequest("record: recording is off on this server (config serve.record_dir is not set)")
        self._starting += 1
        try:
            return await self._start(options, record_dir if record else None)
        finally:
            self._starting -= 1

    async def _start(self, options: dict, record_dir: str | None) -> dict:
        session_id = secrets.token_hex(4)
        token = secrets.token_urlsafe(18)
        autopilot = options.get("autopilot")
        autopilot = bool(self.cfg.serve.autopilot) if autopilot is None else autopilot
        overlay = options.get("overlay")
        overlay = bool(self.cfg.stream.overlay) if overlay is None else overlay
        builder = ConditionBuilder.from_config(self.cfg)
        rtsp_url = session_rtsp_url(self.cfg.stream.rtsp.url, session_id) if self.cfg.stream.rtsp.url else None
        record_path = Path(record_dir) / f"{session_id}.mp4" if record_dir else None

        try:
            ego_id = await self.world.add_ego.remote()
        except Exception as err:  # e.g. the map has no free place left
            raise SessionLimit(f"no car could be added to the world: {_cause(err)}") from None
        try:
            depth = await self.denoiser.open.remote(session_id, builder.num_views, options.get("seed"))
            control = VehicleControl()
            if autopilot:
                control = await self.world.set_autopilot.remote(ego_id, True)
            publisher = SessionPublisher(self.cfg, session_id, overlay, rtsp_url, record_path)
        except BaseException:
            await self.denoiser.close.remote(session_id)
            await self.world.remove_ego.remote(ego_id)
            raise
        runner = SessionRunner(
            session_id, token, ego_id, depth, builder, publisher,
            options={"autopilot": autopilot, "overlay": overlay, "record": record_path is not None,
                     "seed": options.get("seed")},
            control=control, autopilot=autopilot, rtsp_url=rtsp_url,
            fps_window=float(self.cfg.serve.fps_window),
        )
        self.sessions[session_id] = runner
        self._wake.set()
        log.info("driving session %s started (ego %s)", session_id, ego_id)
        return {"id": session_id, "token": token, "streams": runner.streams()}

    @refusals
    def list(self) -> list[dict]:
        return [r.state(self.sim_time, self.world_error) for r in self.sessions.values()]

    @refusals
    def get(self, session_id: str) -> dict:
        return self._runner(session_id).state(self.sim_time, self.world_error)

    @refusals
    async def control(self, session_id: str, token: str | None, changes: dict) -> dict:
        """Merge `changes` (ControlRequest fields) into the session's sticky control."""
        runner = self._authorised(session_id, token)
        changes = dict(changes)
        autopilot = changes.pop("autopilot", None)
        async with runner.control_lock:
            try:
                control = runner.control.merged(**changes)
            except ValueError as err:
                raise InvalidRequest(str(err)) from None
            try:
                if autopilot is not None and autopilot != runner.autopilot:
                    held = await self.world.set_autopilot.remote(runner.ego_id, autopilot)
                    runner.autopilot = autopilot
                    control = held.merged(**changes)
                if changes or autopilot is not None:
                    await self.world.apply_control.remote(runner.ego_id, control)
            except Exception as err:
                if session_id not in self.sessions:  # deleted meanwhile: its ego is gone
                    raise SessionNotFound(f"driving session {session_id!r} has ended") from None
                unavailable = world_unavailable(err)
                if unavailable is not None:
                    raise WorldGone(f"the control did not reach the world: {unavailable}") from None
                raise
            runner.control = control
            runner.controlled()
        return {**asdict(runner.control), "autopilot": runner.autopilot}

    @refusals
    async def delete(self, session_id: str, token: str | None) -> dict:
        """End the session; returns its final state (the video fully written by then)."""
        runner = self._authorised(session_id, token)
        del self.sessions[session_id]
        async with self._round:  # no round is using it once this is free ...
            await self._frames_out()  # ... and its last frames have reached its publisher
        await self._release(runner)
        log.info("driving session %s ended", session_id)
        return runner.state(self.sim_time)

    @refusals
    async def pipelines(self) -> dict:
        """The Denoiser's placement: per pipeline its sessions and stages (band, GPU ids, node),
        and the hand-over totals between stages."""
        return await self.denoiser.placement.remote()

    @refusals
    async def next_frame(self, session_id: str, after: int, timeout: float) -> JpegFrame | None:
        """The session's newest JPEG once its index is above `after` (long poll, `timeout` s)."""
        publisher = self._runner(session_id).publisher
        publisher.viewers += 1
        try:
            return await publisher.next_frame(after, timeout)
        except StreamClosed:
            raise SessionNotFound(f"driving session {session_id!r} has ended") from None
        finally:
            publisher.viewers -= 1

    @refusals
    async def layout_png(self, session_id: str, kind: str) -> bytes | None:
        """The newest conditions' layout images side by side (PNG, model resolution), or None
        before the first. kind: map, boxes or both (max of the two, as the model sees them)."""
        if kind not in LAYOUT_KINDS:
            raise InvalidRequest(f"kind={kind!r}: allowed {', '.join(LAYOUT_KINDS)}")
        conditions = self._runner(session_id).last_conditions
        if conditions is None:
            return None

        def encode() -> bytes:
            images = {"map": conditions.map_images, "boxes": conditions.box_images}.get(kind)
            if images is None:
                images = conditions.map_images.maximum(conditions.box_images)
            return encode_png(compose_strip(images, images.shape[-2:]))

        return await asyncio.to_thread(encode)

    # ------------------------------------------------------------------ internals

    def _runner(self, session_id: str) -> SessionRunner:
        runner = self.sessions.get(session_id)
        if runner is None:
            raise SessionNotFound(f"no driving session {session_id!r}; GET /sessions lists them")
        return runner

    def _authorised(self, session_id: str, token: str | None) -> SessionRunner:
        runner = self._runner(session_id)
        if not token:
            raise MissingToken("this needs the session's token: send the header `Authorization: Bearer <token>`")
        if not secrets.compare_digest(token, runner.token):
            raise WrongToken(f"the token is not the one of driving session {session_id!r}")
        return runner

    async def _release(self, runner: SessionRunner) -> None:
        """Give back the session's ego, queue state and stream (each even if another fails)."""
        for step in (
            runner.publisher.close(),
            self.denoiser.close.remote(runner.id),
            self.world.remove_ego.remote(runner.ego_id),
        ):
            try:
                await step
            except Exception:
                log.exception("releasing driving session %s", runner.id)

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        runners, self.sessions = list(self.sessions.values()), {}
        for runner in runners:
            await self._release(runner)
