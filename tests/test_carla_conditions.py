"""A Carla observation and an embedded-world observation of the same scene give the same
conditions: the Carla boundary converts frames, boxes and map lines exactly as the embedded
world lays them out."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

carla = pytest.importorskip("carla")
pytest.importorskip("scenariogeneration")

from dwm.conditions.builder import ConditionBuilder  # noqa: E402
from dwm.world.base import REAR_AXLE_BEHIND_CENTRE_M  # noqa: E402
from dwm.world.carla_world import CarlaWorld  # noqa: E402
from dwm.world.embedded import EmbeddedWorld  # noqa: E402
from tests import carla_roads  # noqa: E402
from tests.carla_standin import StandInServer  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
BLUEPRINT = {"car": "vehicle.audi.a2", "truck": "vehicle.carlamotors.carlacola"}


def to_carla(x: float, y: float, z: float, yaw: float):
    """Our world pose -> a Carla transform (left-handed: y and the yaw change sign)."""
    return carla.Location(x, -y, z), -math.degrees(yaw)


@pytest.fixture
def builder() -> ConditionBuilder:
    cfg = OmegaConf.create({"rig": OmegaConf.load(CONF / "rig" / "nusc_3views.yaml"),
                            "pipeline": OmegaConf.load(CONF / "pipeline" / "default.yaml"),
                            "world": OmegaConf.load(CONF / "world" / "carla.yaml")})
    return ConditionBuilder.from_config(cfg)


def test_carla_and_embedded_observations_of_one_scene_give_identical_conditions(monkeypatch, builder):
    embedded = EmbeddedWorld(map="highway", vehicles=12, seed=3)
    ego = embedded.add_ego()
    for _ in range(30):
        embedded.tick()
    seen = embedded.observe(ego)
    assert len(seen.boxes) >= 3 and {"car"} <= set(seen.boxes.categories)

    # The same scene on a Carla server: the highway as OpenDRIVE, sampled as the embedded
    # world samples straight roads (5 m), the ego and every observed vehicle at their poses.
    server = StandInServer(carla_roads.highway(length=1000.0))
    monkeypatch.setattr(carla, "Client", server.client_class())
    w = seen.weather
    world = CarlaWorld(vehicles=0, walkers=0, view_range=embedded.view_range, map_range=embedded.view_range,
                       map_step=5.0, environment=seen.environment,
                       weather={"sun_altitude_angle": w.sun_altitude_angle, "precipitation": w.precipitation,
                                "fog_density": w.fog_density, "cloudiness": w.cloudiness})
    carla_ego = world.add_ego()
    hero = server.role("hero")[0]
    yaw = math.atan2(seen.ego_pose[1, 0], seen.ego_pose[0, 0])
    centre = seen.ego_pose[:3, 3] + REAR_AXLE_BEHIND_CENTRE_M * seen.ego_pose[:3, 0]
    location, carla_yaw = to_carla(*centre, yaw)
    hero.transform = carla.Transform(location, carla.Rotation(yaw=carla_yaw))
    for c, size, box_yaw, category in zip(seen.boxes.centers, seen.boxes.sizes, seen.boxes.yaws, seen.boxes.categories):
        location, carla_yaw = to_carla(c[0], c[1], 0.0, box_yaw)
        server.spawn_other(BLUEPRINT[category], location, carla_yaw, extent=tuple(size / 2))
    world.tick()
    observed = world.observe(carla_ego)

    # The observations agree ...
    np.testing.assert_allclose(observed.ego_pose, seen.ego_pose, atol=1e-4)
    order = np.lexsort(observed.boxes.centers[:, :2].T), np.lexsort(seen.boxes.centers[:, :2].T)
    np.testing.assert_allclose(observed.boxes.centers[order[0]], seen.boxes.centers[order[1]], atol=1e-4)
    np.testing.assert_allclose(observed.boxes.sizes[order[0]], seen.boxes.sizes[order[1]], atol=1e-5)
    np.testing.assert_allclose(observed.boxes.yaws[order[0]], seen.boxes.yaws[order[1]], atol=1e-5)
    assert [observed.boxes.categories[i] for i in order[0]] == [seen.boxes.categories[i] for i in order[1]]
    assert len(observed.map_lines) == len(seen.map_lines)

    # ... and so do the conditions drawn from them: layouts, camera scalars and captions.
    from_carla, from_embedded = builder.build(observed), builder.build(seen)
    boxes_c, boxes_e = from_carla.box_images, from_embedded.box_images
    maps_c, maps_e = from_carla.map_images, from_embedded.map_images
    assert boxes_e.abs().sum() > 0 and maps_e.abs().sum() > 0  # the scene shows something
    assert (boxes_c == boxes_e).all() and (maps_c == maps_e).all()
    assert (from_carla.camera_params == from_embedded.camera_params).all()
    assert from_carla.captions == from_embedded.captions
    world.close()
