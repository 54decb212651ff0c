"""The app builder: `serve run deployments:app key=value ...` composes `conf/` and binds the topology.

    client --HTTP--> Ingress --> SessionManager --+--> World      (one world for all egos, or one each)
                                 (sessions,       +--> QueueServer   (the model, every queue)
                                  publishers)

`deployments.app({"world.map": "merge"})` is what `serve run deployments:app world.map=merge` does.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from ray.serve import Application

from deployments.queue_server import QueueServer
from deployments.ingress import Ingress
from deployments.sessions import SessionManager
from deployments.stages import TRANSPORTS
from deployments.world import WorldActor
from dwm.conditions.builder import ConditionBuilder
from dwm.config import ConfigError, compose, condition_fps, instantiate
from dwm.models.checkpoint import check_weights
from dwm.pipelines.fifo import BandedFifoQueue
from dwm.world.opendrive_map import is_opendrive_path

CLOCKS = ("lockstep", "realtime")
# Where `python -m deployments` listens: that command's, never the app's (see `app`).
HTTP_KEYS = ("serve.http_host", "serve.http_port")
PLACEMENTS = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def app(args: dict[str, str] | None = None) -> Application:
    """Compose the config with `args` as Hydra overrides (values may be strings, as `serve run`
    passes them) and bind the deployments. A bad override raises ConfigError naming the key."""
    args = dict(args or {})
    given = [key for key in args if str(key).lstrip("+~") in HTTP_KEYS]
    if given:  # serve run (and a Serve config's args) would silently keep 127.0.0.1:8000
        raise ConfigError(
            f"{given[0]}: `serve run` does not take its listening address from key=value arguments "
            "(it listens on 127.0.0.1:8000); use `python -m deployments serve.http_port=PORT "
            "[serve.http_host=HOST]`, or start Serve first with `serve start --http-port PORT "
            "[--http-host HOST]`, then `serve run -a auto deployments:app`"
        )
    cfg = compose(args)
    check(cfg)
    anchor_world_map(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)  # crosses to the replicas as plain data
    s = cfg.serve
    # Short graceful shutdowns: the actors close their streams in well under a second. Health
    # checks often enough that a replica that died is replaced in seconds (Serve's default: 10 s).
    stop = {"graceful_shutdown_timeout_s": float(s.graceful_shutdown_s), "graceful_shutdown_wait_loop_s": 0.1,
            "health_check_period_s": float(s.health_check_s)}
    env = replica_env(cfg)

    def actor(**resources) -> dict:
        return {**resources, "runtime_env": {"env_vars": env}} if env else resources

    world = WorldActor.options(ray_actor_options=actor(num_cpus=s.world.num_cpus), **stop).bind(plain)
    denoiser = QueueServer.options(
        ray_actor_options=actor(num_cpus=s.denoiser.num_cpus, num_gpus=s.denoiser.num_gpus), **stop
    ).bind(plain)
    sessions = SessionManager.options(ray_actor_options=actor(num_cpus=s.sessions.num_cpus), **stop).bind(
        world, denoiser, plain
    )
    return Ingress.options(
        num_replicas=int(s.ingress.replicas), ray_actor_options=actor(num_cpus=s.ingress.num_cpus), **stop
    ).bind(sessions, s.max_body_bytes, allowed_hosts(cfg))


def anchor_world_map(cfg: DictConfig) -> None:
    """An OpenDRIVE file given as `world.map` by a relative path is taken from here, where the
    app is built: the World replica runs in a working folder of Ray's."""
    name = OmegaConf.select(cfg, "world.map")
    if isinstance(name, str) and is_opendrive_path(name):
        cfg.world.map = str(Path(name).expanduser().resolve())


def replica_env(cfg: DictConfig) -> dict[str, str]:
    """Environment variables every replica process starts with (read by glibc at start)."""
    threshold = cfg.serve.malloc_mmap_threshold
    return {} if threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(int(threshold))}


def allowed_hosts(cfg: DictConfig) -> list[str]:
    """The Host header names the HTTP API answers: serve.allowed_hosts and serve.http_host."""
    hosts = [str(h) for h in cfg.serve.allowed_hosts]
    return hosts if "*" in hosts else list(dict.fromkeys([*hosts, str(cfg.serve.http_host)]))


def check(cfg: DictConfig) -> None:
    """Build the cheap parts once here, in the builder's process, so that a bad value stops the
    start with one message naming its key (rather than replicas failing to start)."""
    s = cfg.serve
    if s.clock not in CLOCKS:
        raise ConfigError(f"serve.clock={s.clock}: allowed {', '.join(CLOCKS)}")
    if not (isinstance(s.max_sessions, int) and s.max_sessions >= 1):
        raise ConfigError(f"serve.max_sessions={s.max_sessions}: must be a whole number >= 1")
    if not (isinstance(s.jpeg_quality, int) and 1 <= s.jpeg_quality <= 100):
        raise ConfigError(f"serve.jpeg_quality={s.jpeg_quality}: must be a whole number in [1, 100]")
    for key in ("ingress.num_cpus", "sessions.num_cpus", "world.num_cpus", "denoiser.num_cpus", "denoiser.num_gpus"):
        value = OmegaConf.select(s, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"serve.{key}={value}: must be a number >= 0")
    if s.denoiser.num_gpus > 0 and str(cfg.device) == "cpu":
        raise ConfigError(f"serve.denoiser.num_gpus={s.denoiser.num_gpus} needs a GPU device: set device=cuda")
    if not isinstance(s.world.shared, bool):
        raise ConfigError(f"serve.world.shared={s.world.shared}: must be true (one world for all sessions) or false (one each)")
    if not (isinstance(s.pipelines, int) and s.pipelines >= 1):
        raise ConfigError(f"serve.pipelines={s.pipelines}: must be a whole number >= 1")
    if s.stage.placement not in PLACEMENTS:
        raise ConfigError(f"serve.stage.placement={s.stage.placement}: allowed {', '.join(PLACEMENTS)}")
    for key in ("stage.num_gpus", "stage.num_cpus"):
        value = OmegaConf.select(s, key)
        if value is None and key == "stage.num_gpus":
            continue  # one per stage with device=cuda
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"serve.{key}={value}: must be a number >= 0")
    if not (OmegaConf.is_list(s.allowed_hosts) and len(s.allowed_hosts) and all(isinstance(h, str) and h for h in s.allowed_hosts)):
        raise ConfigError(f"serve.allowed_hosts={s.allowed_hosts}: must be a list of host names (e.g. [localhost, 127.0.0.1]), or [\"*\"] for any")
    if isinstance(s.max_body_bytes, bool) or not (isinstance(s.max_body_bytes, int) and s.max_body_bytes >= 1):
        raise ConfigError(f"serve.max_body_bytes={s.max_body_bytes}: must be a whole number of bytes >= 1")
    if not (isinstance(s.stage.compiled_graph, bool) or s.stage.compiled_graph == "auto"):
        raise ConfigError(
            f"serve.stage.compiled_graph={s.stage.compiled_graph}: allowed true (Ray Compiled Graphs), "
            "false (plain Ray calls) or auto (true where the stages have GPUs)"
        )
    if s.stage.transport not in TRANSPORTS:
        raise ConfigError(f"serve.stage.transport={s.stage.transport}: allowed {', '.join(TRANSPORTS)}")
    threshold = s.malloc_mmap_threshold
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= 2**25):
        raise ConfigError(f"serve.malloc_mmap_threshold={threshold}: must be null or a whole number of bytes in [0, 33554432]")
    health = s.health_check_s
    if isinstance(health, bool) or not isinstance(health, (int, float)) or not health > 0:
        raise ConfigError(f"serve.health_check_s={health}: must be a number of seconds > 0")
    if not isinstance(s.public_viewing, bool):
        raise ConfigError(f"serve.public_viewing={s.public_viewing}: must be true (anyone may see every session) "
                          "or false (a session is seen with its driver's or a viewer's token)")
    if s.record_dir is not None and not isinstance(s.record_dir, str):
        raise ConfigError(f"serve.record_dir={s.record_dir}: must be a folder path or null")
    p = cfg.pipeline
    if not isinstance(p.cfg_parallel, bool):
        raise ConfigError(f"pipeline.cfg_parallel={p.cfg_parallel}: must be true (two GPUs share every call) or false")
    if p.cfg_parallel and (p.bands != 1 or s.pipelines != 1):
        raise ConfigError(
            f"pipeline.cfg_parallel=true runs with pipeline.bands=1 and serve.pipelines=1 "
            f"(got bands={p.bands}, pipelines={s.pipelines}): use one way to spread over GPUs"
        )
    try:
        BandedFifoQueue(p.steps, p.window, p.bands, (1, 1, 1, 1))
    except ValueError as err:
        raise ConfigError(f"pipeline: {err}") from None
    condition_fps(cfg)  # pipeline.fps null, or agreeing with the world's tick
    try:
        ConditionBuilder.from_config(cfg)
    except ValueError as err:
        raise ConfigError(f"rig / pipeline.resolution: {err}") from None
    check_weights(cfg)  # model.checkpoint, model.sd35_dir: set and there
    instantiate(cfg, "world").close()  # ConfigError naming `world` and what it allows
