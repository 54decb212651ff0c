"""A session owner's cars in the World replicas, by group (`deployments.world`).

The owner (a SessionManager replica) calls these as it called the World handle: each call goes
to the replica that holds the car or the group (`deployments.routing`). A group is the cars that
share a world and a tick: all of the owner's sessions (`serve.world.group_size` null), or
groups of that many; a new car joins the first group with room, a new group goes to the World
replica with the fewest cars. Calls are made one after the other (see `deployments.routing`).
"""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle

from deployments.routing import key_for, owner_key, owner_of, routed, slot_key
from dwm.world.base import Observation, VehicleControl


class WorldGroups:
    """handle: the World deployment's. owner: the owner's tag (its groups are named after it).
    group_size: cars per group, None: one group. replicas: World replicas (for `release_all`)."""

    def __init__(self, handle: DeploymentHandle, owner: str, group_size: int | None = None, replicas: int = 1):
        self.handle, self.owner, self.group_size, self.replicas = handle, owner, group_size, replicas
        self._groups: dict[str, set[str]] = {}  # group -> its cars
        self._group_of: dict[str, str] = {}  # car -> its group
        self._holder: dict[str, str] = {}  # group -> the tag of the World replica holding it
        self._next_group = 0

    def _call(self, key: str, method: str, *args):
        return getattr(routed(self.handle, key), method).remote(*args)

    def _group_with_room(self) -> str:
        if self.group_size is None:
            return self.owner
        for group, cars in self._groups.items():
            if len(cars) < self.group_size:
                return group
        group = f"{self.owner}.{self._next_group}"
        self._next_group += 1
        return group

    async def add_ego(self, replacing: str | None = None) -> str:
        """A new car (in the group of the one it replaces, which the world lost); its id."""
        group = self._forget(replacing) if replacing in self._group_of else self._group_with_room()
        holder = self._holder.get(group)
        ego_id = await self._call(owner_key(holder) if holder else "", "add_ego", group)
        self._holder[group] = owner_of(ego_id) or ""
        self._groups.setdefault(group, set()).add(ego_id)
        self._group_of[ego_id] = group
        return ego_id

    def _forget(self, ego_id: str) -> str:
        group = self._group_of.pop(ego_id)
        cars = self._groups[group]
        cars.discard(ego_id)
        return group

    async def remove_ego(self, ego_id: str) -> None:
        if ego_id in self._group_of:
            group = self._forget(ego_id)
            if not self._groups[group]:
                del self._groups[group]
                self._holder.pop(group, None)
        await self._call(key_for(ego_id), "remove_ego", ego_id)

    async def known(self) -> set[str]:
        """The owner's cars that their World replicas still hold."""
        found: set[str] = set()
        for holder in {self._holder[g] for g in self._groups}:
            found.update(await self._call(owner_key(holder), "egos"))
        return found & set(self._group_of)

    async def observe_many(self, ego_ids: list[str]) -> dict[str, Observation]:
        by_key: dict[str, list[str]] = {}
        for ego_id in ego_ids:
            by_key.setdefault(key_for(ego_id), []).append(ego_id)
        observed: dict[str, Observation] = {}
        for key, ids in by_key.items():
            observed.update(await self._call(key, "observe_many", ids))
        return observed

    async def apply_control(self, ego_id: str, control: VehicleControl) -> None:
        await self._call(key_for(ego_id), "apply_control", ego_id, control)

    async def set_autopilot(self, ego_id: str, enabled: bool) -> VehicleControl:
        return await self._call(key_for(ego_id), "set_autopilot", ego_id, enabled)

    async def tick(self) -> float:
        """Tick each of the owner's groups once; the newest simulation time (s)."""
        if not self._groups:
            return await self._call(slot_key(0), "sim_time")
        return max([await self._call(owner_key(self._holder[g]), "tick", g) for g in list(self._groups)])

    async def dt(self) -> float:
        return await self._call(slot_key(0), "dt")

    async def release_all(self) -> int:
        """Give back every car of every World replica (the app's only session owner starting:
        any car there was a dead owner's); how many."""
        return sum([await self._call(slot_key(k), "remove_all") for k in range(self.replicas)])
