"""A driving session: one ego car, its sticky control, its frames in flight and its stats.

The one session type of the project: `python -m dwm.run` drives one in this process, and the
Serve app holds one per session (`deployments.sessions`, around its token and video). It owns
no world and no queue: the caller observes the world, pushes the conditions into the queue
and hands back the frames that leave, so the same code serves a world and a queue in this
process (`step`) and ones behind actors. What the session keeps:

- the control: sticky merges with Carla's semantics, and the autopilot;
- the frames in flight: the k-th frame out of the queue shows the k-th conditions pushed;
- stats: frames in / out, fps over a window, queue depth, ego speed, simulation time;
- control-to-frame latency: each frame pushed remembers how many controls the world held
  when it was observed, so the first frame out that saw a control measures that control.

The session does not tick the world: the clock belongs to the caller (once per frame in the
lockstep clock), so that several sessions can share one world.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch

from dwm.conditions.builder import ConditionBuilder
from dwm.conditions.packed import PackedConditions
from dwm.pipelines.fifo import ProgressCallback
from dwm.pipelines.streaming import GeneratedFrame, StreamingPipeline
from dwm.world.base import Observation, VehicleControl, World


@dataclass
class DrivingStats:
    """What a driver can read about their session (the Serve app adds its video outputs)."""

    frames_in: int  # condition frames pushed into the queue
    frames_out: int  # generated frames out of the queue
    fps: float  # frames out per second over the last `fps_window` s
    queue_depth: int  # frames between a frame's conditions entering and its picture leaving
    ego_speed: float  # m/s, signed (negative when reversing), of the newest observation
    lane_offset: float | None  # m from its lane's centre, positive left, of the newest observation (None: unknown)
    sim_time: float  # s, of the newest observation (before the first: the world's)
    shown_sim_time: float | None  # s, the moment the newest frame out shows
    fps_condition: float | None  # the fps camera condition of the newest conditions pushed
    control_latency_frames: int | None  # frames out from the newest control shown to the first frame showing it
    control_latency_s: float | None  # s from that control reaching the world to that frame leaving the queue
    queue_restarts: int  # times the queue was rebuilt (a denoiser stage died)
    gap_frames: int  # frames lost in those rebuilds: conditions pushed that never became pictures
    ego_restarts: int  # times the ego car was put into the world again (the world had lost it)


@dataclass(frozen=True)
class ControlChange:
    """A control request checked against the session's sticky control: what the world has to
    hear before the session holds it (`DrivingSession.controlled`)."""

    control: VehicleControl  # the control to apply: the sticky one with `fields` merged
    fields: dict  # the control fields the request changes
    autopilot: bool | None  # switch the autopilot on (True) or off (False); None: leave it
    sends: bool  # the world gets `control`: the request named a field or the autopilot

    def after_switch(self, held: VehicleControl) -> ControlChange:
        """The change on top of the control the ego holds after the autopilot switch (switched
        off: the autopilot's last), so that the car does not jump back to a stale control."""
        return replace(self, control=held.merged(**self.fields))


class PictureOut(Protocol):
    """A generated frame as it leaves a queue, in this process (`GeneratedFrame`) or from an
    actor: index (the queue's count, 0 for its first frame out), images (V, h, w, 3) uint8."""

    index: int
    images: torch.Tensor


@dataclass(frozen=True)
class _ControlSent:
    count: int  # controls the world had been given, this one included
    at: float  # s on the session's clock when the world had it
    frames_out: int  # frames out of the queue by then


class DrivingSession:
    """One ego car's session: its control, the conditions in its queue and its stats.

    ego_id: the car in the world; builder: its conditions; queue_depth: frames between a
    frame's conditions entering the queue and its picture leaving (L - 1). control, autopilot:
    what the ego holds at the start. fps_window: s over which `stats().fps` counts frames out
    (config serve.fps_window in the Serve app). clock: monotonic seconds, for fps and latency.
    """

    def __init__(
        self,
        ego_id: str,
        builder: ConditionBuilder,
        queue_depth: int,
        *,
        control: VehicleControl | None = None,
        autopilot: bool = False,
        fps_window: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ego_id, self.builder, self.queue_depth = ego_id, builder, queue_depth
        self.control = control or VehicleControl()
        self.autopilot = autopilot
        self.fps_window = fps_window
        self._clock = clock
        self.frames_in = 0
        self.frames_out = 0
        self.last_observation: Observation | None = None
        self.last_conditions: PackedConditions | None = None
        self.shown_sim_time: float | None = None
        self._out_times: deque[float] = deque()  # clock s of the recent frames out
        self.controls_applied = 0  # controls the world has been given
        self._controls_sent: deque[_ControlSent] = deque()  # not yet shown by a frame out
        # The queue's contents, oldest first: each frame's conditions (packed: a queue of
        # about 25 frames holds 0.3 MB of them, not 100 MB of float32 images) and the controls
        # the world held when it was observed.
        self._queued: deque[tuple[PackedConditions, int]] = deque()
        self.latency_frames: int | None = None
        self.latency_s: float | None = None
        self.queue_restarts = 0
        self.gap_frames = 0
        self.ego_restarts = 0

    @classmethod
    def start(
        cls, world: World, builder: ConditionBuilder, queue_depth: int,
        ego_id: str | None = None, autopilot: bool = False, **options,
    ) -> DrivingSession:
        """A session with a new ego car in `world` (in this process); options: of the constructor."""
        ego_id = world.add_ego(ego_id)
        control = VehicleControl()
        if autopilot:
            world.set_autopilot(ego_id, True)
            control = world.observe(ego_id).control
        return cls(ego_id, builder, queue_depth, control=control, autopilot=autopilot, **options)

    def close(self, world: World) -> None:
        """Give back the ego car; the queue goes with its owner."""
        if self.ego_id in world.egos():
            world.remove_ego(self.ego_id)

    # ------------------------------------------------------------------ control

    def change_control(self, changes: Mapping[str, object]) -> ControlChange:
        """Check a request (VehicleControl fields and `autopilot`, each optional) against the
        sticky control; ValueError names a field that is unknown or out of range."""
        fields = dict(changes)
        autopilot = fields.pop("autopilot", None)
        switch = None if autopilot is None or autopilot == self.autopilot else bool(autopilot)
        return ControlChange(self.control.merged(**fields), fields, switch, bool(fields) or autopilot is not None)

    def controlled(self, change: ControlChange) -> None:
        """The world holds `change` now: it is the sticky control, and frames observed from
        now on show it."""
        self.control = change.control
        if change.autopilot is not None:
            self.autopilot = change.autopilot
        self.controls_applied += 1
        self._controls_sent.append(_ControlSent(self.controls_applied, self._clock(), self.frames_out))

    def apply_control(self, world: World, **changes) -> dict:
        """Merge `changes` into the sticky control and hand it to the ego in `world` (in this
        process); returns `control_state()`."""
        change = self.change_control(changes)
        if change.autopilot is not None:
            world.set_autopilot(self.ego_id, change.autopilot)
            change = change.after_switch(world.observe(self.ego_id).control)
        if change.sends:
            world.apply_control(self.ego_id, change.control)
        self.controlled(change)
        return self.control_state()

    def control_state(self) -> dict:
        """The sticky control's fields, the autopilot, and `seq`: the sequence number of the
        newest control (1 for the first, 0 before any); frames carry the one they show."""
        return {**asdict(self.control), "autopilot": self.autopilot, "seq": self.controls_applied}

    # ------------------------------------------------------------------ frames

    def build(self, observation: Observation, realtime: bool = False) -> PackedConditions:
        """The conditions of `observation`, packed (`unpack()` for the model). Changes nothing in the session, so the Serve app
        builds all sessions' at once on a worker thread. realtime: the fps condition is 1 /
        the simulated seconds since this session's previous frame (the world ticks on the wall
        clock); otherwise, and for the first frame, the builder's: 1 / the world's tick."""
        fps = None
        last = self.last_observation
        if realtime and last is not None and observation.sim_time > last.sim_time:
            fps = 1.0 / (observation.sim_time - last.sim_time)
        return self.builder.build_packed(observation, fps=fps)

    def pushed(self, observation: Observation, conditions: PackedConditions, controls_seen: int) -> None:
        """`conditions` (built from `observation`) entered the queue. controls_seen:
        `controls_applied` read before the world was asked for the observation, so that a
        control landing while it is taken counts as not yet shown."""
        self.last_observation, self.last_conditions = observation, conditions
        self.frames_in += 1
        self._queued.append((conditions, controls_seen))

    def delivered(self, pictures: Iterable[PictureOut]) -> list[GeneratedFrame]:
        """Frames out of the queue, oldest first, each with the conditions it shows (the k-th
        frame out shows the k-th conditions pushed); counts them and measures latency."""
        now = self._clock()
        frames = []
        for picture in pictures:
            packed, seen = self._queued.popleft()
            conditions = packed.unpack()
            # Numbered by this session, not by its queue: a queue rebuilt elsewhere counts from 0.
            index = self.frames_out
            frames.append(GeneratedFrame(picture.images, conditions, index, index + self.queue_depth + 1, seen))
            self.frames_out += 1
            self.shown_sim_time = float(conditions.sim_time)
            self._out_times.append(now)
            shown = None
            while self._controls_sent and self._controls_sent[0].count <= seen:
                shown = self._controls_sent.popleft()
            if shown is not None:  # the first frame out whose observation came after it
                self.latency_frames = self.frames_out - shown.frames_out
                self.latency_s = now - shown.at
        # The last two frames stay, whatever their age: fps() measures a slow rate from them.
        while len(self._out_times) > 2 and now - self._out_times[0] > self.fps_window:
            self._out_times.popleft()
        return frames

    def queue_rebuilt(self) -> int:
        """The queue was rebuilt empty (the denoiser pipeline holding it was lost): the frames
        in it never come out; the new queue warms up and the frames go on. Returns how many
        were lost."""
        lost = len(self._queued)
        self.queue_restarts += 1
        self.gap_frames += lost
        self._queued.clear()
        return lost

    def ego_replaced(self, ego_id: str) -> None:
        """The world lost the ego car (it was restarted) and holds this one for it now, given
        the session's autopilot or sticky control; the queue and the frames go on."""
        self.ego_id = ego_id
        self.ego_restarts += 1

    def step(
        self, world: World, pipeline: StreamingPipeline, on_step: ProgressCallback | None = None
    ) -> list[GeneratedFrame]:
        """One frame with a world and a queue in this process: observe the ego now, push its
        conditions, return the frames that leave the queue (zero or one). The caller ticks
        the world."""
        seen = self.controls_applied
        observation = world.observe(self.ego_id)
        conditions = self.build(observation)
        self.pushed(observation, conditions, seen)
        return self.delivered(pipeline.push(conditions.unpack(), on_step))

    # ------------------------------------------------------------------ stats

    def fps(self) -> float:
        """Frames out per second: over the frames out in the last `fps_window` s, or, with
        fewer than two there (a slower rate), from the last two frames, and then no more than
        1 / the time since the newest one (a session that stopped making frames falls towards
        0). 0 before the second frame."""
        if len(self._out_times) < 2:
            return 0.0
        now = self._clock()
        times = [t for t in self._out_times if now - t <= self.fps_window]
        if len(times) >= 2:
            return (len(times) - 1) / max(times[-1] - times[0], 1e-9)
        before, last = self._out_times[-2], self._out_times[-1]
        return 1.0 / max(last - before, now - last, 1e-9)

    def stats(self, world_time: float = 0.0) -> DrivingStats:
        """world_time: s, the world's simulation time, reported until the first observation."""
        obs, conditions = self.last_observation, self.last_conditions
        return DrivingStats(
            frames_in=self.frames_in,
            frames_out=self.frames_out,
            fps=self.fps(),
            queue_depth=self.queue_depth,
            ego_speed=obs.ego_speed if obs else 0.0,
            lane_offset=obs.lane_offset if obs else None,
            sim_time=obs.sim_time if obs else world_time,
            shown_sim_time=self.shown_sim_time,
            # column 0 of the camera scalars (V, 11) is the fps the model is told
            fps_condition=None if conditions is None else float(conditions.camera_params[0, 0]),
            control_latency_frames=self.latency_frames,
            control_latency_s=self.latency_s,
            queue_restarts=self.queue_restarts,
            gap_frames=self.gap_frames,
            ego_restarts=self.ego_restarts,
        )
