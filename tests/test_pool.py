"""The denoiser pool on Ray: pipelines of stage actors, one band per (declared) GPU.

This machine has no GPU, so Ray is started with declared GPUs: the stage actors are placed
on them exactly as on a GPU machine (distinct GPU ids, CUDA_VISIBLE_DEVICES) and run the
model on the CPU. What a driver would notice: a pipeline spread over several GPUs shows the
same video as the queue in one process; when one of its GPUs' stages dies, their session
goes on, on another pipeline, with the same stream.
"""

from __future__ import annotations

import pytest
import ray
import torch
from ray.exceptions import RayActorError

from deployments.stages import DenoiserPool
from dwm.config import compose
from dwm.pipelines.streaming import StreamingPipeline
from tests.driving import packed_drive
from tests.waiting import eventually


def dead(actor) -> bool:
    """Whether calling `actor` fails because it died (ray.kill returns before it is gone)."""
    try:
        ray.get(actor.where.remote(), timeout=30)
    except RayActorError:
        return True
    return False


def config(bands: int, **more):
    return compose({
        "pipeline.steps": str(6 * bands if bands < 4 else 12), "pipeline.window": "3",
        "pipeline.bands": str(bands), "pipeline.batch_bands": "false", "world.vehicles": "8",
        "serve.stage.num_gpus": "1", "serve.stage.num_cpus": "0.1", "serve.stage.torch_threads": "1",
        **more,
    })


@pytest.fixture(scope="module")
def four_gpus(ray_runtime):
    """The run's shared Ray, which declares 4 GPUs."""
    ray_runtime.local()
    assert ray.cluster_resources().get("GPU", 0) >= 4


@pytest.mark.parametrize(
    ("bands", "graph", "transport"),
    [(2, True, "auto"), (4, True, "auto"), (2, False, "auto"), (2, True, "cpu_communicator")],
    ids=["2-graph", "4-graph", "2-calls", "2-graph-collective"],
)
def test_a_pipeline_puts_each_band_on_its_own_gpu_and_makes_the_frames_of_one_process(four_gpus, bands, graph, transport):
    # collective: the hand-overs' tensors take the path they take between GPU stages (a
    # communicator's send and receive), with Ray's CPU communicator in NCCL's place.
    cfg = config(bands, **{"serve.stage.compiled_graph": str(graph).lower(), "serve.stage.transport": transport})
    (frames,) = packed_drive(cfg, frames=3 * bands + 4)
    # The queue in one piece, here, with the stages' thread count (1): a matmul's rounding
    # may depend on how many threads split it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = StreamingPipeline.from_config(cfg, views=3, seed=5)
        expected = [out.images for f in frames for out in whole.push(f.unpack())]
    finally:
        torch.set_num_threads(threads)

    pool = DenoiserPool(cfg)
    try:
        (pipeline,) = pool.placement()
        gpus = [stage["gpu_ids"] for stage in pipeline["stages"]]
        assert [stage["band"] for stage in pipeline["stages"]] == list(range(bands))
        assert all(len(g) == 1 for g in gpus) and len({g[0] for g in gpus}) == bands, gpus

        if transport == "cpu_communicator":  # each hand-over is a tensor channel of the communicator
            hints = [task.dag_node.type_hint for task in pool.pipelines[0].graph.idx_to_task.values()]
            typed = [type(getattr(h, "_communicator", None)).__name__ for h in hints if type(h).__name__ == "TorchTensorType"]
            assert typed == ["CPUCommunicator"] * (bands - 1), typed

        assert pool.open("s", views=3, seed=5) == 3 * bands - 1
        got = []
        for f in frames:
            images, restarted = pool.push_many({"s": f})
            assert restarted == {}
            got += [im for _, im in images.get("s", [])]
        assert len(got) == len(expected) == 5
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        handover = pool.handover.stats()
        latent = 3 * 16 * 22 * 38 * 4  # bytes of one float32 latent frame
        text = pool.text_encoder.encode([""] * 3).nbytes
        # Each frame carries its latent and its compact conditions; its caption embedding only
        # where the next stage has not had it (the captions of this drive never change): on
        # average far less than an embedding per frame.
        conditions = max(f.nbytes for f in frames)
        assert handover["frames"] > 0 and latent < handover["bytes_per_frame"] < latent + conditions + text / 2

        # Lean stages: the denoiser everywhere, the decoder only where frames leave, and no
        # text encoder, only the table of the embeddings the frames brought (KnownPrompts).
        holds = ray.get([ray.get_actor(s["actor"]).holds.remote() for s in pipeline["stages"]])
        assert [sorted(h) for h in holds] == [["denoiser", "prompts"]] * (bands - 1) + [["decoder", "denoiser", "prompts"]]
        assert all(h["prompts"] == "KnownPrompts" for h in holds), holds
    finally:
        pool.shutdown()


def test_sessions_go_to_the_least_loaded_pipeline_and_a_dead_stage_moves_them(four_gpus):
    cfg = config(2, **{"serve.pipelines": "2"})
    a, b, c = packed_drive(cfg, frames=16, egos=3)
    pool = DenoiserPool(cfg)
    try:
        # serve.stage.compiled_graph=auto: stages with GPUs run their rounds as compiled graphs
        assert all(p.graph is not None for p in pool.pipelines)
        for sid in ("a", "b", "c"):
            pool.open(sid, views=3, seed=1)
        placement = pool.placement()
        assert [p["sessions"] for p in placement] == [["a", "c"], ["b"]]
        used = [g for p in placement for s in p["stages"] for g in s["gpu_ids"]]
        assert sorted(used) == ["0", "1", "2", "3"]

        out = {"a": 0, "b": 0, "c": 0}
        for i in range(10):
            images, restarted = pool.push_many({"a": a[i], "b": b[i], "c": c[i]})
            assert restarted == {}
            for sid in images:
                out[sid] += 1
        assert out == {"a": 5, "b": 5, "c": 5}

        victim = ray.get_actor(placement[1]["stages"][1]["actor"])
        ray.kill(victim)  # pipeline 1 loses band 1
        eventually(lambda: dead(victim), "the killed stage actor to be dead")
        images, restarted = pool.push_many({"a": a[10], "b": b[10], "c": c[10]})
        assert restarted == {"b": 6}  # the 5 frames inside its queue and this one are lost
        assert set(images) == {"a", "c"}
        placement = pool.placement()
        assert placement[1]["healthy"] is False and placement[0]["sessions"] == ["a", "b", "c"]
        # b's new queue warms up again (6 frames), then b gets frames as before; a and c never stop.
        seen = {"a": 0, "b": 0, "c": 0}
        for i in range(11, 16):
            images, restarted = pool.push_many({"a": a[i], "b": b[i], "c": c[i]})
            assert restarted == {}
            for sid in images:
                seen[sid] += 1
        assert seen["a"] == seen["c"] == 5 and seen["b"] == 0
        images, _ = pool.push_many({"a": a[15], "b": b[15], "c": c[15]})
        assert "b" in images and images["b"][0][0] == 5  # its frame count goes on from 5
    finally:
        pool.shutdown()
