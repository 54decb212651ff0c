"""NPC traffic of the Carla world: vehicles on the traffic manager's autopilot, and walkers led
by Carla's AI walker controllers, which get a new target each time they arrive."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

from dwm.world.carla_client import quietly

log = logging.getLogger(__name__)

ARRIVED_M = 1.5  # a walker this close (on the ground plane) to its target has arrived
NPC_ROLE = "dwm-npc"  # role_name of everything we spawn besides the heroes


@dataclass
class _Walker:
    actor: object  # carla.Walker
    controller: object  # carla.WalkerAIController
    target: object = None  # carla.Location, None until the controller has started


class Traffic:
    """Spawns and owns the NPCs. vehicles / walkers: how many to spawn (fewer when spawn places
    run out); vehicle_filter / walker_filter: blueprint patterns; walker_speed: m/s."""

    def __init__(self, carla, world, tm_port: int, rng: random.Random, vehicle_filter: str, walker_filter: str,
                 walker_speed: float):
        self._carla, self._world, self._tm_port, self._rng = carla, world, tm_port, rng
        self._vehicle_filter, self._walker_filter, self._walker_speed = vehicle_filter, walker_filter, walker_speed
        self.vehicles: list = []
        self.walkers: list[_Walker] = []

    def spawn(self, vehicles: int, walkers: int, spawn_points: list) -> None:
        """spawn_points: carla.Transforms free for traffic (the heroes' places left out)."""
        library = self._world.get_blueprint_library()
        blueprints = [bp for bp in library.filter(self._vehicle_filter) if _int_attribute(bp, "number_of_wheels", 4) == 4]
        if vehicles and not blueprints:
            raise ValueError(f"world.vehicle_filter={self._vehicle_filter!r} matches no four-wheeled vehicle blueprint")
        places = list(spawn_points)
        self._rng.shuffle(places)
        for place in places:
            if len(self.vehicles) >= vehicles:
                break
            bp = self._rng.choice(blueprints)
            _set(bp, "role_name", NPC_ROLE)
            actor = self._world.try_spawn_actor(bp, place)
            if actor is not None:
                actor.set_autopilot(True, self._tm_port)
                self.vehicles.append(actor)
        if len(self.vehicles) < vehicles:
            log.warning("spawned %d of %d NPC vehicles: the town has no more free spawn points", len(self.vehicles), vehicles)

        walker_bps = list(library.filter(self._walker_filter))
        if walkers and not walker_bps:
            raise ValueError(f"world.walker_filter={self._walker_filter!r} matches no walker blueprint")
        controller_bp = library.find("controller.ai.walker")
        for _ in range(walkers * 3):  # navigation points may be taken: a few tries each
            if len(self.walkers) >= walkers:
                break
            location = self._world.get_random_location_from_navigation()
            if location is None:
                continue
            bp = self._rng.choice(walker_bps)
            _set(bp, "role_name", NPC_ROLE)
            _set(bp, "is_invincible", "false")
            walker = self._world.try_spawn_actor(bp, self._carla.Transform(location + self._carla.Location(z=1.0)))
            if walker is None:
                continue
            controller = self._world.spawn_actor(controller_bp, self._carla.Transform(), attach_to=walker)
            self.walkers.append(_Walker(walker, controller))

    def update(self, locations: dict[int, object]) -> None:
        """After a tick: start new controllers (they need one tick after spawning, as Carla's
        walkers do) and send walkers that arrived to a new place. locations: actor id ->
        carla.Location at this tick."""
        for w in self.walkers:
            here = locations.get(w.actor.id)
            if w.target is None:
                w.controller.start()
                w.controller.set_max_speed(self._walker_speed)
                self._new_target(w)
            elif here is not None and math.hypot(here.x - w.target.x, here.y - w.target.y) < ARRIVED_M:
                self._new_target(w)

    def _new_target(self, w: _Walker) -> None:
        target = self._world.get_random_location_from_navigation()
        if target is not None:
            w.target = target
            w.controller.go_to_location(target)

    def ids(self) -> set[int]:
        return {a.id for a in self.vehicles} | {w.actor.id for w in self.walkers} | {w.controller.id for w in self.walkers}

    def destroy(self) -> None:
        """Destroy every NPC: controllers stopped first, then walkers, then vehicles."""
        for w in self.walkers:
            quietly(w.controller.stop)
            quietly(w.controller.destroy)
            quietly(w.actor.destroy)
        for v in self.vehicles:
            quietly(lambda v=v: v.set_autopilot(False, self._tm_port))
            quietly(v.destroy)
        self.walkers, self.vehicles = [], []


def _set(bp, key: str, value: str) -> None:
    if bp.has_attribute(key):
        bp.set_attribute(key, value)


def _int_attribute(bp, key: str, default: int) -> int:
    if not bp.has_attribute(key):
        return default
    try:
        return int(bp.get_attribute(key).as_int())
    except (AttributeError, RuntimeError, ValueError):
        return default
