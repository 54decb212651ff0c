"""The `serve` config group's schema (conf/serve/local.yaml): checked when the app is built, so
a wrong value stops `serve run` / `python -m deployments` with one line naming the key."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from dwm.settings import PositiveInt, Schema

CLOCKS = Literal["lockstep", "realtime"]
PLACEMENTS = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]  # Ray placement-group strategies
STAGE_TRANSPORTS = Literal["auto", "cpu_communicator"]  # how a compiled graph hands frames on
Cpus = Annotated[float, Field(ge=0.0)]
Seconds = Annotated[float, Field(gt=0.0)]


class IngressSettings(Schema):
    num_cpus: Cpus
    replicas: PositiveInt


class SessionsSettings(Schema):
    num_cpus: Cpus
    owners: PositiveInt


class WorldSettings(Schema):
    num_cpus: Cpus
    shared: bool
    group_size: PositiveInt | None
    replicas: PositiveInt


class StageSettings(Schema):
    num_gpus: Cpus | None
    num_cpus: Cpus
    placement: PLACEMENTS
    batch_sessions: bool
    compiled_graph: bool | Literal["auto"]
    transport: STAGE_TRANSPORTS
    torch_threads: PositiveInt | None
    start_timeout_s: Seconds


class DenoiserSettings(Schema):
    num_cpus: Cpus
    num_gpus: Cpus
    torch_threads: PositiveInt | None


class ServeSettings(Schema):
    http_host: Annotated[str, Field(min_length=1)]
    http_port: Annotated[int, Field(ge=1, le=65535)]
    max_sessions: PositiveInt
    allowed_hosts: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    max_body_bytes: PositiveInt
    public_viewing: bool
    clock: CLOCKS
    autopilot: bool
    jpeg_quality: Annotated[int, Field(ge=1, le=100)]
    record_dir: str | None
    fps_window: Seconds
    video_queue: PositiveInt
    graceful_shutdown_s: Annotated[float, Field(ge=0.0)]
    health_check_s: Seconds
    lease_s: Seconds
    trim_every_s: Seconds | None
    ingress: IngressSettings
    sessions: SessionsSettings
    world: WorldSettings
    pipelines: PositiveInt
    pipeline_sessions: PositiveInt | None
    max_pipelines: PositiveInt | None
    pipeline_idle_s: Annotated[float, Field(ge=0.0)]
    stage: StageSettings
    denoiser: DenoiserSettings
