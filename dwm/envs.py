"""A Gymnasium environment on a driving session (`dwm.client.session`): an agent drives the
ego car and sees the generated views, optionally the layout and the ego's state.

    env = DrivingEnv(overrides=["world.map=roundabout"])            # in this process, no Ray
    env = DrivingEnv(url="http://127.0.0.1:8000")                   # a running Serve app
    obs, info = env.reset(seed=3)                                   # a new session
    obs, reward, terminated, truncated, info = env.step([0.4, -0.1, 0.0])   # throttle, steer, brake

Observation (a dict):
- "views": (V, h, w, 3) uint8, the generated views (h, w = pipeline.output_size), unless
  `views=False`;
- "hdmap", "boxes": (V, H, W, 3) uint8, the layout of the world now (H, W = pipeline.resolution),
  when `layout=True`;
- "ego": (2,) float32, [speed m/s, lane offset m (positive left; 0 where unknown)], when `layout=True`.

Reward: metres driven along the road this step (speed * dt), minus the lane offset in metres *
dt; `terminated` once the ego is farther than `off_lane_m` from its lane's centre. Shapes come
from the config (`overrides`), which over HTTP must be the server's.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from dwm.client.session import Frame, Session
from dwm.config import compose, condition_fps
from dwm.video.compose import compose_strip

EGO_BOUND = 1000.0  # m/s and m: wider than any speed or lane offset a world gives


class DrivingEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, url: str | None = None, overrides: Sequence[str] = (), *, views: bool = True,
                 layout: bool = True, autopilot: bool = False, off_lane_m: float = 3.0,
                 render_mode: str | None = None):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode={render_mode!r}; allowed: None, 'rgb_array'")
        if url is not None and not views:
            raise ValueError("views=False runs without the model, in this process only: leave url out")
        if not views and not layout:
            raise ValueError("views=False and layout=False leave nothing to observe")
        self.url, self.overrides = url, list(overrides)
        self.views, self.layout, self.autopilot = views, layout, autopilot
        self.off_lane_m = float(off_lane_m)
        self.render_mode = render_mode
        cfg = compose(self.overrides)
        self.dt = 1.0 / condition_fps(cfg)
        self.camera_names = [str(c.name) for c in cfg.rig.cameras]
        num_views = len(self.camera_names)
        h, w = cfg.pipeline.output_size
        height, width = cfg.pipeline.resolution
        spaces = {}
        if views:
            spaces["views"] = gym.spaces.Box(0, 255, (num_views, h, w, 3), np.uint8)
        if layout:
            spaces["hdmap"] = gym.spaces.Box(0, 255, (num_views, height, width, 3), np.uint8)
            spaces["boxes"] = gym.spaces.Box(0, 255, (num_views, height, width, 3), np.uint8)
            spaces["ego"] = gym.spaces.Box(-EGO_BOUND, EGO_BOUND, (2,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        # throttle [0, 1], steer [-1, 1] (negative left, as Carla), brake [0, 1]
        self.action_space = gym.spaces.Box(np.array([0.0, -1.0, 0.0], np.float32), np.ones(3, np.float32))
        self.session: Session | None = None
        self.frame: Frame | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.close()
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        if self.url is None:
            self.session = Session.in_process(self.overrides, seed=seed, autopilot=self.autopilot,
                                              generate=self.views, layout=self.layout)
        else:
            self.session = Session.over_http(self.url, {"seed": seed, "autopilot": self.autopilot}, layout=self.layout)
        self.frame = self.session.next_frame()
        return self._observation(), self._info()

    def step(self, action):
        if self.session is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64).reshape(3)
        if not np.isfinite(action).all():
            raise ValueError(f"action {action.tolist()} must be finite: [throttle, steer, brake]")
        low, high = self.action_space.low, self.action_space.high
        throttle, steer, brake = np.clip(action, low, high).tolist()
        self.session.control(throttle=throttle, steer=steer, brake=brake)
        self.frame = self.session.next_frame()
        ego = self.frame.ego
        reward, terminated = 0.0, False
        if ego is not None:
            offset = abs(ego.lane_offset or 0.0)
            reward = (ego.speed - offset) * self.dt
            terminated = offset > self.off_lane_m
        return self._observation(), reward, terminated, False, self._info()

    def render(self):
        if self.render_mode != "rgb_array" or self.frame is None:
            return None
        if self.frame.views is not None:
            return compose_strip(self.frame.views)
        return compose_strip(np.maximum(self.frame.hdmap, self.frame.boxes))

    def close(self):
        if self.session is not None:
            self.session.close()
            self.session, self.frame = None, None

    def _observation(self) -> dict:
        f, obs = self.frame, {}
        if self.views:
            obs["views"] = f.views
        if self.layout:
            obs["hdmap"], obs["boxes"] = f.hdmap, f.boxes
            obs["ego"] = np.array([f.ego.speed, f.ego.lane_offset or 0.0], np.float32)
        return obs

    def _info(self) -> dict:
        f = self.frame
        info = {"frame": f.index, "sim_time": f.sim_time, "control_seq": f.control_seq}
        if f.ego is not None:
            info["lane_offset"] = f.ego.lane_offset
            info["now"] = f.ego.sim_time
        return info
