"""The embedded world's tick and one ego's observation: an OpenDRIVE town against the built-in
highway, in the same run, with the same number of cars.

The town is a synthetic grid of Town01's size (12 junctions on about 390 x 260 m, one lane each
way, as Town01), written with the test helpers and built by Carla's client; the highway is the
default map. Every world drives `--warm` ticks first, then the worlds take turns: `--repeats`
rounds of `--ticks` ticks, each tick followed by the ego's observation. The table gives the
median time per tick + observation and its ratio to the highway's.

    .venv/bin/python -m bench.bench_world [--cars 30] [--ticks 50] [--repeats 21]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dwm.world.embedded import EmbeddedWorld
from tests import carla_roads

TARGET_MS = 5.0  # the OpenDRIVE world's tick + observation


def town01_sized(folder: Path) -> Path:
    path = folder / "grid_town01_size.xodr"
    path.write_text(carla_roads.town_grid(columns=4, rows=3, spacing=130.0, lanes=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cars", type=int, default=30, help="traffic vehicles besides the ego")
    parser.add_argument("--ticks", type=int, default=50, help="ticks per timed round")
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per map (the maps take turns)")
    parser.add_argument("--warm", type=int, default=100, help="ticks before timing (traffic spreads out)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        town = town01_sized(Path(tmp))
        t0 = time.perf_counter()
        EmbeddedWorld(map=str(town), vehicles=0)
        build_s = time.perf_counter() - t0
        maps = {"highway (built-in)": "highway", "OpenDRIVE grid, Town01 size": str(town)}
        worlds = {}
        for label, name in maps.items():
            world = EmbeddedWorld(map=name, vehicles=args.cars, seed=0)
            ego = world.add_ego()
            world.set_autopilot(ego, True)
            for _ in range(args.warm):
                world.tick()
            worlds[label] = (world, ego)
        times: dict[str, list[float]] = {label: [] for label in maps}
        for _ in range(args.repeats):
            for label, (world, ego) in worlds.items():
                t0 = time.perf_counter()
                for _ in range(args.ticks):
                    world.tick()
                    world.observe(ego)
                times[label].append((time.perf_counter() - t0) / args.ticks * 1000.0)

    base = statistics.median(times["highway (built-in)"])
    print(f"tick + observation, {args.cars} cars + 1 ego on autopilot, {args.repeats} rounds of {args.ticks} ticks "
          f"after {args.warm}; the town's map built in {build_s:.2f} s")
    print()
    print("| map | lanes | vehicles | ms per tick + observation (median) | min | vs highway |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (world, _) in worlds.items():
        med = statistics.median(times[label])
        lanes = len(world._network.lanes_list())
        print(f"| {label} | {lanes} | {len(world._road.vehicles)} | {med:.2f} | {min(times[label]):.2f} | "
              f"{med / base:.2f}x |")
    town_ms = statistics.median(times["OpenDRIVE grid, Town01 size"])
    print()
    print(f"target: the OpenDRIVE world's tick + observation <= {TARGET_MS:.1f} ms: "
          f"{'met' if town_ms <= TARGET_MS else 'not met'} ({town_ms:.2f} ms)")


if __name__ == "__main__":
    main()
