"""Conditions of egos driving on autopilot in the embedded world, packed as they cross between
processes: the input the queue tests feed to queues, stages and pools alike."""

from __future__ import annotations

from dwm.conditions.builder import ConditionBuilder
from dwm.conditions.packed import PackedConditions
from dwm.config import instantiate


def packed_drive(cfg, frames: int, egos: int = 1) -> list[list[PackedConditions]]:
    """out[k][i]: ego k's conditions of tick i, for `frames` ticks of the world of `cfg`."""
    world = instantiate(cfg, "world")
    builder = ConditionBuilder.from_config(cfg)
    ids = [world.add_ego() for _ in range(egos)]
    for ego in ids:
        world.set_autopilot(ego, True)
    out: list[list[PackedConditions]] = [[] for _ in ids]
    for _ in range(frames):
        for k, ego in enumerate(ids):
            out[k].append(PackedConditions.pack(builder.build(world.observe(ego))))
        world.tick()
    world.close()
    return out
