"""An agent that keeps its lane from the layout: it finds the lane's boundaries (lane lines
green, road edges blue, the colours the model is conditioned on) in the front camera's hdmap
image, steers towards the middle between them, and holds a cruise speed.

    python examples/lane_keeping.py                          # in this process, 60 s, views generated
    python examples/lane_keeping.py --no-views               # the layout only: no model, fast
    python examples/lane_keeping.py --url http://127.0.0.1:8000   # a running Serve app

It prints how far the car went and how far it strayed from its lane's centre.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from dwm.envs import DrivingEnv


class LaneKeeper:
    """A policy: obs (DrivingEnv's, with the layout) -> action [throttle, steer, brake].

    front: the index of the front camera's view; cruise: m/s to hold."""

    GAIN, DAMPING = 1.2, 2.0  # steer per unit of the lane centre's offset in the image, and per its change

    def __init__(self, front: int, cruise: float = 12.0):
        self.front, self.cruise = front, cruise
        self._last_error: float | None = None

    def lane_centre_error(self, hdmap: np.ndarray) -> float | None:
        """Where the lane's middle is on the ground ahead (4 to 25 m here), -1 at the image's
        left edge to +1 at its right, 0 straight ahead; None when no boundary pair is seen.
        hdmap: (H, W, 3) uint8 of the front camera."""
        h, w, _ = hdmap.shape
        boundary = (hdmap[..., 1] > 127) | (hdmap[..., 2] > 127)  # (H, W) lane lines or road edges
        middles, middle = [], w / 2.0
        # From the bottom row up (near to far), each row's pair of boundaries around the middle
        # found in the row below: the lane is followed into a curve, not lost to one side.
        for row in range(h - 1, int(h * 0.58), -2):
            cols = np.flatnonzero(boundary[row])
            left, right = cols[cols < middle], cols[cols >= middle]
            if len(left) and len(right) and right.min() - left.max() > 4:
                middle = (left.max() + right.min()) / 2.0
                middles.append(middle)
        if not middles:
            return None
        return float(np.mean(middles) - w / 2) / (w / 2)

    def __call__(self, obs: dict) -> np.ndarray:
        speed = float(obs["ego"][0])
        error = self.lane_centre_error(obs["hdmap"][self.front])
        if error is None:  # nothing seen: hold the wheel straight
            steer, self._last_error = 0.0, None
        else:
            change = 0.0 if self._last_error is None else error - self._last_error
            steer = float(np.clip(self.GAIN * error + self.DAMPING * change, -1.0, 1.0))
            self._last_error = error
        gap = self.cruise - speed
        throttle = float(np.clip(0.3 * gap, 0.0, 1.0))
        brake = float(np.clip(-0.2 * gap, 0.0, 1.0)) if gap < -1.0 else 0.0
        return np.array([throttle, steer, brake], np.float32)


def drive(env: DrivingEnv, policy, seconds: float, seed: int = 0) -> dict:
    """Drive `seconds` of simulation time; returns distance (m), the largest |lane offset| (m),
    the steps and whether the episode ended off the lane."""
    obs, info = env.reset(seed=seed)
    distance, worst, steps, terminated = 0.0, 0.0, 0, False
    while steps * env.dt < seconds and not terminated:
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        distance += float(obs["ego"][0]) * env.dt
        worst = max(worst, abs(info["lane_offset"] or 0.0))
        steps += 1
    return {"distance_m": distance, "max_lane_offset_m": worst, "steps": steps, "off_lane": terminated}


def front_view(env: DrivingEnv) -> int:
    names = env.camera_names
    return names.index("CAM_FRONT") if "CAM_FRONT" in names else len(names) // 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running Serve app; leave out to drive in this process")
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated seconds to drive (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cruise", type=float, default=12.0, help="m/s (default %(default)s)")
    parser.add_argument("--no-views", action="store_true", help="in this process: the layout only, no model")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (the server's, with --url)")
    args = parser.parse_args(argv)
    env = DrivingEnv(args.url, args.overrides, views=not args.no_views)
    try:
        result = drive(env, LaneKeeper(front_view(env), args.cruise), args.seconds, args.seed)
    finally:
        env.close()
    print(f"{result['steps']} steps, {result['distance_m']:.0f} m, largest lane offset "
          f"{result['max_lane_offset_m']:.2f} m{', left its lane' if result['off_lane'] else ''}")
    return 1 if result["off_lane"] else 0


if __name__ == "__main__":
    sys.exit(main())
