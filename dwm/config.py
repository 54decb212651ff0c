"""The one config loader: composes `conf/` with Hydra's compose API.

Used by `python -m dwm.run` and by the Serve app builder, so both read the same config and
take the same `key=value` overrides.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dwm.settings import GROUPS, check_groups

CONF_DIR = Path(os.environ.get("DWM_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))

# GlobalHydra is a process-wide singleton and not thread-safe: compose under a lock.
_lock = threading.Lock()


def package_file(relative: str) -> str:
    """`${dwm.package:models/demo/vae.safetensors}` in a config: a file shipped in the dwm
    package (the demo model's weights), wherever the package is installed."""
    return str(Path(__file__).resolve().parent / relative)


if not OmegaConf.has_resolver("dwm.package"):
    OmegaConf.register_new_resolver("dwm.package", package_file)


class ConfigError(ValueError):
    """A config that cannot be composed or used; the message names the key."""


def _as_overrides(overrides: Iterable[str] | Mapping[str, object] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={value}" for key, value in overrides.items()]
    return [str(o) for o in overrides]


def group_options(group: str) -> list[str]:
    """The choices of a config group, e.g. `group_options("world")` -> ["carla", "embedded"]."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _explain(override_list: list[str], err: Exception) -> str:
    text = str(err)
    # A group choice that does not exist: name the group and its options.
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, choice = missing.groups()
        return f"{group}={choice}: no such option; allowed {group} options: {', '.join(group_options(group))}"
    # A value override of a key that does not exist.
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return f"{key}: no such config key{f' under {parent!r}' if parent else ''} (to add a new key, write +{key}=...)"
    if "Error parsing override" in text:
        bad = re.search(r"Error parsing override '([^']*)'", text)
        return f"cannot parse the override {bad.group(1) if bad else override_list!r}: write key=value, e.g. world.map=merge"
    return f"bad config override in {override_list}: {text.splitlines()[0]}"


def compose(overrides: Iterable[str] | Mapping[str, object] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides (`["world.map=merge", "model=tiny"]` or
    `{"world.map": "merge"}`); every interpolation is resolved so errors surface here."""
    override_list = _as_overrides(overrides)
    if not (CONF_DIR / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in the config folder {CONF_DIR} (set DWM_CONF_DIR)")
    with _lock:
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="dwm"):
                cfg = hydra_compose("config", overrides=override_list)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_explain(override_list, err)) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key}: {err.msg}" if getattr(err, "full_key", None) else str(err)) from None
    problem = check_groups(OmegaConf.to_container(cfg), GROUPS)
    if problem:
        raise ConfigError(problem)
    return cfg


def instantiate(cfg: DictConfig, key: str, **kwargs):
    """Build the component of config node `key` (its `_target_`), naming the key on failure."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    node = OmegaConf.select(cfg, key)
    if node is None:
        raise ConfigError(f"{key}: missing from the config")
    try:
        return hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {cause}") from cause


def require_file(cfg: DictConfig, key: str) -> Path:
    """The existing file or folder a config key points at, or a ConfigError naming the key."""
    value = OmegaConf.select(cfg, key)
    if value in (None, ""):
        raise ConfigError(f"{key} is not set: set it to a local path, e.g. {key}=/path/to/file")
    path = Path(str(value)).expanduser()
    if not path.exists():
        hint = OmegaConf.select(cfg, "model.weights_hint") if key.startswith("model.") else None
        raise ConfigError(f"{key}={value}: no such file or folder" + (f"; {hint}" if hint else ""))
    return path


# The config keys that hold a world's tick (s of simulation time per tick), by backend:
# the embedded world's `dt`, Carla's synchronous-mode `fixed_delta_seconds`.
WORLD_TICK_KEYS = ("dt", "fixed_delta_seconds")


def world_tick(cfg: Mapping) -> tuple[str, float]:
    """(`world.<key>`, seconds) of the world's tick in a composed config (a DictConfig or a
    plain dict of one); ConfigError when the world node names no tick."""
    world = cfg.get("world") if isinstance(cfg, Mapping) else None
    if not isinstance(world, Mapping):
        raise ConfigError("world: missing from the config; the fps condition follows its tick")
    for key in WORLD_TICK_KEYS:
        value = world.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"world.{key}={value}: must be a positive number of seconds per tick")
        return f"world.{key}", float(value)
    raise ConfigError(f"world: has no tick ({' or '.join('world.' + k for k in WORLD_TICK_KEYS)}); "
                      "the fps condition follows it")


def condition_fps(cfg: Mapping) -> float:
    """The fps camera scalar, frames per second, of a composed config: 1 / the world's tick.

    In lockstep every generated frame is one world tick, so the model must be told the rate at
    which its frames are apart in simulated time. `pipeline.fps` null (the default) follows
    the world; an explicit value must agree with it (it documents the rate, it cannot change
    it) or the start is refused, naming both numbers. The realtime clock starts from this
    value and then follows the simulated time between a session's frames.
    """
    key, tick = world_tick(cfg)
    world_fps = 1.0 / tick
    pipeline = cfg.get("pipeline")
    fps = pipeline.get("fps") if isinstance(pipeline, Mapping) else None
    if fps is None:
        return world_fps
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ConfigError(f"pipeline.fps={fps}: must be a positive number, or null (follows the world's tick)")
    if not math.isclose(float(fps), world_fps, rel_tol=1e-6):
        shown = round(world_fps, 6)
        raise ConfigError(
            f"pipeline.fps={float(fps)} disagrees with the world's tick: {key}={tick} s is {shown} fps; "
            f"set pipeline.fps=null (follows the world) or {shown}"
        )
    return world_fps
