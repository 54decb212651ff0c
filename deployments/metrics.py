"""The app's Prometheus metrics, in one place: names, meanings, units and tags.

They go through `ray.serve.metrics`, so they reach Ray's metrics export (every node's
`metrics_export_port`, scraped by `ray metrics launch-prometheus`), where Ray prefixes each
name with `ray_`. `deployments/grafana_dashboard.json` draws them. Per-session series carry a
`session` tag (the session's id).
"""

from __future__ import annotations

from functools import cache

from ray.serve.metrics import Counter, Gauge, Histogram

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]  # histogram buckets, s
SESSION = ("session",)


@cache
def sessions() -> Gauge:
    return Gauge("dwm_sessions", "driving sessions open now")


@cache
def frames_out() -> Counter:
    return Counter("dwm_frames_out", "generated frames out of a session's queue", tag_keys=SESSION)


@cache
def frames_skipped() -> Gauge:
    # A gauge of the running total, not a counter: a counter is exported only once it has
    # counted, and most sessions never skip a frame.
    return Gauge("dwm_frames_skipped", "generated frames a session's video has skipped so far (a newer one came "
                 "before the older was encoded)", tag_keys=SESSION)


@cache
def session_fps() -> Gauge:
    return Gauge("dwm_session_fps", "a session's generated frames per second (serve.fps_window)", tag_keys=SESSION)


@cache
def queue_depth() -> Gauge:
    return Gauge("dwm_queue_depth", "frames between a session's conditions entering its queue and its picture "
                 "leaving", tag_keys=SESSION)


@cache
def encoder_backlog() -> Gauge:
    return Gauge("dwm_encoder_backlog", "frames waiting for a session's H.264 encoders (RTSP and recording)",
                 tag_keys=SESSION)


@cache
def control_latency() -> Histogram:
    return Histogram("dwm_control_latency_seconds", "from a control reaching the world to the first frame "
                     "showing it, s", boundaries=SECONDS)


@cache
def round_seconds() -> Histogram:
    return Histogram("dwm_round_seconds", "one frame round of all sessions (observe, build, hand over), s",
                     boundaries=SECONDS)


@cache
def denoise_seconds() -> Histogram:
    return Histogram("dwm_denoise_seconds", "the denoiser's work for one round of all sessions (every model call "
                     "of a shift, and the decode), s", boundaries=SECONDS)


@cache
def model_call_seconds() -> Gauge:
    return Gauge("dwm_model_call_seconds", "the latest round's denoising time per model call (the round's time / "
                 "its calls), s")


@cache
def world_tick_seconds() -> Histogram:
    return Histogram("dwm_world_tick_seconds", "one world tick, s", boundaries=SECONDS)



@cache
def handover_seconds() -> Gauge:
    return Gauge("dwm_handover_seconds", "the latest denoiser pool round's wall time beyond its slowest stage's own "
                 "work: starting the round and carrying frames from stage to stage, s (0 where one process "
                 "runs the model)")
