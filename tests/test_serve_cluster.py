"""The Serve app on a 2-node cluster with declared GPUs: two denoiser pipelines (QueueServer
replicas) of two stage actors, one per node (a pipeline's stages packed on one node), sessions
on both; one node's stage dies, its session goes on, on the other pipeline, with the same
stream, and Serve replaces the lost pipeline.

`ray.cluster_utils.Cluster` starts real Ray nodes (raylets) in this machine; the GPUs are
declared, the model runs on the CPU.
"""

from __future__ import annotations

import pytest
import ray
import requests
from ray import serve

import deployments
from tests.waiting import StreamWatcher, eventually as wait_until, free_port

WAIT_S = 180.0  # upper bound: a 2-node cluster on 2 cores starts slowly


def eventually(check, what: str):
    return wait_until(check, what, timeout=WAIT_S, every=0.3)
OVERRIDES = {
    "pipeline.steps": "6", "pipeline.window": "3", "pipeline.bands": "2", "pipeline.batch_bands": "false",
    "world.vehicles": "8", "serve.pipelines": "2", "serve.stage.num_gpus": "1", "serve.stage.num_cpus": "0.1",
    "serve.stage.torch_threads": "1", "serve.graceful_shutdown_s": "1.0",
    # With pipelines the QueueServer replica only coordinates them. Serve spreads replicas over the
    # nodes: with its default 1 CPU it could take a worker node's only CPU, and that node's
    # pipeline would wait serve.stage.start_timeout_s for room before the replica is restarted.
    "serve.denoiser.num_cpus": "0.1",
}


@pytest.fixture(scope="module")
def cluster(ray_runtime):
    """A head and two worker nodes with 2 declared GPUs each (tests/conftest.py starts it, after
    every test on the shared local Ray)."""
    return ray_runtime.cluster(
        head={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 200 * 2**20},
        workers=[{"num_cpus": 1, "num_gpus": 2, "object_store_memory": 200 * 2**20}] * 2,
    )


@pytest.mark.ray_cluster
def test_a_dead_stage_moves_its_session_to_the_other_pipeline_and_serve_replaces_the_pipeline(cluster):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(deployments.app(OVERRIDES))

    placement = requests.get(f"{base}/pipelines", timeout=60).json()["pipelines"]
    assert len(placement) == 2
    worker_nodes = {n.node_id for n in cluster}
    for pipeline in placement:  # each pipeline on one node (PACK), each stage its own GPU
        nodes = {stage["node_id"] for stage in pipeline["stages"]}
        assert len(nodes) == 1 and nodes <= worker_nodes, pipeline
        assert len({stage["gpu_ids"][0] for stage in pipeline["stages"]}) == 2
    assert {placement[0]["stages"][0]["node_id"], placement[1]["stages"][0]["node_id"]} == worker_nodes

    sessions = [requests.post(f"{base}/sessions", json={"autopilot": True}, timeout=120).json() for _ in range(2)]
    placement = requests.get(f"{base}/pipelines", timeout=60).json()["pipelines"]
    assert sorted(len(p["sessions"]) for p in placement) == [1, 1]  # least loaded: one each
    readers = [StreamWatcher(s["streams"]["mjpeg"]) for s in sessions]
    for reader in readers:
        reader.start()
    eventually(lambda: all(len(r.indices) >= 3 for r in readers), "frames on both streams")

    victim = placement[0]
    (moved,) = victim["sessions"]
    ray.kill(ray.get_actor(victim["stages"][1]["actor"]))

    tokens = {s["id"]: s["token"] for s in sessions}

    def pipelines():
        return requests.get(f"{base}/pipelines", timeout=60).json()["pipelines"]

    def state(sid):
        return requests.get(f"{base}/sessions/{sid}", headers={"Authorization": f"Bearer {tokens[sid]}"},
                            timeout=30).json()

    eventually(lambda: state(moved)["stats"]["queue_restarts"] == 1, "the session's queue to be rebuilt")
    seen = len(readers[[s["id"] for s in sessions].index(moved)].indices)
    eventually(lambda: all(len(r.indices) >= seen + 4 for r in readers), "both streams to go on")
    for reader in readers:
        assert reader.error is None, reader.error
        assert reader.indices == sorted(reader.indices) and len(set(reader.indices)) == len(reader.indices)
    survivor = next(p for p in placement if p is not victim)
    assert moved in next(p for p in pipelines() if p["pipeline"] == survivor["pipeline"])["sessions"]
    # Serve replaces the lost pipeline (its replica fails the health check): two healthy
    # pipelines again, the new one with stages of its own.
    def replaced() -> bool:
        now = pipelines()
        return (len(now) == 2 and victim["pipeline"] not in {p["pipeline"] for p in now}
                and all(p["healthy"] and len(p["stages"]) == 2 for p in now))

    eventually(replaced, "Serve to replace the lost pipeline")
    moved_state = state(moved)
    assert moved_state["stats"]["gap_frames"] > 0 and moved_state["streams"]["mjpeg"].split("?token=")[0].endswith(f"/sessions/{moved}/video.mjpg")
    other = next(s["id"] for s in sessions if s["id"] != moved)
    assert state(other)["stats"]["queue_restarts"] == 0 and state(other)["stats"]["gap_frames"] == 0
    for reader in readers:
        reader.stop.set()
