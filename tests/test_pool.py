"""A denoiser pipeline on Ray: stage actors, one band per (declared) GPU.

This machine has no GPU, so Ray is started with declared GPUs: the stage actors are placed
on them exactly as on a GPU machine (distinct GPU ids, CUDA_VISIBLE_DEVICES) and run the
model on the CPU. What a driver would notice: a pipeline spread over several GPUs shows the
same video as the queue in one process; a pipeline that lost a stage says so, rather than
showing wrong frames (the Serve app then moves its sessions: tests/test_serve_cluster.py).
"""

from __future__ import annotations

import pytest
import ray
import torch
from ray.exceptions import RayActorError

from deployments.stages import PipelineLost, StagePipeline
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

    pool = StagePipeline(cfg)
    try:
        stages = pool.placement()
        gpus = [stage["gpu_ids"] for stage in stages]
        assert [stage["band"] for stage in stages] == list(range(bands))
        assert all(len(g) == 1 for g in gpus) and len({g[0] for g in gpus}) == bands, gpus

        if transport == "cpu_communicator":  # each hand-over is a tensor channel of the communicator
            hints = [task.dag_node.type_hint for task in pool.graph.idx_to_task.values()]
            typed = [type(getattr(h, "_communicator", None)).__name__ for h in hints if type(h).__name__ == "TorchTensorType"]
            assert typed == ["CPUCommunicator"] * (bands - 1), typed

        assert pool.open("s", views=3, seed=5) == 3 * bands - 1
        got = []
        for f in frames:
            got += [im for _, im in pool.push_many({"s": f}).get("s", [])]
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
        holds = ray.get([ray.get_actor(s["actor"]).holds.remote() for s in stages])
        assert [sorted(h) for h in holds] == [["denoiser", "prompts"]] * (bands - 1) + [["decoder", "denoiser", "prompts"]]
        assert all(h["prompts"] == "KnownPrompts" for h in holds), holds
    finally:
        pool.shutdown()


def test_a_pipeline_that_lost_a_stage_says_so_and_takes_no_new_session(four_gpus):
    cfg = config(2)
    a, b = packed_drive(cfg, frames=8, egos=2)
    pool = StagePipeline(cfg)
    try:
        # serve.stage.compiled_graph=auto: stages with GPUs run their rounds as a compiled graph
        assert pool.graph is not None
        for sid in ("a", "b"):
            pool.open(sid, views=3, seed=1)
        out = {"a": 0, "b": 0}
        for i in range(7):
            for sid in pool.push_many({"a": a[i], "b": b[i]}):
                out[sid] += 1
        assert out == {"a": 2, "b": 2}  # depth 5: the 6th and 7th pushes' frames

        first, victim = [ray.get_actor(stage["actor"]) for stage in pool.placement()]
        ray.kill(victim)  # band 1 is gone, and the frames inside it
        eventually(lambda: dead(victim), "the killed stage actor to be dead")
        with pytest.raises(PipelineLost, match="a stage of this denoiser pipeline died"):
            pool.push_many({"a": a[7], "b": b[7]})
        with pytest.raises(PipelineLost, match="takes no new sessions"):
            pool.open("c", views=3, seed=1)
        assert pool.placement() == []
        # Its other stage is given back with it: nothing keeps the GPUs of a lost pipeline.
        eventually(lambda: dead(first), "the pipeline's other stage to be given back")
    finally:
        pool.shutdown()
