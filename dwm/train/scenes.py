"""Training windows rendered on the fly from the embedded world.

Each window is T consecutive frames of one ego's drive, every frame with its V camera pictures
(`dwm.world.camera`, the target) and the conditions the model is given for it (layouts,
camera scalars, captions: `dwm.conditions`, exactly as at inference). The drives vary: a
random map, seed, traffic and weather per world, the ego on autopilot or driven by a random
driver (smooth throttle and steering). Several worlds are drawn from in turn, and each is
replaced after a while, so consecutive windows come from different scenes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dwm.conditions.builder import ConditionBuilder
from dwm.world.base import VehicleControl, Weather
from dwm.world.embedded import EmbeddedWorld


@dataclass
class Window:
    """T frames of V views.

    images (T, V, 3, H, W) float32 in [-1, 1] (the VAE's range), the world's pictures;
    layout (T, V, 6, H, W) float32 in [0, 1]; camera_params (T, V, 11) float32; captions:
    T lists of V strings.
    """

    images: torch.Tensor
    layout: torch.Tensor
    camera_params: torch.Tensor
    captions: list[list[str]]


def random_weather(rng: np.random.Generator) -> Weather:
    """Mostly daylight, some dusk and night, some rain and fog."""
    return Weather(
        sun_altitude_angle=float(rng.choice([rng.uniform(15, 80), rng.uniform(-15, 15)], p=[0.75, 0.25])),
        precipitation=float(rng.uniform(20, 90)) if rng.random() < 0.2 else 0.0,
        fog_density=float(rng.uniform(10, 60)) if rng.random() < 0.15 else 0.0,
        cloudiness=float(rng.uniform(0, 100)),
    )


class _Drive:
    """One world and its ego, driven for a number of frames."""

    def __init__(self, scenes: DictConfig, rig: Mapping, dt: float, rng: np.random.Generator):
        self.world = EmbeddedWorld(
            map=str(rng.choice(list(scenes.maps))), vehicles=int(rng.integers(*scenes.vehicles, endpoint=True)),
            dt=dt, seed=int(rng.integers(2**31)), weather=random_weather(rng), attach_cameras=True, rig=rig,
        )
        self.ego = self.world.add_ego()
        self.autopilot = bool(rng.random() < scenes.autopilot_share)
        self.world.set_autopilot(self.ego, self.autopilot)
        self.frames_left = int(scenes.frames_per_world)
        self.rng = rng
        self.throttle, self.steer = 0.5, 0.0
        for _ in range(int(rng.integers(0, 30))):  # traffic settles, the ego gets going
            self.tick()

    def tick(self) -> None:
        if not self.autopilot:  # a random driver: smooth changes, mostly forward
            self.throttle = float(np.clip(self.throttle + self.rng.normal(0, 0.1), 0.0, 1.0))
            self.steer = float(np.clip(0.9 * self.steer + self.rng.normal(0, 0.05), -0.5, 0.5))
            self.world.apply_control(self.ego, VehicleControl(throttle=self.throttle, steer=self.steer))
        self.world.tick()
        self.frames_left -= 1


class SceneWindows:
    """An endless source of training `Window`s from `cfg.train.scenes`, with the rig, the
    world's tick and the model resolution of `cfg`. seed: which drives are drawn (a
    held-out seed gives scenes never used in training)."""

    def __init__(self, cfg: DictConfig, seed: int):
        self.scenes = cfg.train.scenes
        self.rig = OmegaConf.to_container(cfg.rig, resolve=True)
        self.dt = float(cfg.world.dt)
        self.window = int(cfg.pipeline.window)
        self.builder = ConditionBuilder.from_config(cfg)
        self.rng = np.random.default_rng(seed)
        self.drives: list[_Drive] = []
        self.turn = 0

    def __iter__(self):
        return self

    def __next__(self) -> Window:
        count = int(self.scenes.worlds)
        i = self.turn % count
        self.turn += 1
        if i >= len(self.drives):
            self.drives.append(_Drive(self.scenes, self.rig, self.dt, self.rng))
        elif self.drives[i].frames_left < self.window:
            self.drives[i].world.close()
            self.drives[i] = _Drive(self.scenes, self.rig, self.dt, self.rng)
        drive = self.drives[i]
        frames = []
        for _ in range(self.window):
            drive.tick()
            frames.append(self.builder.build(drive.world.observe(drive.ego)))
        for _ in range(int(self.scenes.gap_frames)):  # windows of one drive overlap less
            drive.tick()
        pictures = torch.from_numpy(np.stack([f.camera_images for f in frames]))  # (T, V, H, W, 3) uint8
        return Window(
            images=pictures.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0,
            layout=torch.stack([f.layout for f in frames]),
            camera_params=torch.stack([f.camera_params for f in frames]),
            captions=[f.captions for f in frames],
        )
