"""The World actor: the world backend (`cfg.world`) of every driving session.

`serve.world.shared` (default true): one world holds every session's ego car, so drivers
meet each other in traffic. false: each session gets a world of its own (built from the same
config and seed, so every driver starts in the same scenario) holding only its ego; a round
still ticks them all at once.
"""

from __future__ import annotations

import threading
import time

from omegaconf import OmegaConf
from ray import serve

from deployments import metrics
from deployments.logs import route_library_logs
from dwm.config import instantiate
from dwm.world.base import Observation, UnknownEgoError, VehicleControl, World


@serve.deployment(name="World", num_replicas=1)
class WorldActor:
    """Wraps `dwm.world.base.World` backends. Serve runs these sync methods on a thread pool,
    and no backend is thread-safe: one lock serialises them (each takes milliseconds)."""

    def __init__(self, cfg: dict):
        route_library_logs()
        self._cfg = OmegaConf.create(cfg)
        self._lock = threading.Lock()
        self._shared: World | None = None
        self._own: dict[str, World] = {}  # ego id -> its world, when worlds are per session
        self._next_ego = 0
        # The shared world is built now; per session, one is built now to fail a bad config
        # at start and serve dt, then used by the first session.
        self._spare: World | None = instantiate(self._cfg, "world")
        self._dt = float(self._spare.dt)
        if self._cfg.serve.world.shared:
            self._shared, self._spare = self._spare, None

    def _world(self, ego_id: str) -> World:
        if self._shared is not None:
            return self._shared
        try:
            return self._own[ego_id]
        except KeyError:
            raise UnknownEgoError(ego_id, list(self._own)) from None

    def _worlds(self) -> list[World]:
        return [self._shared] if self._shared is not None else list(self._own.values())

    def add_ego(self) -> str:
        with self._lock:
            if self._shared is not None:
                return self._shared.add_ego()
            world, self._spare = self._spare or instantiate(self._cfg, "world"), None
            ego_id = f"ego-{self._next_ego}"  # unique across the sessions' worlds
            self._next_ego += 1
            self._own[ego_id] = world
            return world.add_ego(ego_id)

    def remove_ego(self, ego_id: str) -> None:
        with self._lock:
            if self._shared is not None:
                if ego_id in self._shared.egos():
                    self._shared.remove_ego(ego_id)
                return
            world = self._own.pop(ego_id, None)
            if world is not None:
                world.close()  # the session's world goes with its ego

    def egos(self) -> list[str]:
        with self._lock:
            return [ego for world in self._worlds() for ego in world.egos()]

    def worlds(self) -> int:
        """How many worlds are running."""
        with self._lock:
            return len(self._worlds())

    def apply_control(self, ego_id: str, control: VehicleControl) -> None:
        with self._lock:
            self._world(ego_id).apply_control(ego_id, control)

    def set_autopilot(self, ego_id: str, enabled: bool) -> VehicleControl:
        """Returns the control the ego holds afterwards (switched off, the autopilot's last)."""
        with self._lock:
            world = self._world(ego_id)
            world.set_autopilot(ego_id, enabled)
            return world.observe(ego_id).control

    def observe_many(self, ego_ids: list[str]) -> dict[str, Observation]:
        """Observations of several egos at one simulation time."""
        with self._lock:
            return {ego_id: self._world(ego_id).observe(ego_id) for ego_id in ego_ids}

    def tick(self) -> float:
        """Tick every world once; returns the newest simulation time (s)."""
        with self._lock:
            started = time.perf_counter()
            now = max((world.tick() for world in self._worlds()), default=self._sim_time())
            metrics.world_tick_seconds().observe(time.perf_counter() - started)
            return now

    def dt(self) -> float:
        """s of simulation time per tick."""
        return self._dt

    def _sim_time(self) -> float:
        return max((world.sim_time for world in self._worlds()), default=0.0)

    def sim_time(self) -> float:
        with self._lock:
            return self._sim_time()

    def __del__(self) -> None:
        own = getattr(self, "_own", {})
        for world in [getattr(self, "_shared", None), getattr(self, "_spare", None), *own.values()]:
            if world is not None:
                world.close()
