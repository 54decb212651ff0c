"""The HTTP API's bodies and answers (pydantic: only at the HTTP boundary)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from dwm.world.base import VehicleControl


LAYOUT_KINDS = ("map", "boxes", "both")  # GET /sessions/{id}/layout.png?kind=


def _range(name: str) -> tuple[float, float]:
    return VehicleControl.RANGES[name]  # the contract's ranges, one source


def _number_field(name: str, meaning: str):
    lo, hi = _range(name)
    return Field(None, ge=lo, le=hi, description=f"{meaning}; a number in [{lo:g}, {hi:g}]")


class ControlRequest(BaseModel):
    """Changes to a session's sticky control (Carla's semantics); fields left out keep their value."""

    model_config = ConfigDict(extra="forbid", strict=True)

    throttle: float | None = _number_field("throttle", "accelerator pedal")
    steer: float | None = _number_field("steer", "steering wheel, negative is left")
    brake: float | None = _number_field("brake", "brake pedal")
    reverse: bool | None = Field(None, description="reverse gear; true or false")
    hand_brake: bool | None = Field(None, description="hand brake; true or false")
    autopilot: bool | None = Field(None, description="the traffic model drives the ego; true or false")


def _whole(value):
    """A JSON number with no fraction (700.0) is a whole number as JSON Schema's "integer" says;
    anything else is left for strict validation (which refuses strings, booleans, 700.5)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# torch.manual_seed takes values below 2**63: a larger one must be refused here, not overflow
# later. The bound is I-JSON's (RFC 7493): whole numbers up to 2**53 - 1 read exactly in every
# JSON reader (JavaScript's numbers, clients that parse JSON numbers as doubles), larger ones may
# arrive as another number than the one sent.
Seed = Annotated[int, Field(ge=0, le=2**53 - 1), BeforeValidator(_whole)]


class SessionOptions(BaseModel):
    """Options of a new driving session (the POST /sessions body; all optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    autopilot: bool | None = Field(None, description="start on autopilot; true or false (default: config serve.autopilot)")
    overlay: bool | None = Field(
        None, description="draw the layout over the generated views; true or false (default: config stream.overlay)"
    )
    record: bool = Field(False, description="record the session to an MP4 file in serve.record_dir; true or false")
    seed: Seed | None = Field(None, description="seed of the session's denoising noise; a whole number, 0 <= seed <= 2**53 - 1 (default: config seed)")


class SessionChanges(BaseModel):
    """Changes to a running session (the PATCH /sessions/{id} body; all optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    overlay: bool | None = Field(None, description="draw the layout over the generated views from now on; true or false")
    record: bool | None = Field(
        None, description="true: start recording to a new MP4 file in serve.record_dir (nothing if one is being "
        "written); false: finish the one being written, which GET /sessions/{id}/recording.mp4 then downloads"
    )


class Streams(BaseModel):
    mjpeg: str = Field(description="multipart/x-mixed-replace JPEG stream of the session's video; its URL carries "
                       "a read-only viewer token (`?token=`), never the driver's, so it can go to a player as it is")
    rtsp: str | None = Field(description="RTSP path the video is pushed to (config stream.rtsp.url), or null")


class SessionCreated(BaseModel):
    id: str
    token: str = Field(description="the driver's token: send as `Authorization: Bearer <token>` to control, "
                       "delete, share or see the session (sessions are private)")
    streams: Streams


class SessionShared(BaseModel):
    id: str
    token: str = Field(description="a read-only viewer token: `Authorization: Bearer <token>` or `?token=<token>` "
                       "sees the session's state, video and layout, and nothing else")
    streams: Streams


class ControlState(BaseModel):
    throttle: float
    steer: float
    brake: float
    reverse: bool
    hand_brake: bool
    autopilot: bool
    seq: int = Field(description="sequence number of this control (1 for the session's first, 0 before any); "
                                 "each video frame carries the newest one it shows (X-Control-Seq)")


class VideoOutput(BaseModel):
    published: int = Field(description="frames pushed / written")
    dropped: int = Field(description="frames the encoder could not keep up with, or that came while the output was down")
    error: str | None = Field(description="why this output stopped, or (RTSP) why it is down now; null while frames flow")
    reconnects: int = Field(0, description="times the output came back after an error (RTSP: the server restarted)")


# The `stats` of a session's answer: its `dwm.session.DrivingStats`, then its video outputs.
class SessionStats(BaseModel):
    frames_in: int = Field(description="condition frames pushed into the queue")
    frames_out: int = Field(description="generated frames out of the queue")
    fps: float = Field(
        description="generated frames per second over the last serve.fps_window seconds; slower than 2 frames "
        "in that window: from the last two frames (at most 1 / the seconds since the newest); 0 before the second"
    )
    queue_depth: int = Field(description="frames between a frame's conditions entering and its picture leaving")
    ego_speed: float = Field(description="m/s, signed (negative when reversing)")
    lane_offset: float | None = Field(description="m from the centre of the ego's lane, positive to its left, of the "
                                      "newest observation; null where the world cannot tell")
    sim_time: float = Field(description="s, simulation time of the newest observation")
    shown_sim_time: float | None = Field(description="s, simulation time of the newest generated frame")
    fps_condition: float | None = Field(
        description="the fps camera condition of the newest frame pushed (realtime: follows the simulated time step)"
    )
    control_latency_frames: int | None = Field(
        description="frames out from the last control that reached the screen to the first frame showing it"
    )
    control_latency_s: float | None = Field(description="seconds from that control to that frame")
    queue_restarts: int = Field(description="times the session's queue was rebuilt because a denoiser stage died")
    gap_frames: int = Field(description="frames lost in those rebuilds (conditions pushed that never became pictures)")
    ego_restarts: int = Field(description="times the ego car was put into the world again because the world had lost "
                              "it (the World actor restarted): a new place, the same session and stream")
    viewers: int = Field(description="MJPEG viewers now")
    rtsp: VideoOutput | None = Field(description="the RTSP push (config stream.rtsp.url), or null")
    recording: VideoOutput | None = Field(description="the MP4 recording being written ({\"record\": true}), or null")
    recordings: int = Field(description="finished MP4 recordings; the newest is at GET /sessions/{id}/recording.mp4")


class ModelInfo(BaseModel):
    name: str = Field(description="the model config (model=...)")
    random_weights: bool = Field(description="seeded random weights: the pictures are noise, the layout drawn "
                                 "over them is what the session shows")
    checkpoint: str | None = Field(description="the checkpoint file's name, or null")


class SessionState(BaseModel):
    id: str
    state: Literal["waiting", "warming", "running", "world unavailable", "denoiser unavailable"] = Field(
        description="waiting: for room on a denoiser pipeline (all are full, or its queue was lost; `error` says "
                    "which); warming: its queue fills before the first picture; running: pictures come")
    progress: float = Field(ge=0.0, le=1.0, description="how far the queue's warm-up is: the frames pushed of those "
                            "it takes until the first picture (stats.queue_depth + 1); 1 once pictures come")
    error: str | None = Field(description="why the session makes no frames now (the world or the denoiser cannot "
                              "be reached, e.g. while Serve restarts it), or null")
    ego: str = Field(description="the ego car's id in the world")
    model: ModelInfo
    cameras: list[str] = Field(description="the rig's cameras, in the order of the views left to right in the video")
    created: float = Field(description="Unix time the session was created")
    options: dict
    control: ControlState
    streams: Streams
    stats: SessionStats


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where in the request: e.g. [\"body\", \"steer\"], [\"path\", \"session_id\"]")
    msg: str = Field(description="what is wrong, and what is allowed")
    type: str = Field(description="the kind of error, e.g. session_not_found, body_too_large")


class ErrorAnswer(BaseModel):
    """Every error answer of the API (4xx, 503): what is wrong, one item per problem."""

    detail: list[ErrorItem]


def allowed_values() -> dict[str, str]:
    """Field name -> what it allows, for error messages (from the models' descriptions)."""
    allowed: dict[str, str] = {}
    for model in (ControlRequest, SessionOptions):
        for name, field in model.model_fields.items():
            allowed.setdefault(name, (field.description or "").rsplit("; ", 1)[-1])
    return allowed
