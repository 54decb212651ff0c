"""The Carla world's session, egos, traffic and failure handling, against a stand-in for
`carla.Client` (no server runs here); values, maps and controls are the real `carla` package."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

carla = pytest.importorskip("carla")
pytest.importorskip("scenariogeneration")

from omegaconf import OmegaConf  # noqa: E402

from dwm.config import ConfigError, compose, instantiate  # noqa: E402
from dwm.world.base import UnknownEgoError, VehicleControl, WorldUnavailableError  # noqa: E402
from dwm.world.carla_client import import_carla  # noqa: E402
from dwm.world.carla_world import CarlaWorld  # noqa: E402
from tests import carla_roads  # noqa: E402
from tests.carla_standin import StandInServer  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def server(monkeypatch) -> StandInServer:
    server = StandInServer(carla_roads.straight_road(length=400.0, sidewalks=True))
    monkeypatch.setattr(carla, "Client", server.client_class())
    return server


def make_world(**overrides) -> CarlaWorld:
    """From conf/world/carla.yaml, as `world=carla` builds it."""
    cfg = compose(["world=carla", *(f"world.{k}={v}" for k, v in overrides.items())])
    return instantiate(cfg, "world")



# ---------------------------------------------------------------- session


def test_takes_synchronous_mode_and_gives_the_world_back_at_close(server):
    world = make_world(vehicles=3, walkers=2)
    assert server.settings.synchronous_mode and server.settings.fixed_delta_seconds == pytest.approx(0.1)
    assert server.tm_sync == {8010: True}
    assert ("set_timeout", 10.0) in server.calls
    world.add_ego()
    world.tick()
    assert len(server.actors) == 1 + 3 + 2 * 2  # hero, vehicles, walkers and their controllers
    world.close()
    assert not server.settings.synchronous_mode and server.settings.fixed_delta_seconds is None
    assert server.tm_sync == {8010: False}
    assert server.actors == {}  # everything we spawned is gone
    world.close()  # twice is fine


def test_is_cleaned_up_at_interpreter_exit(server, monkeypatch):
    handlers = []
    monkeypatch.setattr("atexit.register", lambda fn, *args: handlers.append((fn, args)))
    world = make_world(vehicles=2, walkers=0)
    world.add_ego()
    for fn, args in handlers:  # what Python runs at exit, after Ctrl-C or an exception
        fn(*args)
    assert server.actors == {} and not server.settings.synchronous_mode


def test_one_hero_is_hero_and_several_are_named_by_session(server):
    world = make_world(vehicles=0, walkers=0)
    first = world.add_ego()
    assert [a.id for a in server.role("hero")] == [world._heroes[first].actor.id]
    second = world.add_ego("alice")
    assert len(server.role("hero")) == 1  # the reference's keyboard client still finds one
    assert len(server.role("hero-alice")) == 1
    assert world.egos() == [first, "alice"]
    world.remove_ego(first)
    assert server.role("hero") == [] and world.egos() == [second]
    with pytest.raises(UnknownEgoError, match="alice"):
        world.observe(first)
    world.close()


def test_npc_vehicles_drive_on_the_traffic_manager_and_walkers_retarget_on_arrival(server):
    world = make_world(vehicles=4, walkers=2)
    npcs = [a for a in server.actors.values() if a.type_id.startswith("vehicle")]
    assert len(npcs) == 4 and all(a.autopilot for a in npcs)
    assert all(("set_autopilot", a.id, True, 8010) in server.calls for a in npcs)
    world.tick()
    controllers = [a for a in server.actors.values() if a.type_id == "controller.ai.walker"]
    assert len(controllers) == 2 and all(c.started and c.target is not None for c in controllers)
    first_targets = {c.id: c.target for c in controllers}
    for _ in range(200):  # walkers walk 1.5 m a tick in the stand-in: they arrive, then go on
        world.tick()
    goes = [c for c in server.calls if c[0] == "go_to_location"]
    assert len(goes) > 2 * 2
    assert any(c.target is not first_targets[c.id] for c in controllers)
    world.close()


def test_controls_are_carla_vehicle_controls_and_autopilot_hands_back_its_last(server):
    world = make_world(vehicles=0, walkers=0)
    ego = world.add_ego()
    hero = server.role("hero")[0]
    world.apply_control(ego, VehicleControl(throttle=0.8, steer=-0.8, reverse=True))
    sent = hero.control
    assert isinstance(sent, carla.VehicleControl)
    assert (sent.throttle, sent.steer, sent.reverse) == (pytest.approx(0.8), pytest.approx(-0.8), True)
    world.set_autopilot(ego, True)
    assert hero.autopilot and ("set_autopilot", hero.id, True, 8010) in server.calls
    hero.control = carla.VehicleControl(throttle=0.35, steer=0.1)  # what the traffic manager drives
    assert world.observe(ego).control.throttle == pytest.approx(0.35)
    world.set_autopilot(ego, False)
    assert not hero.autopilot
    assert world.observe(ego).control.throttle == pytest.approx(0.35)  # stays applied, as in Carla
    world.close()


# ---------------------------------------------------------------- observations


def test_observation_boxes_actors_near_the_ego_in_our_frame(server):
    world = make_world(vehicles=0, walkers=0)
    ego = world.add_ego()
    hero = server.role("hero")[0]
    # The ego stands at Carla (x0, y0) facing Carla's +x; put others around it, after the start.
    x0, y0 = hero.transform.location.x, hero.transform.location.y
    truck = server.spawn_other("vehicle.carlamotors.carlacola", carla.Location(x0 + 20, y0 + 3.5, 0), yaw=90)
    server.spawn_other("walker.pedestrian.0001", carla.Location(x0 + 10, y0 - 5, 0))
    server.spawn_other("vehicle.bh.crossbike", carla.Location(x0 + 200, y0, 0))  # beyond 80 m
    server.spawn_other("sensor.camera.rgb", carla.Location(x0 + 5, y0, 0))  # not boxed
    world.tick()
    obs = world.observe(ego)
    assert sorted(obs.boxes.categories) == ["pedestrian", "truck"]
    i = obs.boxes.categories.index("truck")
    # Ours: y flips sign (Carla's +3.5 right is our -3.5), a Carla yaw of +90 (clockwise) is -pi/2.
    np.testing.assert_allclose(obs.boxes.centers[i], [x0 + 20, -(y0 + 3.5), 1.25], atol=1e-4)
    np.testing.assert_allclose(obs.boxes.sizes[i], [5.2, 2.6, 2.5], atol=1e-5)
    assert obs.boxes.yaws[i] == pytest.approx(-math.pi / 2)
    # The ego pose is the rear axle, 1.5 m behind the Carla vehicle's centre, on our right-handed ground.
    np.testing.assert_allclose(obs.ego_pose[:3, 3], [x0 - 1.5, -y0, hero.transform.location.z], atol=1e-4)
    truck.destroy()
    world.tick()
    assert world.observe(ego).boxes.categories == ["pedestrian"]
    world.close()


def test_observation_map_lines_are_culled_around_the_ego(server):
    world = make_world(vehicles=0, walkers=0, map_range=30.0)
    ego = world.add_ego()
    obs = world.observe(ego)
    rear = obs.ego_pose[:2, 3]
    near = np.minimum(np.linalg.norm(obs.map_lines.starts[:, :2] - rear, axis=1),
                      np.linalg.norm(obs.map_lines.ends[:, :2] - rear, axis=1))
    assert len(obs.map_lines) > 0 and near.max() <= 30.0
    assert set(np.unique(obs.map_lines.kinds)) == {0, 1}  # lane lines and road edges on this road
    world.close()


def test_weather_presets_and_values_become_caption_weather(server):
    world = make_world(vehicles=0, walkers=0, weather="HardRainSunset")
    ego = world.add_ego()
    obs = world.observe(ego)
    assert obs.weather.precipitation > 30  # "rainy"
    world.close()
    world = make_world(vehicles=0, walkers=0, weather="{sun_altitude_angle:-30,cloudiness:80}")
    obs = world.observe(world.add_ego())
    assert obs.weather.sun_altitude_angle == -30 and obs.weather.cloudiness == 80
    world.close()


def test_real_cameras_pass_their_pictures_through(server):
    world = make_world(vehicles=0, walkers=0, attach_cameras=True)
    ego = world.add_ego()
    cameras = [a for a in server.actors.values() if a.type_id == "sensor.camera.rgb"]
    assert sorted(c.attributes["role_name"] for c in cameras) == ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT"]
    world.tick()
    images = world.observe(ego).camera_images
    assert set(images) == {"CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT"}
    assert images["CAM_FRONT"].shape == (360, 640, 3)
    assert tuple(images["CAM_FRONT"][0, 0]) == (30, 20, 10)  # BGRA bytes -> RGB
    world.close()
    assert not any(a.type_id == "sensor.camera.rgb" for a in server.actors.values())


# ---------------------------------------------------------------- failures


def test_a_dropped_server_is_a_clear_session_error_then_reconnected(server):
    world = make_world(vehicles=2, walkers=0, **{"reconnect.first_delay_s": 0.0, "reconnect.max_delay_s": 0.0})
    ego = world.add_ego()
    world.apply_control(ego, VehicleControl(throttle=0.5))
    server.up = False
    with pytest.raises(WorldUnavailableError, match="lost the Carla server at 127.0.0.1:2000"):
        world.tick()
    with pytest.raises(WorldUnavailableError, match="attempt 1 failed"):
        world.observe(ego)
    server.restart()  # it comes back, empty and asynchronous
    server.up = True
    world.tick()
    assert server.settings.synchronous_mode and server.tm_sync == {8010: True}
    assert world.egos() == [ego]
    hero = server.role("hero")
    assert len(hero) == 1 and hero[0].control.throttle == pytest.approx(0.5)  # same ego, same control
    assert len([a for a in server.actors.values() if a.type_id.startswith("vehicle")]) == 3
    assert world.observe(ego).ego_id == ego
    world.close()
    assert server.actors == {}


def test_the_session_error_crosses_process_boundaries_intact():
    import pickle

    err = pickle.loads(pickle.dumps(WorldUnavailableError("lost the Carla server at h:2000", retry_in=4.0)))
    assert isinstance(err, WorldUnavailableError) and str(err) == "lost the Carla server at h:2000"
    assert err.retry_in == 4.0


def test_after_a_dropped_connection_to_a_live_server_nothing_is_left_twice(server):
    world = make_world(vehicles=3, walkers=1, **{"reconnect.first_delay_s": 0.0, "reconnect.max_delay_s": 0.0})
    ego = world.add_ego()
    world.add_ego("bob")
    before = len(server.actors)
    server.up = False
    with pytest.raises(WorldUnavailableError):
        world.tick()
    world.remove_ego("bob")  # the session ends while the server is away
    server.up = True  # the same server, its actors still there
    world.tick()
    assert len(server.actors) == before - 1
    assert len(server.role("hero")) == 1 and server.role("hero-bob") == []
    assert world.egos() == [ego]
    world.close()
    assert server.actors == {}


def test_reconnection_waits_between_attempts(server):
    world = make_world(vehicles=0, walkers=0, **{"reconnect.first_delay_s": 60.0, "reconnect.max_delay_s": 120.0})
    world.add_ego()
    server.up = False
    with pytest.raises(WorldUnavailableError) as lost:
        world.tick()
    assert lost.value.retry_in == pytest.approx(60.0, abs=1.0)
    clients = server.names().count("Client")
    server.up = True
    with pytest.raises(WorldUnavailableError, match="next reconnection attempt in"):
        world.tick()  # too early to try again
    assert server.names().count("Client") == clients


def test_no_server_at_start_names_the_keys(server):
    server.up = False
    with pytest.raises(ConfigError, match=r"world.host=127.0.0.1 world.port=2000.*CarlaUE4.sh"):
        make_world()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"port": "abc"}, r"world.port='abc' must be an integer TCP port"),
        ({"town": "Town99"}, r"world.town='Town99' is not a map .* available: Town01, Town10HD_Opt"),
        ({"weather": "Sunny"}, r"world.weather='Sunny' is not a Carla weather preset; allowed: .*ClearNoon"),
        ({"vehicles": -1}, r"world.vehicles=-1 must be an integer >= 0"),
        ({"hero_blueprint": "vehicle.nope"}, r"world.hero_blueprint='vehicle.nope'"),
    ],
)
def test_bad_config_says_what_is_allowed(server, override, message):
    with pytest.raises(ConfigError, match=message):
        make_world(**override)


def test_town_is_loaded_when_asked(server):
    world = make_world(vehicles=0, walkers=0, town="Town01")
    assert ("load_world", "Town01") in server.calls
    world.close()


def test_without_the_carla_package_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[carla\].*3\.10 to 3\.12"):
        import_carla()


def test_carla_check_drives_draws_and_cleans_up(server, tmp_path, capsys):
    from dwm.carla_check import main

    out = tmp_path / "check.png"
    assert main(["--host", "127.0.0.1", "--port", "2000", "--frames", "5", "--out", str(out), "--cameras",
                 "world.vehicles=3", "world.walkers=1"]) == 0
    import cv2

    picture = cv2.imread(str(out))
    assert picture.shape == (2 * 360, 3 * 640, 3) and picture[:360].any()  # layouts over the camera pictures
    assert server.actors == {} and not server.settings.synchronous_mode
    assert "cleaned up" in capsys.readouterr().out
    server.up = False
    assert main(["--out", str(out)]) == 1
    assert "no Carla server answered" in capsys.readouterr().err


def test_config_file_lists_the_documented_keys():
    node = OmegaConf.load(CONF / "world" / "carla.yaml")
    for key in ("host", "port", "timeout", "town", "fixed_delta_seconds", "tm_port", "vehicles", "walkers", "seed",
                "view_range", "map_range", "weather", "attach_cameras", "reconnect"):
        assert key in node
    assert node.town is None and node.fixed_delta_seconds == 0.1 and node.view_range == 80.0
    assert node.attach_cameras is False
