"""The World actor: one world backend (`cfg.world`) shared by every driving session."""

from __future__ import annotations

import threading

from omegaconf import OmegaConf
from ray import serve

from dwm.config import instantiate
from dwm.world.base import Observation, VehicleControl


@serve.deployment(name="World", num_replicas=1)
class WorldActor:
    """Wraps a `dwm.world.base.World`. Serve runs these sync methods on a thread pool, and no
    backend is thread-safe: one lock serialises them (each takes milliseconds)."""

    def __init__(self, cfg: dict):
        self._world = instantiate(OmegaConf.create(cfg), "world")
        self._lock = threading.Lock()

    def add_ego(self) -> str:
        with self._lock:
            return self._world.add_ego()

    def remove_ego(self, ego_id: str) -> None:
        with self._lock:
            if ego_id in self._world.egos():
                self._world.remove_ego(ego_id)

    def egos(self) -> list[str]:
        with self._lock:
            return self._world.egos()

    def apply_control(self, ego_id: str, control: VehicleControl) -> None:
        with self._lock:
            self._world.apply_control(ego_id, control)

    def set_autopilot(self, ego_id: str, enabled: bool) -> VehicleControl:
        """Returns the control the ego holds afterwards (switched off, the autopilot's last)."""
        with self._lock:
            self._world.set_autopilot(ego_id, enabled)
            return self._world.observe(ego_id).control

    def observe_many(self, ego_ids: list[str]) -> dict[str, Observation]:
        """Observations of several egos at one simulation time."""
        with self._lock:
            return {ego_id: self._world.observe(ego_id) for ego_id in ego_ids}

    def tick(self) -> float:
        with self._lock:
            return self._world.tick()

    def dt(self) -> float:
        """s of simulation time per tick."""
        return float(self._world.dt)

    def sim_time(self) -> float:
        with self._lock:
            return self._world.sim_time

    def __del__(self) -> None:
        world = getattr(self, "_world", None)
        if world is not None:
            world.close()
