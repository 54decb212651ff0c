"""The SessionManager actor: creates, runs and ends the driving sessions.

Each session is a `dwm.session.DrivingSession` (its ego, conditions, sticky control, frames in
flight and stats: the code `python -m dwm.run` drives) held in a `ServedSession` with its
token, options and publisher; this actor adds the clock and the rounds. Frames are made in
rounds: observe every session's ego at one simulation time, build their conditions, hand them
to the QueueServer in one call, then give each session's new frame to its publisher. The clock
(`serve.clock`): `lockstep` ticks the world once per round (while the model works); `realtime`
ticks it every `world.dt` s of wall time, and each round samples the newest state. Controls go
straight to the World actor between rounds' calls: they never wait for generation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.errors import (
    InvalidRequest, MissingToken, NothingRecorded, NotOffered, SessionLimit, SessionLost, SessionNotFound, WorldGone,
    WrongToken, refusals,
)
from deployments.logs import route_library_logs
from deployments.memory import HeapTrimmer
from deployments.pipeline_queues import PipelineQueues
from deployments.pipeline_scaling import autoscaled
from deployments.world_groups import WorldGroups
from deployments.publisher import JpegFrame, SessionPublisher, StreamClosed
from deployments.routing import LOAD_STAT, owned_by, owner_of, replica_tag
from deployments.schemas import LAYOUT_KINDS
from deployments.stages import queue_schedule
from deployments.served import (
    MAX_VIEW_TOKENS, EndedSessions, ServedSession, actor_died, cause_of, new_session_id, unknown_ego, world_unavailable,
)
from dwm.conditions.builder import ConditionBuilder
from dwm.conditions.packed import PackedConditions
from dwm.models.checkpoint import weights_summary
from dwm.session import DrivingSession
from dwm.pipelines.decode import to_uint8_views
from dwm.video.compose import compose_strip
from dwm.video.encoder import session_rtsp_url
from dwm.video.stills import encode_png
from dwm.world.base import VehicleControl

log = logging.getLogger("ray.serve")
# A session's `error` while Serve replaces a replica that died.
WORLD_RESTARTING = ("the world simulator stopped and Serve is starting a new one: the session goes on "
                    "by itself with a new car in the new world (stats.ego_restarts)")
WAIT_FOR_ROOM_S = 0.5  # s between asks for a queue while every session waits for one
DENOISER_RESTARTING = ("the denoiser stopped and Serve is starting a new one: the session goes on by itself "
                       "with a new queue, the frames in the old one lost (stats.queue_restarts, gap_frames)")


@serve.deployment(name="SessionManager", num_replicas=1, max_ongoing_requests=1000)
class SessionManager:
    """Owns sessions: those it started live in its memory. With `serve.sessions.owners` > 1,
    each replica owns its own: a session id begins with its owner's tag, and every request
    about it is routed there (`deployments.routing`); new sessions go to the owner with the
    fewest."""

    async def __init__(self, world: DeploymentHandle, denoiser: DeploymentHandle, cfg: dict):
        route_library_logs()
        self.cfg: DictConfig = OmegaConf.create(cfg)
        self.tag = replica_tag()
        s = self.cfg.serve
        self.owners = int(s.sessions.owners)
        self.max_sessions = -(-int(s.max_sessions) // self.owners)  # this owner's share
        group_size = s.world.group_size
        self.world = WorldGroups(world, self.tag, None if group_size is None else int(group_size), int(s.world.replicas))
        self.autoscaled = autoscaled(self.cfg)
        self.queues = PipelineQueues(denoiser, self.tag, int(s.max_pipelines if self.autoscaled else s.pipelines))
        self.depth = queue_schedule(self.cfg).depth  # every pipeline's queues are this deep
        self.sessions: dict[str, ServedSession] = {}
        self.ended = EndedSessions()
        self._trimmer = HeapTrimmer(s.trim_every_s)
        self.model = weights_summary(self.cfg)
        # Sessions are private: seeing one takes its driver's or a viewer's token, unless this
        # says anyone may (a local demo).
        self.public_viewing = bool(self.cfg.serve.get("public_viewing", False))
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
        self.denoiser_error: str | None = None  # why the denoiser cannot, likewise
        await self._release_orphans()
        self._tasks = [asyncio.create_task(self._rounds())]
        if self.realtime:
            self.dt = float(await self.world.dt())
            self._tasks.append(asyncio.create_task(self._wall_clock()))

    async def _release_orphans(self) -> None:
        """A session manager starting holds no session. When it is the app's only one, cars in
        the world and queues in the denoiser are those of one that died (its replica
        restarted): nobody can reach them any more, so they are given back. (With several
        owners, those of a dead one are given back when their lease runs out,
        `serve.lease_s`.)"""
        if self.owners > 1:
            return
        try:
            egos = await self.world.release_all()
            queues = await self.queues.release_all()
        except Exception:
            log.exception("giving back the cars and queues of the sessions before this session manager")
            return
        if egos or queues:
            log.warning("a session manager before this one died: its %d cars and %d queues are given back",
                        egos, queues)

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

    async def _run_round(self, served: list[ServedSession]) -> None:
        """Observe, build and hand over one round. Pipelined: the model works on the previous
        round's conditions while this one observes and builds; a session's pushes stay in order
        (one push in flight at a time)."""
        started = time.perf_counter()
        await self._place_waiting()
        served = [s for s in served if self.queues.placed(s.id)]
        if not served:  # every session waits for room on a pipeline
            await asyncio.sleep(WAIT_FOR_ROOM_S)
            return
        sessions = {s.id: s.session for s in served}
        seen = {key: session.controls_applied for key, session in sessions.items()}  # before observing
        observed = await self.world.observe_many([session.ego_id for session in sessions.values()])
        observations = {key: observed[session.ego_id] for key, session in sessions.items()}

        def build() -> dict[str, PackedConditions]:
            return {key: session.build(observations[key], self.realtime) for key, session in sessions.items()}

        conditions = await asyncio.to_thread(build)
        packed = {key: frame.without_cameras() for key, frame in conditions.items()}  # what the model takes
        tick = None if self.realtime else asyncio.ensure_future(self.world.tick())  # lockstep: one tick per round
        # The last round's frames first: a queue it finds rebuilt loses what was pushed up to
        # it, not these conditions, which go into the new queue.
        await self._frames_out()
        served = [s for s in served if self.queues.placed(s.id)]  # a queue lost meanwhile takes nothing
        for s in served:
            s.session.pushed(observations[s.id], conditions[s.id], seen[s.id])
        packed = {s.id: packed[s.id] for s in served}
        self._denoising = asyncio.create_task(self._denoise(served, packed))
        if tick is not None:
            self.sim_time = await tick
        else:
            self._sampled = max(o.sim_time for o in observed.values())
        self.rounds += 1
        await asyncio.to_thread(self._trimmer.maybe)
        metrics.round_seconds().observe(time.perf_counter() - started)
        metrics.sessions().set(len(self.sessions))

    async def _round_failed(self, err: Exception, what: str) -> None:
        """A world that cannot be reached (a Carla server gone) is news for every session, not
        a crash: its message shows in their state until the world answers again, and the
        rounds go on calling it (which is what reconnects it). A world that has lost egos was
        restarted: they are put back. Anything else is logged."""
        if unknown_ego(err) is not None:
            await self._replace_egos()
            return
        if actor_died(err):  # the World replica: Serve starts a new one, whose world lacks the cars
            if self.world_error != WORLD_RESTARTING:
                log.warning("the World replica stopped (%s); waiting for the new one", cause_of(err))
            self.world_error = WORLD_RESTARTING
            await asyncio.sleep(0.5)
            return
        unavailable = world_unavailable(err)
        if unavailable is None:
            log.exception(what)
            await asyncio.sleep(1.0)
            return
        if self.world_error != str(unavailable):
            log.warning("the world is unavailable: %s", unavailable)
        self.world_error = str(unavailable)
        await asyncio.sleep(min(max(unavailable.retry_in or 1.0, 0.2), 5.0))

    async def _replace_egos(self) -> None:
        """The World actor holds no car for some sessions (its replica was restarted, with a
        new world): each of them gets a new car, on its autopilot or with its sticky control,
        and goes on with the same id, queue and stream (`ego_restarts` counts it)."""
        known = await self.world.known()
        for s in list(self.sessions.values()):
            session = s.session
            if session.ego_id in known:
                continue
            try:
                ego_id = await self.world.add_ego(replacing=session.ego_id)
                if session.autopilot:
                    await self.world.set_autopilot(ego_id, True)
                else:
                    await self.world.apply_control(ego_id, session.control)
            except Exception as err:
                self.world_error = f"the world lost the cars of the sessions and cannot place new ones: {cause_of(err)}"
                log.exception("driving session %s: no new car", s.id)
                await asyncio.sleep(1.0)
                return
            log.warning("driving session %s: the world lost car %s (the World actor restarted); new car %s",
                        s.id, session.ego_id, ego_id)
            session.ego_replaced(ego_id)

    async def _denoise(self, served: list[ServedSession], packed: dict[str, PackedConditions]) -> None:
        try:
            result, failed = await self.queues.push_many(packed)
        except Exception:
            log.exception("the denoiser failed on a round; its frames are lost")
            return
        died = [err for err in failed if actor_died(err)]  # Serve starts a new replica in its place
        if died and self.denoiser_error is None:
            log.warning("a QueueServer replica stopped (%s); its sessions' queues are opened again", cause_of(died[0]))
        for err in failed:
            if not actor_died(err):
                log.error("a denoiser pipeline failed on a round; its frames are lost: %s", cause_of(err))
        self.denoiser_error = DENOISER_RESTARTING if died else None
        lost = set(result.unknown)
        for s in served:
            if s.id in lost:
                log.warning("driving session %s: its denoiser queue was lost, %d frames with it; a new one warms up",
                            s.id, s.session.queue_rebuilt())
            for frame in s.session.delivered(result.images.get(s.id, [])):
                s.publisher.offer(frame)
            s.report_metrics()
        if lost:  # at once
            await self._place_waiting()

    async def _place_waiting(self) -> None:
        """Ask for a queue for each session that waits for one (the pipelines were full, or its
        queue was lost): it keeps its id, stream and frame count, and its new queue warms up.
        With autoscaling, then tell the pipelines how many sessions want one."""
        # Not those starting (their creation asks for theirs) nor those ended (given back).
        for session_id in await self.queues.place_waiting([sid for sid in self.queues.waiting if sid in self.sessions]):
            log.info("driving session %s has a denoiser queue", session_id)
        if self.autoscaled:
            try:
                await self.queues.report()
            except Exception:
                log.exception("reporting the sessions that want a denoiser queue")

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
                self.sim_time = await self.world.tick()
                self.world_error = None
            except Exception as err:
                await self._round_failed(err, "a world tick failed")
            self._ticked.set()

    # ------------------------------------------------------------------ requests

    @refusals
    async def create(self, options: dict) -> dict:
        if len(self.sessions) + self._starting >= self.max_sessions:
            total = int(self.cfg.serve.max_sessions)
            split = "" if self.owners == 1 else f", {self.max_sessions} for each of its {self.owners} session owners"
            raise SessionLimit(
                f"this server runs at most {total} driving sessions at once (config serve.max_sessions{split}) "
                "and all are taken: delete one or try again later"
            )
        record = bool(options.get("record", False))
        record_dir = self.cfg.serve.record_dir
        if record and not record_dir:
            raise NotOffered("record: recording is off on this server (config serve.record_dir is not set)",
                             loc=("body", "record"))
        self._starting += 1
        try:
            return await self._start(options, record_dir if record else None)
        finally:
            self._starting -= 1

    async def _start(self, options: dict, record_dir: str | None) -> dict:
        session_id = new_session_id(self.sessions.keys() | set(self.ended),
                                    lambda: owned_by(self.tag, secrets.token_hex(8)))
        token = secrets.token_urlsafe(18)
        autopilot = options.get("autopilot")
        autopilot = bool(self.cfg.serve.autopilot) if autopilot is None else autopilot
        overlay = options.get("overlay")
        overlay = bool(self.cfg.stream.overlay) if overlay is None else overlay
        builder = ConditionBuilder.from_config(self.cfg)
        rtsp_url = session_rtsp_url(self.cfg.stream.rtsp.url, session_id) if self.cfg.stream.rtsp.url else None
        record_path = Path(record_dir) / f"{session_id}.mp4" if record_dir else None

        try:
            ego_id = await self.world.add_ego()
        except Exception as err:  # e.g. the map has no free place left
            raise SessionLimit(f"no car could be added to the world: {cause_of(err)}") from None
        try:
            # No pipeline with room: the session waits for one (its state says so).
            await self.queues.open(session_id, builder.num_views, options.get("seed"))
            control = VehicleControl()
            if autopilot:
                control = await self.world.set_autopilot(ego_id, True)
            publisher = SessionPublisher(self.cfg, session_id, overlay, rtsp_url, record_path)
        except BaseException:
            await self.queues.close(session_id)
            await self.world.remove_ego(ego_id)
            raise
        session = DrivingSession(
            ego_id, builder, self.depth, control=control, autopilot=autopilot, fps_window=float(self.cfg.serve.fps_window)
        )
        served = ServedSession(
            session_id, token, session, publisher,
            options={"autopilot": autopilot, "overlay": overlay, "record": record_path is not None,
                     "seed": options.get("seed")},
            rtsp_url=rtsp_url, model=self.model,
        )
        self.sessions[session_id] = served
        metrics.sessions().set(len(self.sessions))
        self._wake.set()
        log.info("driving session %s started (ego %s)", session_id, ego_id)
        return {"id": session_id, "token": token, "streams": served.streams(served.watch)}

    @refusals
    def list(self, token: str | None = None) -> list[dict]:
        """The sessions `token` may see (every one with serve.public_viewing)."""
        out = []
        for s in self.sessions.values():
            view_token = s.view_token_for(token)
            if view_token or self.public_viewing:
                out.append(self._state(s, view_token))
        return out

    @refusals
    def get(self, session_id: str, token: str | None = None) -> dict:
        served, view_token = self._viewed(session_id, token)
        return self._state(served, view_token)

    @refusals
    def share(self, session_id: str, token: str | None) -> dict:
        """A new read-only token for the session (its driver only) and the stream URLs with it."""
        served = self._authorised(session_id, token)
        if len(served.view_tokens) >= MAX_VIEW_TOKENS:
            raise InvalidRequest(f"driving session {session_id!r} has {MAX_VIEW_TOKENS} viewer links already, "
                                 "the most it may have", loc=("path", "session_id"))
        view_token = secrets.token_urlsafe(18)
        served.view_tokens.add(view_token)
        return {"id": session_id, "token": view_token, "streams": served.streams(view_token)}

    @refusals
    async def control(self, session_id: str, token: str | None, changes: dict) -> dict:
        """Merge `changes` (ControlRequest fields) into the session's sticky control."""
        served = self._authorised(session_id, token)
        session = served.session
        async with served.control_lock:
            try:
                change = session.change_control(changes)
            except ValueError as err:
                raise InvalidRequest(str(err)) from None
            try:  # as `DrivingSession.apply_control` does, with the World actor
                if change.autopilot is not None:
                    held = await self.world.set_autopilot(session.ego_id, change.autopilot)
                    change = change.after_switch(held)
                if change.sends:
                    await self.world.apply_control(session.ego_id, change.control)
            except Exception as err:
                if session_id not in self.sessions:  # deleted meanwhile: its ego is gone
                    raise SessionNotFound(f"driving session {session_id!r} has ended") from None
                unavailable = world_unavailable(err)
                if unavailable is not None:
                    raise WorldGone(f"the control did not reach the world: {unavailable}") from None
                raise
            session.controlled(change)
        return session.control_state()

    @refusals
    async def change(self, session_id: str, token: str | None, changes: dict) -> dict:
        """Change a running session's options (`SessionChanges` fields; the driver only): the
        layout overlay on its video, and MP4 recording started (a new file in serve.record_dir)
        or finished. Returns its state."""
        served = self._authorised(session_id, token)
        if changes.get("overlay") is not None:
            served.publisher.overlay = served.options["overlay"] = bool(changes["overlay"])
        record = changes.get("record")
        if record and served.publisher.recording_path is None:
            record_dir = self.cfg.serve.record_dir
            if not record_dir:
                raise NotOffered("record: recording is off on this server (config serve.record_dir is not set)",
                                 loc=("body", "record"))
            done = len(served.publisher.recordings)
            name = f"{session_id}.mp4" if done == 0 else f"{session_id}-{done + 1}.mp4"
            served.publisher.start_recording(Path(record_dir) / name)
        elif record is False:
            await served.publisher.stop_recording()
        served.options["record"] = served.publisher.recording_path is not None
        return self._state(served, served.watch)

    @refusals
    async def recording(self, session_id: str, token: str | None) -> tuple[str, bytes]:
        """The session's newest finished MP4 recording: (file name, bytes)."""
        served, _ = self._viewed(session_id, token)
        if not served.publisher.recordings:
            raise NothingRecorded(
                f"driving session {session_id!r} has no finished recording: start one (PATCH "
                f"/sessions/{session_id} {{\"record\": true}}) and stop it ({{\"record\": false}})"
            )
        path = served.publisher.recordings[-1]
        return path.name, await asyncio.to_thread(path.read_bytes)

    @refusals
    async def delete(self, session_id: str, token: str | None) -> dict:
        """End the session; returns its final state (the video fully written by then)."""
        served = self._authorised(session_id, token)
        del self.sessions[session_id]
        self.ended.add(session_id, served.token)
        async with self._round:  # no round is using it once this is free ...
            await self._frames_out()  # ... and its last frames have reached its publisher
        await self._release(served)
        log.info("driving session %s ended", session_id)
        return served.state(self.sim_time)

    @refusals
    async def pipelines(self) -> dict:
        """Where the model runs: per pipeline its tag, health, sessions, stages (band, GPU ids,
        node) and the hand-over totals between its stages."""
        return {"pipelines": await self.queues.placement()}

    @refusals
    async def next_frame(self, session_id: str, after: int, timeout: float) -> JpegFrame | None:
        """The session's newest JPEG once its index is above `after` (long poll, `timeout` s)."""
        publisher = self._served(session_id).publisher
        publisher.viewers += 1
        try:
            return await publisher.next_frame(after, timeout)
        except StreamClosed:
            raise SessionNotFound(f"driving session {session_id!r} has ended") from None
        finally:
            publisher.viewers -= 1

    @refusals
    async def layout_png(self, session_id: str, kind: str, token: str | None = None) -> bytes | None:
        """The newest conditions' layout images side by side (PNG, model resolution), or None
        before the first. kind: map, boxes or both (max of the two, as the model sees them)."""
        served, _ = self._viewed(session_id, token)  # an unknown session is 404 whatever the kind
        if kind not in LAYOUT_KINDS:
            shown = repr(kind) if len(kind) <= 64 else f"{kind[:64]!r}...({len(kind)} chars)"
            raise InvalidRequest(f"kind={shown}: allowed {', '.join(LAYOUT_KINDS)}", loc=("query", "kind"))
        conditions = served.session.last_conditions
        if conditions is None:
            return None

        def encode() -> bytes:
            frame = conditions.unpack()
            images = {"map": frame.map_images, "boxes": frame.box_images}.get(kind)
            if images is None:
                images = frame.map_images.maximum(frame.box_images)
            return encode_png(compose_strip(to_uint8_views(images, images.shape[-2:])))

        return await asyncio.to_thread(encode)

    # ------------------------------------------------------------------ internals

    def _served(self, session_id: str) -> ServedSession:
        served = self.sessions.get(session_id)
        if served is None:
            owner = owner_of(session_id)
            if owner is not None and owner != self.tag:
                # Routed here because its owner is gone: a session owner that stopped, whose
                # replica Serve replaced.
                raise SessionLost(f"driving session {session_id!r} was lost: the session manager that held it "
                                  "stopped and a new one took its place; start a new session (POST /sessions)")
            raise SessionNotFound(f"no driving session {session_id!r}; GET /sessions lists them")
        return served

    def _state(self, served: ServedSession, view_token: str | None) -> dict:
        return served.state(self.sim_time, self.world_error, view_token, self.denoiser_error,
                            waiting=self.queues.why_waiting(served.id))

    def record_routing_stats(self) -> dict:
        """What Serve's router weighs when it places a new session here: the sessions held."""
        return {LOAD_STAT: len(self.sessions) + self._starting}

    def _authorised(self, session_id: str, token: str | None) -> ServedSession:
        # No token is refused before the session is looked up: what only a driver may do
        # answers 401 to a request without credentials, whether or not the session exists.
        if not token:
            raise MissingToken("this needs the session's token: send the header `Authorization: Bearer <token>`")
        if session_id in self.ended:  # its driver hears that it ended; anyone else, as before
            if self.ended.ended_by(session_id, token):
                raise SessionNotFound(f"driving session {session_id!r} has ended")
            raise WrongToken(f"the token is not the one of driving session {session_id!r}")
        served = self._served(session_id)
        if not served.may_drive(token):
            raise WrongToken(f"the token is not the one of driving session {session_id!r}")
        return served

    def _viewed(self, session_id: str, token: str | None) -> tuple[ServedSession, str | None]:
        """The session if `token` may see it, and the viewer token for its stream URLs."""
        served = self._served(session_id)
        view_token = served.view_token_for(token)
        if view_token or self.public_viewing:
            return served, view_token
        if not token:
            raise MissingToken(f"driving session {session_id!r} is private: send its token (the header "
                               "`Authorization: Bearer <token>`, or `?token=<token>` in the URL)")
        raise WrongToken(f"the token is neither the driver's nor a viewer's of driving session {session_id!r}")

    async def _release(self, served: ServedSession) -> None:
        """Give back the session's ego, queue state and stream (each even if another fails)."""
        metrics.sessions().set(len(self.sessions))
        served.ended_metrics()
        for step in (
            served.publisher.close(),
            self.queues.close(served.id),
            self.world.remove_ego(served.session.ego_id),
        ):
            try:
                await step
            except Exception:
                log.exception("releasing driving session %s", served.id)

    def close(self) -> None:
        """End every session at once: the clock and the rounds stop, and each session's video
        ends, its MP4 recording and RTSP session finished (a recording the process leaves
        unfinished cannot be played). Serve calls this through `__del__` when the app shuts
        down; the World and the QueueServer stop with the app, so egos and queues are not given
        back one by one (`delete` does that for one session)."""
        for task in [*self._tasks, self._denoising]:
            if task is not None and not task.done():
                task.cancel()
        self._tasks, self._denoising = [], None
        served, self.sessions = list(self.sessions.values()), {}
        for s in served:
            try:
                s.publisher.end()
            except Exception:
                log.exception("ending the video of driving session %s", s.id)

    def __del__(self) -> None:
        # Serve's shutdown hook. Synchronous, so that the garbage collector, which also calls
        # it and awaits nothing, still runs all of it.
        if hasattr(self, "sessions"):  # a replica whose constructor failed has nothing to end
            self.close()
