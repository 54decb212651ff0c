"""The World actor's two modes (`serve.world.shared`): one world for every session's ego, or
a world of its own per session. The actor's class runs here in-process (its methods are plain
Python; Serve only calls them), on the embedded world.
"""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from deployments.world import WorldActor
from dwm.config import ConfigError, compose
from dwm.world.base import UnknownEgoError, VehicleControl

import deployments


def actor(shared: bool) -> WorldActor:
    cfg = compose({"world.vehicles": "8", "serve.world.shared": str(shared).lower()})
    return WorldActor.func_or_class(OmegaConf.to_container(cfg, resolve=True))


def test_shared_world_holds_every_session_and_they_see_each_other():
    world = actor(shared=True)
    a, b = world.add_ego(), world.add_ego()
    assert world.worlds() == 1 and sorted(world.egos()) == sorted([a, b])
    obs = world.observe_many([a, b])
    # Two egos in one world start at different places.
    assert not np.allclose(obs[a].ego_pose, obs[b].ego_pose)
    world.remove_ego(a)
    assert world.egos() == [b] and world.worlds() == 1


def test_a_world_per_session_gives_each_driver_the_same_scenario_alone():
    world = actor(shared=False)
    a, b = world.add_ego(), world.add_ego()
    assert a != b and world.worlds() == 2 and sorted(world.egos()) == sorted([a, b])
    start = world.observe_many([a, b])
    # Same config and seed: both drivers start at the same place in the same traffic.
    np.testing.assert_allclose(start[a].ego_pose, start[b].ego_pose)
    np.testing.assert_allclose(start[a].boxes.centers, start[b].boxes.centers)

    # Driving one changes nothing in the other's world: b coasts as a lone ego would.
    lone = actor(shared=False)
    c = lone.add_ego()
    world.apply_control(a, VehicleControl(throttle=1.0, steer=-0.5))
    for _ in range(20):
        world.tick()
        lone.tick()
    after = world.observe_many([a, b])
    alone = lone.observe_many([c])[c]
    np.testing.assert_allclose(after[b].ego_pose, alone.ego_pose)
    np.testing.assert_allclose(after[b].boxes.centers, alone.boxes.centers)
    assert not np.allclose(after[a].ego_pose, after[b].ego_pose)

    # Ending a session ends its world; the other keeps its own.
    world.remove_ego(a)
    assert world.worlds() == 1 and world.egos() == [b]
    with pytest.raises(UnknownEgoError, match=f"unknown ego '{a}'"):
        world.observe_many([a])


def test_groups_of_sessions_have_worlds_and_ticks_of_their_own():
    world = actor(shared=True)
    a, b, c = world.add_ego("owner1"), world.add_ego("owner1"), world.add_ego("owner2")
    assert world.worlds() == 2 and sorted(world.egos("owner1")) == sorted([a, b]) and world.egos("owner2") == [c]
    assert len({a, b, c}) == 3 and all(e.startswith("local-") for e in (a, b, c))  # named after this replica
    before = world.observe_many([a, b, c])
    assert before[a].sim_time == before[c].sim_time
    world.tick("owner1")
    world.tick("owner1")
    after = world.observe_many([a, b, c])
    # owner1's world ticked twice, owner2's not at all; a and b share theirs.
    assert after[a].sim_time == after[b].sim_time == pytest.approx(before[a].sim_time + 2 * world.dt())
    assert after[c].sim_time == before[c].sim_time
    assert world.record_routing_stats() == {"load": 3}
    assert world.remove_all() == 3 and world.egos() == [] and world.worlds() == 0


def test_cars_nobody_asks_about_are_given_back_when_their_lease_runs_out(monkeypatch):
    import deployments.world as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    cfg = compose({"world.vehicles": "4", "serve.lease_s": "60"})
    world = WorldActor.func_or_class(OmegaConf.to_container(cfg, resolve=True))
    kept, orphan = world.add_ego("alive"), world.add_ego("dead")
    for _ in range(3):  # the live owner's rounds; the dead one asks nothing
        now[0] += 25.0
        world.observe_many([kept])
        world.tick("alive")
    assert world.egos() == [kept]
    with pytest.raises(UnknownEgoError):
        world.observe_many([orphan])


def test_world_mode_must_be_a_bool():
    with pytest.raises(ConfigError, match="serve.world.shared"):
        deployments.app({"serve.world.shared": "sometimes"})


def test_the_world_actor_drives_an_opendrive_file_given_by_a_relative_path(monkeypatch, tmp_path):
    pytest.importorskip("carla")
    from deployments.builder import anchor_world_map

    cfg = compose({"world.vehicles": "6", "world.map": "tests/data/town_grid_rht.xodr"})
    anchor_world_map(cfg)  # as the app builder does, in the folder it is started from
    monkeypatch.chdir(tmp_path)  # the replica runs elsewhere
    world = WorldActor.func_or_class(OmegaConf.to_container(cfg, resolve=True))
    a, b = world.add_ego(), world.add_ego()
    start = world.observe_many([a, b])
    for _ in range(20):
        world.tick()
    after = world.observe_many([a, b])
    for ego in (a, b):  # both drive on the file's lanes and see its lines
        assert np.linalg.norm(after[ego].ego_pose[:2, 3] - start[ego].ego_pose[:2, 3]) > 1.0
        assert len(after[ego].map_lines) > 0
