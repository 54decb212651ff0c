"""Collisions in the embedded world: crashed vehicles are held still, then released and pulled
apart.

highway-env marks both vehicles of a collision crashed and brings them to a stop, ignoring
their controls meanwhile. One second after standing still a vehicle is released and drives
(or can be driven) away; traffic still entangled with it is cleared away (it re-enters
elsewhere), and an ego entangled with another ego is moved back out of it.
"""

from __future__ import annotations

from highway_env import utils
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.embedded_traffic import STOPPED_SPEED, EmbeddedTraffic

CRASH_HOLD_S = 1.0  # a crashed vehicle is released after standing still this long


def overlap(a: Vehicle, b: Vehicle) -> bool:
    """The footprints of `a` and `b` intersect."""
    return utils.rotated_rectangles_intersect(
        (a.position, a.LENGTH, a.WIDTH, a.heading), (b.position, b.LENGTH, b.WIDTH, b.heading)
    )


class CrashRelease:
    """How long each crashed vehicle has stood still (s), and its release.

    Keyed by the vehicles themselves (identity): an id() may be reused by a new vehicle.
    """

    def __init__(self, dt: float):
        self.dt = dt  # s per tick
        self._held: dict[Vehicle, float] = {}

    def moved(self, old: Vehicle, new: Vehicle) -> None:
        """`new` took the place of `old` on the road (an ego switching autopilot, or put back):
        it keeps the time `old` has stood still."""
        held = self._held.pop(old, None)
        if held is not None:
            self._held[new] = held

    def release(self, vehicles: list[Vehicle], traffic: EmbeddedTraffic) -> None:
        """After a tick: count the standing time of the crashed vehicles on the road
        (`vehicles`, in stepping order) and release those held long enough."""
        on_road = set(map(id, vehicles))
        # Vehicles taken off the road since the last tick are forgotten.
        self._held = {v: s for v, s in self._held.items() if id(v) in on_road}
        for v in list(vehicles):
            if not v.crashed or v not in vehicles:
                continue
            if abs(v.speed) >= STOPPED_SPEED:
                self._held.pop(v, None)
                continue
            held = self._held.get(v, 0.0) + self.dt
            if held < CRASH_HOLD_S - 1e-9:
                self._held[v] = held
                continue
            v.crashed = False
            self._held.pop(v, None)
            self._pull_apart(v, vehicles, traffic)

    @staticmethod
    def _pull_apart(v: Vehicle, vehicles: list[Vehicle], traffic: EmbeddedTraffic) -> None:
        for other in [o for o in vehicles if o is not v and overlap(v, o)]:
            if traffic.holds(other):
                traffic.recycle(other)
            elif traffic.holds(v):
                traffic.recycle(v)
                break
            else:
                v.position -= (v.LENGTH + other.LENGTH) / 2 * v.direction
