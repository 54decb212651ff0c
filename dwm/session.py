"""A driving session: one ego car in a world, its conditions and its denoising queue.

This is the whole frame loop of one session without Ray (`python -m dwm.run` drives it; the
Serve layer runs one per session):

    observe the ego -> conditions -> push into the queue -> the leaving frame's views

The session does not tick the world: the caller does, once per frame in the lockstep clock,
so that several sessions can share one world.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from dwm.conditions.builder import ConditionBuilder
from dwm.pipelines.fifo import ProgressCallback
from dwm.pipelines.streaming import GeneratedFrame, StreamingPipeline
from dwm.world.base import Observation, VehicleControl, World


@dataclass
class SessionStats:
    """What a driver can read about their session."""

    frames_in: int  # condition frames pushed
    frames_out: int  # generated frames out
    queue_depth: int  # frames between conditions entering and their picture leaving
    warming: bool
    sim_time: float  # s, of the newest observation
    ego_speed: float  # m/s


class DrivingSession:
    """One ego car with its own conditions builder and streaming pipeline."""

    def __init__(
        self,
        world: World,
        builder: ConditionBuilder,
        pipeline: StreamingPipeline,
        ego_id: str | None = None,
        autopilot: bool = False,
    ):
        self.world, self.builder, self.pipeline = world, builder, pipeline
        self.ego_id = world.add_ego(ego_id)
        if autopilot:
            world.set_autopilot(self.ego_id, True)
        self.control = VehicleControl()
        self.last_observation: Observation | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, world: World, ego_id: str | None = None, autopilot: bool = False):
        builder = ConditionBuilder.from_config(cfg)
        pipeline = StreamingPipeline.from_config(cfg, views=builder.num_views)
        return cls(world, builder, pipeline, ego_id, autopilot)

    def apply_control(self, **changes) -> VehicleControl:
        """Merge changes into the sticky control (Carla's semantics) and send it to the ego."""
        self.control = self.control.merged(**changes)
        self.world.apply_control(self.ego_id, self.control)
        return self.control

    def set_autopilot(self, enabled: bool) -> None:
        self.world.set_autopilot(self.ego_id, enabled)

    def step(self, on_step: ProgressCallback | None = None, fps: float | None = None) -> list[GeneratedFrame]:
        """Observe the ego now, push its conditions, return the frames that leave the queue.

        fps: the fps condition when it follows the wall clock (realtime); default: the
        builder's (1 / the world's tick, `dwm.config.condition_fps`).
        """
        observation = self.world.observe(self.ego_id)
        self.last_observation = observation
        conditions = self.builder.build(observation, fps=fps)
        return self.pipeline.push(conditions, on_step)

    def stats(self) -> SessionStats:
        obs = self.last_observation
        return SessionStats(
            frames_in=self.pipeline.frames_in,
            frames_out=self.pipeline.frames_out,
            queue_depth=self.pipeline.depth,
            warming=self.pipeline.warming,
            sim_time=obs.sim_time if obs else self.world.sim_time,
            ego_speed=obs.ego_speed if obs else 0.0,
        )

    def close(self) -> None:
        """Release the ego car; the queue state goes with this object."""
        if self.ego_id in self.world.egos():
            self.world.remove_ego(self.ego_id)
