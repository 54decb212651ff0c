"""CFG-parallel: the rows of every denoiser call split over processes, one GPU each.

With guidance, every step's call is over 2B windows per session, the unconditional half and
the conditional half. `pipeline.cfg_parallel=true` runs each session's queue in two processes
at once (the same seed, the same conditions, so the same latents), and wraps their denoiser
in a `RowParallelDenoiser`: process r computes its share of the call's rows (with one guided
session: the unconditional windows in rank 0, the conditional ones in rank 1), and the
processes exchange only their outputs (velocities, about 0.5 MB per step at the released
size: 2 x 6 x 3 x 16 x 22 x 38 half-precision values) with one all-gather. Both then hold the
whole output, mix the guidance and take the Euler step identically, so their queues stay
equal. A session's frames are those of one process within the rounding of a smaller batch
(the model sees the same rows, split over two calls).

The exchange is torch.distributed (NCCL between GPUs, gloo on CPUs): one group per set of
processes, joined once (`join_group`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dwm.models.base import Denoiser, FrameContext


def join_group(address: str, port: int, rank: int, world: int, device: torch.device) -> None:
    """Join the processes' group: `world` processes, this one `rank`, meeting at
    tcp://address:port (rank 0 listens there). NCCL where the model runs on CUDA, gloo else."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class RowParallelDenoiser:
    """A denoiser whose calls are split by rows over the group's processes.

    Call: x (R, T, V, C, h, w), timesteps (R, T, V), context tensors (R, T, V, ...) -> the
    whole output (R, T, V, C, h, w): this process computes rows [rank * k, (rank + 1) * k)
    with k = ceil(R / world), every process's share is gathered. Everything else (frame
    contexts, attributes) is the wrapped denoiser's.
    """

    def __init__(self, denoiser: Denoiser, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world}: must be in [0, {world})")
        self.denoiser, self.rank, self.world = denoiser, rank, world

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: FrameContext) -> torch.Tensor:
        rows = x.shape[0]
        if rows < self.world:  # too few rows to share (one unguided window): every process computes them
            return self.denoiser(x, timesteps, context)
        share = math.ceil(rows / self.world)
        lo, hi = min(rows, self.rank * share), min(rows, (self.rank + 1) * share)
        mine = self.denoiser(x[lo:hi], timesteps[lo:hi], {k: v[lo:hi] for k, v in context.items()})
        padded = mine.new_zeros((share, *mine.shape[1:]))  # the last share may be short
        padded[: hi - lo] = mine
        shares = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(shares, padded.contiguous())
        return torch.cat(shares)[:rows]
