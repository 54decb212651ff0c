"""Carla world: the per-tick cost of an observation (boxes and culled map lines) with the
town's map extracted once, against extracting the map anew every tick (the baseline).

No Carla server runs here: the town is generated OpenDRIVE loaded into the real `carla.Map`
(a grid of 2x2-lane avenues with sidewalks, larger than Town10), the client is the tests'
stand-in, and the scene is recorded: 20 NPC vehicles driving along their lanes and 10 walkers,
replayed tick by tick. The stand-in's snapshot is Python, where Carla's is C++, so the numbers
are an upper bound for the world's own work.

    .venv/bin/python -m bench.bench_carla [--ticks 200] [--baseline-ticks 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import carla
from scenariogeneration import xodr

from dwm.world.carla_map import extract_map
from dwm.world.carla_world import CarlaWorld
from tests import carla_roads
from tests.carla_standin import StandInServer


def grid_town(avenues: int = 6, length: float = 1200.0, spacing: float = 200.0) -> str:
    """`avenues` east-west and as many north-south straight avenues, 2 lanes each way and
    sidewalks, `spacing` m apart (they cross without junctions: enough for timing)."""
    odr = xodr.OpenDrive("grid")
    road_id = 1
    for k in range(avenues):
        for x0, y0, hdg in ((0.0, k * spacing, 0.0), (k * spacing, 0.0, math.pi / 2)):
            plan = xodr.PlanView(x0, y0, hdg)
            plan.add_geometry(xodr.Line(length))
            section = xodr.LaneSection(0, xodr.standard_lane(rm=xodr.std_roadmark_solid_solid()))
            for side in (section.add_left_lane, section.add_right_lane):
                side(xodr.standard_lane(3.5, rm=xodr.std_roadmark_broken()))
                side(xodr.standard_lane(3.5, rm=xodr.std_roadmark_solid()))
                side(xodr.Lane(lane_type=xodr.LaneType.sidewalk, a=3.0))
            lanes = xodr.Lanes()
            lanes.add_lanesection(section)
            odr.add_road(xodr.Road(road_id, plan, lanes))
            road_id += 1
    odr.adjust_roads_and_lanes()
    return carla_roads._text(odr)


def replay(server: StandInServer, hero, tick: int) -> None:
    """The recorded scene at `tick`: the 20 NPC vehicles in the four lanes around the hero,
    from 60 m behind to 60 m ahead, 1.2 m further each tick; the 10 walkers on the sidewalks."""
    base = hero.transform
    yaw = math.radians(base.rotation.yaw)
    ahead, right = (math.cos(yaw), math.sin(yaw)), (-math.sin(yaw), math.cos(yaw))
    vehicles = [a for a in server.actors.values() if a.type_id.startswith("vehicle") and a is not hero]
    walkers = [a for a in server.actors.values() if a.type_id.startswith("walker")]
    for i, actor in enumerate(vehicles):
        along, across = -60.0 + 6.0 * i + 1.2 * tick % 6.0, (-5.25, -1.75, 1.75, 5.25)[i % 4]
        actor.transform = _at(base, ahead, right, along, across, base.rotation.yaw + (180.0 if across < 0 else 0.0))
    for i, actor in enumerate(walkers):
        along, across = -40.0 + 9.0 * i + 0.14 * tick, (-8.5, 8.5)[i % 2]
        actor.transform = _at(base, ahead, right, along, across, base.rotation.yaw)


def _at(base, ahead, right, along: float, across: float, yaw: float):
    x = base.location.x + along * ahead[0] + across * right[0]
    y = base.location.y + along * ahead[1] + across * right[1]
    return carla.Transform(carla.Location(x, y, 0.0), carla.Rotation(yaw=yaw))


def run(ticks: int, baseline_ticks: int) -> None:
    text = grid_town()
    server = StandInServer(text)
    carla.Client = server.client_class()  # the stand-in client, for this process only
    t0 = time.perf_counter()
    world = CarlaWorld(vehicles=20, walkers=10, seed=0)
    setup_s = time.perf_counter() - t0
    ego = world.add_ego()
    hero = server.role("hero")[0]
    town = server.map
    geometry_segments = len(world._geometry.kinds)

    def observe_ms(extract_each_tick: bool, count: int) -> tuple[list[float], int, int]:
        times, boxes, lines = [], 0, 0
        for k in range(count):
            replay(server, hero, k)
            world.tick()
            start = time.perf_counter()
            if extract_each_tick:
                world._geometry = extract_map(town, world.map_step)
            obs = world.observe(ego)
            times.append((time.perf_counter() - start) * 1e3)
            boxes, lines = len(obs.boxes), len(obs.map_lines)
        return times, boxes, lines

    once, boxes, lines = observe_ms(False, ticks)
    anew, _, _ = observe_ms(True, baseline_ticks)
    world.close()
    actors = len([a for a in server.calls if a[0] == "try_spawn_actor"])
    median_once, median_anew = statistics.median(once), statistics.median(anew)
    print(f"town: {geometry_segments} map segments; {actors} spawns (hero, 20 vehicles, 10 walkers and controllers); "
          f"world set-up incl. map extraction {setup_s:.2f} s")
    print(f"last observation: {boxes} boxes within 80 m, {lines} map segments within 100 m")
    print()
    print("| per tick | ticks | median ms | p95 ms | x faster |")
    print("|---|---|---|---|---|")
    print(f"| observation, map extracted anew (baseline) | {len(anew)} | {median_anew:.1f} | "
          f"{sorted(anew)[int(0.95 * (len(anew) - 1))]:.1f} | 1.0 |")
    print(f"| observation, map extracted once, culled (`CarlaWorld.observe`) | {len(once)} | {median_once:.2f} | "
          f"{sorted(once)[int(0.95 * (len(once) - 1))]:.2f} | {median_anew / median_once:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--baseline-ticks", type=int, default=3)
    args = parser.parse_args()
    run(args.ticks, args.baseline_ticks)


if __name__ == "__main__":
    main()
