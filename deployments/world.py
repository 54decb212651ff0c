"""The World actor: the world backend (`cfg.world`) of the driving sessions.

Its replicas hold worlds by group: a session owner (a SessionManager replica) puts the cars of
its sessions in groups of `serve.world.group_size` (null: one group for all its sessions) and
ticks each group once per round. `serve.world.shared` (default true): a group's cars share one
world, so those drivers meet each other in traffic. false: each car gets a world of its own
(built from the same config and seed, so every driver starts in the same scenario); a group's
tick still ticks them all at once.

With `serve.world.replicas` > 1 the groups are spread over replicas: a car's id names the
replica that holds it (`deployments.routing`), and a new group goes to the replica with the
fewest cars. A group nobody has asked about for `serve.lease_s` (its owner died) is
given back.
"""

from __future__ import annotations

import threading
import time

from omegaconf import OmegaConf
from ray import serve

from deployments import metrics
from deployments.logs import route_library_logs
from deployments.routing import LOAD_STAT, owned_by, replica_tag
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
        self._tag = replica_tag()
        self._shared = bool(self._cfg.serve.world.shared)
        self._lease_s = float(self._cfg.serve.lease_s)
        self._groups: dict[str, list[World]] = {}  # group -> its worlds (shared: one)
        self._world_of: dict[str, World] = {}  # ego id -> the world that holds it
        self._group_of: dict[str, str] = {}  # ego id -> its group
        self._used: dict[str, float] = {}  # group -> monotonic s of the last call about it
        self._next_ego = 0
        # One world is built now, to fail a bad config at start and serve dt; the first group
        # takes it. A shared world left without cars is kept for the next group (its traffic
        # goes on where it was).
        self._spare: World | None = instantiate(self._cfg, "world")
        self._dt = float(self._spare.dt)

    def _world(self, ego_id: str) -> World:
        try:
            world = self._world_of[ego_id]
        except KeyError:
            raise UnknownEgoError(ego_id, list(self._world_of)) from None
        self._used[self._group_of[ego_id]] = time.monotonic()
        return world

    def _worlds(self) -> list[World]:
        return [world for worlds in self._groups.values() for world in worlds]

    def _new_world(self) -> World:
        world, self._spare = self._spare or instantiate(self._cfg, "world"), None
        return world

    def add_ego(self, group: str = "") -> str:
        """A new car in `group`'s world (shared) or in a world of its own; returns its id."""
        with self._lock:
            worlds = self._groups.setdefault(group, [])
            if self._shared and worlds:
                world = worlds[0]
            else:
                world = self._new_world()
                worlds.append(world)
            ego_id = owned_by(self._tag, f"ego-{self._next_ego}")  # unique across worlds and replicas
            self._next_ego += 1
            world.add_ego(ego_id)
            self._world_of[ego_id], self._group_of[ego_id] = world, group
            self._used[group] = time.monotonic()
            return ego_id

    def remove_ego(self, ego_id: str) -> None:
        with self._lock:
            self._remove(ego_id)

    def _remove(self, ego_id: str) -> None:
        world = self._world_of.pop(ego_id, None)
        if world is None:
            return
        group = self._group_of.pop(ego_id)
        if ego_id in world.egos():
            world.remove_ego(ego_id)
        if world.egos():
            return
        worlds = self._groups[group]
        worlds.remove(world)
        if not worlds:
            del self._groups[group]
            self._used.pop(group, None)
        if self._shared and self._spare is None:
            self._spare = world
        else:
            world.close()  # a session's own world goes with its car

    def remove_all(self) -> int:
        """Give back every car here; how many there were."""
        with self._lock:
            cars = list(self._world_of)
            for ego_id in cars:
                self._remove(ego_id)
            return len(cars)

    def egos(self, group: str | None = None) -> list[str]:
        """The cars here (of `group`, or all)."""
        with self._lock:
            return [e for e, g in self._group_of.items() if group is None or g == group]

    def worlds(self) -> int:
        """How many worlds hold cars."""
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
        """Observations of several egos (of one group: at one simulation time)."""
        with self._lock:
            return {ego_id: self._world(ego_id).observe(ego_id) for ego_id in ego_ids}

    def tick(self, group: str | None = None) -> float:
        """Tick the worlds of `group` (None: every world) once; returns the newest simulation
        time (s) among them. Gives back the groups whose lease ran out."""
        with self._lock:
            started = time.perf_counter()
            if group is not None:
                self._used[group] = time.monotonic()
            worlds = self._worlds() if group is None else self._groups.get(group, [])
            now = max((world.tick() for world in worlds), default=self._sim_time())
            metrics.world_tick_seconds().observe(time.perf_counter() - started)
            self._expire()
            return now

    def _expire(self) -> None:
        """Give back the cars of groups nobody has asked about for the lease (their owner is
        gone: a session owner that died does not come back for them)."""
        stale = time.monotonic() - self._lease_s
        for group in [g for g, used in self._used.items() if used < stale]:
            for ego_id in [e for e, g in self._group_of.items() if g == group]:
                self._remove(ego_id)
            self._used.pop(group, None)

    def dt(self) -> float:
        """s of simulation time per tick."""
        return self._dt

    def _sim_time(self) -> float:
        return max((world.sim_time for world in [*self._worlds(), *filter(None, [self._spare])]), default=0.0)

    def sim_time(self) -> float:
        with self._lock:
            return self._sim_time()

    def record_routing_stats(self) -> dict:
        """What Serve's router weighs when it places a new group here: the cars held."""
        return {LOAD_STAT: len(self._group_of)}

    def __del__(self) -> None:
        worlds = [getattr(self, "_spare", None), *getattr(self, "_world_of", {}).values()]
        for world in {id(w): w for w in worlds if w is not None}.values():
            world.close()
