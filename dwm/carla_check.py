"""The first thing to run on a new Carla machine: connect, spawn a hero, tick, draw, clean up.

    python -m dwm.carla_check --host H --port P [--frames 50] [--out carla_check.png]
                                    [--cameras] [key=value ...]

Connects to the server as `world=carla` does (synchronous mode, traffic manager), spawns a
hero on autopilot and the configured traffic, ticks `--frames` frames, draws the last frame's
conditions (box layout over map layout, one column per rig camera; with --cameras the real
Carla pictures below) into an image file, then destroys everything and gives the server its
settings back. Extra `key=value` arguments are config overrides (e.g. world.town=Town10HD_Opt).
"""

from __future__ import annotations

import argparse
import sys
import time

import cv2
import numpy as np

from dwm.conditions.builder import ConditionBuilder
from dwm.config import ConfigError, compose, instantiate
from dwm.world.base import WorldUnavailableError


def check(host: str, port: int, frames: int, out: str, cameras: bool, overrides: list[str]) -> str:
    cfg = compose(["world=carla", f"world.host={host}", f"world.port={port}",
                   f"world.attach_cameras={str(cameras).lower()}", *overrides])
    started = time.monotonic()
    world = instantiate(cfg, "world")
    try:
        print(f"connected to Carla {world._conn.server_version} at {host}:{port}, map "
              f"{world._conn.world.get_map().name}: {len(world._geometry.kinds)} map segments "
              f"({time.monotonic() - started:.1f} s)")
        ego = world.add_ego()
        world.set_autopilot(ego, True)
        tick_started = time.monotonic()
        for _ in range(frames):
            world.tick()
        per_tick = (time.monotonic() - tick_started) / max(frames, 1)
        obs = world.observe(ego)
        print(f"{frames} ticks, {per_tick * 1e3:.1f} ms each; sim time {obs.sim_time:.1f} s; ego speed "
              f"{obs.ego_speed:.1f} m/s; {len(obs.boxes)} boxes ({', '.join(sorted(set(obs.boxes.categories))) or 'none'}), "
              f"{len(obs.map_lines)} map segments near the ego")
        layout = ConditionBuilder.from_config(cfg).render(obs)
        rows = [np.maximum(layout.boxes, layout.maps)]  # (V, H, W, 3) RGB
        if obs.camera_images:
            rows.append(np.stack([obs.camera_images[cam.name] for cam in cfg.rig.cameras]))
        picture = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
        if not cv2.imwrite(out, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {out}")
    finally:
        world.close()
    print(f"cleaned up (hero, traffic destroyed; world settings restored); conditions drawn into {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a Carla server for world=carla.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--out", default="carla_check.png")
    parser.add_argument("--cameras", action="store_true", help="attach real Carla RGB cameras and draw their pictures")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    try:
        check(args.host, args.port, args.frames, args.out, args.cameras, args.overrides)
    except (ConfigError, WorldUnavailableError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
