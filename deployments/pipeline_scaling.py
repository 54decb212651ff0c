"""Serve's autoscaling of the denoiser pipelines: as many as the sessions need.

With `serve.max_pipelines` above `serve.pipelines` the QueueServer deployment autoscales
between the two, by sessions rather than by requests: each pipeline takes at most
`serve.pipeline_sessions` sessions, and the session owners report how many of theirs want a
queue (placed or waiting for room, `deployments.pipeline_queues`). Serve adds pipelines at
once when that needs more, and gives one back after `serve.pipeline_idle_s` of needing fewer.
Serve chooses which replica stops: the sessions of a pipeline it stops get new queues on the
others (`stats.queue_restarts`), as after any lost pipeline.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig
from ray.serve.config import AutoscalingContext


def autoscaled(cfg: DictConfig) -> bool:
    s = cfg.serve
    return s.max_pipelines is not None and int(s.max_pipelines) > int(s.pipelines)


def scaling_options(cfg: DictConfig) -> dict:
    """The QueueServer's replica count or autoscaling config (`Deployment.options`)."""
    s = cfg.serve
    if not autoscaled(cfg):
        return {"num_replicas": int(s.pipelines)}
    return {"autoscaling_config": {
        "min_replicas": int(s.pipelines), "initial_replicas": int(s.pipelines), "max_replicas": int(s.max_pipelines),
        "upscale_delay_s": 0.0, "downscale_delay_s": float(s.pipeline_idle_s),
        "metrics_interval_s": 1.0, "look_back_period_s": 2.0, "aggregation_function": "max",
        "policy": {"policy_function": f"{__name__}:PipelinesForSessions",
                   "policy_kwargs": {"sessions_per_pipeline": int(s.pipeline_sessions)}},
    }}


class PipelinesForSessions:
    """Serve's autoscaling policy (called by its controller every tick): pipelines for every
    session that wants a queue, `sessions_per_pipeline` each. Serve applies the bounds and
    the delays (`scaling_options`)."""

    def __init__(self, sessions_per_pipeline: int):
        self.per = int(sessions_per_pipeline)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        # Every owner reports to one pipeline; after pipelines come or go, a stale copy may
        # linger in another for a few seconds: the largest count, not the sum.
        wanted = max(metrics.get("wanted", {}).values(), default=0.0)
        held = sum(metrics.get("sessions", {}).values())
        return max(math.ceil(max(wanted, held) / self.per), 1), ctx.policy_state
