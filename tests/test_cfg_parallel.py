"""CFG-parallel: every model call's rows shared by two processes (two GPUs where there are).

What a driver would notice: nothing but the speed. Here the QueueServer (in this process)
and its partner actor split every call on the CPU, exchanging the halves over gloo; the
frames that come out are those of the queue in one process, to the rounding of a smaller
batch.
"""

from __future__ import annotations

import ray
import torch
from omegaconf import OmegaConf

from deployments.queue_server import QueueServer
from dwm.config import compose
from dwm.pipelines.cfg_parallel import leave_group
from dwm.pipelines.streaming import StreamingPipeline
from tests.driving import packed_drive


def decoded_latents(decoder) -> list[torch.Tensor]:
    """Records every latent frame `decoder` decodes (V, C, h, w), float32, as it goes in."""
    seen, decode = [], decoder.decode

    def recording(latents):
        seen.append(latents.detach().float().clone())
        return decode(latents)

    decoder.decode = recording
    return seen


def test_two_processes_sharing_every_call_make_the_frames_of_one(ray_runtime):
    ray_runtime.local()
    cfg = compose({"pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "8",
                   "pipeline.cfg_parallel": "true", "serve.denoiser.num_cpus": "0.1",
                   "serve.denoiser.torch_threads": "1"})
    a, b = packed_drive(cfg, frames=7, egos=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = QueueServer.func_or_class(OmegaConf.to_container(cfg, resolve=True))
    try:
        expected, expected_latents = {}, {}
        for name, frames, seed in (("a", a, 3), ("b", b, 4)):
            alone = StreamingPipeline.from_config(cfg, views=3, seed=seed)
            expected_latents[name] = decoded_latents(alone.decoder)
            expected[name] = [out.images for f in frames for out in alone.push(f.unpack())]
        rows: list[int] = []  # of each call this process's model makes
        server.queues.model.denoiser.denoiser.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
        server.open("a", views=3, seed=3)
        server.open("b", views=3, seed=4)
        latents = decoded_latents(server.queues.model.decoder)
        got = {"a": [], "b": []}
        for fa, fb in zip(a, b):
            for sid, out in server.push_many({"a": fa, "b": fb}).images.items():
                got[sid] += [g.images for g in out]
        assert len(got["a"]) == len(expected["a"]) == 5 and len(got["b"]) == 5
        # The frames leaving the queue, in float32 (a's and b's alternate: one decode each per
        # round on a CPU), and the published 8-bit views.
        assert latents[0::2] and len(latents[0::2]) == len(expected_latents["a"]) == 5
        for mine, one in zip(latents[0::2] + latents[1::2], expected_latents["a"] + expected_latents["b"]):
            assert (torch.linalg.vector_norm(mine - one) / torch.linalg.vector_norm(one)) <= 1e-6
        for sid in got:
            for mine, one in zip(got[sid], expected[sid]):
                assert (mine.int() - one.int()).abs().max() <= 1
        # Every call here took half the rows: 2 of the 4 (2 sessions x unconditional and conditional).
        assert rows and set(rows) == {2}, rows
    finally:
        torch.set_num_threads(threads)
        if server.partner is not None:
            ray.kill(server.partner)
        leave_group()
