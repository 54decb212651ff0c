"""The app builder: `serve run deployments:app key=value ...` composes `conf/` and binds the topology.

    client --HTTP--> Ingress --> SessionManager --+--> World       (worlds by group of sessions)
                     (stateless, (owners: sessions, +--> QueueServer (pipelines: the model, the
                      replicas)   publishers)                      queues of their sessions)

A request about a session goes to the SessionManager replica that owns it, a call about a car
to the World replica that holds it, a round's frames to the pipelines that hold their queues
(`deployments.routing.OwnerRouter`).

`deployments.app({"world.map": "merge"})` is what `serve run deployments:app world.map=merge` does.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.queue_server import QueueServer
from deployments.routing import OwnerRouter
from deployments.ingress import Ingress
from deployments.sessions import SessionManager
from deployments.pipeline_scaling import scaling_options
from deployments.settings import ServeSettings
from deployments.stages import stage_bundle
from deployments.world import WorldActor
from dwm.conditions.builder import ConditionBuilder
from dwm.config import ConfigError, compose, condition_fps, instantiate
from dwm.settings import check_groups
from dwm.models.checkpoint import check_weights
from dwm.pipelines.fifo import BandedFifoQueue
from dwm.world.opendrive_map import is_opendrive_path

# Where `python -m deployments` listens: that command's, never the app's (see `app`).
HTTP_KEYS = ("serve.http_host", "serve.http_port")


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

    # Owners report their load every second (`record_routing_stats`): where new things go.
    by_owner = RequestRouterConfig(request_router_class=OwnerRouter, request_routing_stats_period_s=1.0)
    world = WorldActor.options(
        num_replicas=int(s.world.replicas), ray_actor_options=dict(num_cpus=s.world.num_cpus),
        request_router_config=by_owner, **stop,
    ).bind(plain)
    denoiser = QueueServer.options(
        request_router_config=by_owner, **scaling_options(cfg), **pipeline_resources(cfg), **stop
    ).bind(plain)
    sessions = SessionManager.options(
        num_replicas=int(s.sessions.owners), ray_actor_options=dict(num_cpus=s.sessions.num_cpus),
        request_router_config=by_owner, **stop,
    ).bind(world, denoiser, plain)
    return Ingress.options(
        num_replicas=int(s.ingress.replicas), ray_actor_options=dict(num_cpus=s.ingress.num_cpus), **stop
    ).bind(sessions, s.max_body_bytes, allowed_hosts(cfg), int(s.sessions.owners))


def pipeline_resources(cfg: DictConfig) -> dict:
    """A QueueServer replica's resources: `serve.denoiser`'s, and with stage actors (bands > 1)
    or a CFG partner a placement group whose first bundle is the replica's and the others
    theirs (Serve places the replica in the first; `serve.stage.placement` keeps them together)."""
    d = cfg.serve.denoiser
    own = {"CPU": float(d.num_cpus), **({"GPU": float(d.num_gpus)} if d.num_gpus else {})}
    options = {"ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}}
    if int(cfg.pipeline.bands) > 1:
        bundles = [own] + [stage_bundle(cfg)] * int(cfg.pipeline.bands)
    elif cfg.pipeline.cfg_parallel:
        bundles = [own, own]  # the partner: the same as the replica
    else:
        return options
    return {**options, "placement_group_bundles": [dict(b) for b in bundles],
            "placement_group_strategy": str(cfg.serve.stage.placement)}


def anchor_world_map(cfg: DictConfig) -> None:
    """An OpenDRIVE file given as `world.map` by a relative path is taken from here, where the
    app is built: the World replica runs in a working folder of Ray's."""
    name = OmegaConf.select(cfg, "world.map")
    if isinstance(name, str) and is_opendrive_path(name):
        cfg.world.map = str(Path(name).expanduser().resolve())


def allowed_hosts(cfg: DictConfig) -> list[str]:
    """The Host header names the HTTP API answers: serve.allowed_hosts and serve.http_host."""
    hosts = [str(h) for h in cfg.serve.allowed_hosts]
    return hosts if "*" in hosts else list(dict.fromkeys([*hosts, str(cfg.serve.http_host)]))


def check(cfg: DictConfig) -> None:
    """Build the cheap parts once here, in the builder's process, so that a bad value stops the
    start with one message naming its key (rather than replicas failing to start)."""
    problem = check_groups(OmegaConf.to_container(cfg), {"serve": ServeSettings})
    if problem:
        raise ConfigError(problem)
    s, p = cfg.serve, cfg.pipeline
    if s.denoiser.num_gpus > 0 and str(cfg.device) == "cpu":
        raise ConfigError(f"serve.denoiser.num_gpus={s.denoiser.num_gpus} needs a GPU device: set device=cuda")
    if s.max_pipelines is not None and s.max_pipelines < s.pipelines:
        raise ConfigError(f"serve.max_pipelines={s.max_pipelines}: at least serve.pipelines ({s.pipelines}), "
                          "the pipelines that always run")
    if s.max_pipelines is not None and s.max_pipelines > s.pipelines and s.pipeline_sessions is None:
        raise ConfigError(f"serve.max_pipelines={s.max_pipelines} adds pipelines when sessions wait for room: "
                          "set serve.pipeline_sessions, the sessions a pipeline takes")
    if p.cfg_parallel and p.bands != 1:
        raise ConfigError(
            f"pipeline.cfg_parallel=true runs with pipeline.bands=1 (got {p.bands}): "
            "use one way to spread a pipeline over GPUs"
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
