"""Data parallelism through torch.distributed, as torchrun sets it up.

`torchrun --nproc-per-node N -m vithybrid_fast <command>` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT in the environment; `setup()` joins them into one process group
(NCCL when the processes drive CUDA GPUs, gloo on CPUs) and gives each process its own GPU
(cuda:LOCAL_RANK). Without those variables everything runs in one process and the helpers are no-ops.

Exact metrics: `ShardSampler` hands each rank every world_size-th sample and pads with nothing, so
summing per-rank counts with `all_reduce_sum` counts each sample exactly once (torch's
DistributedSampler repeats samples to even out the shards; fine for training, wrong for accuracy).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .gpu_support import command_device


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


MAX_DEFAULT_WORKERS = 4


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (taskset, cgroups), else all."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_num_workers() -> int:
    """DataLoader workers per rank when not given: 4, or fewer where fewer CPUs are usable.

    More workers than CPUs only adds processes (torch warns past its suggested maximum, which counts
    the same affinity mask).
    """
    return min(MAX_DEFAULT_WORKERS, usable_cpus())


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | torch.device | None) -> DistContext:
    """Join torchrun's process group (if launched by it) and pick this process's device.

    device: None → cuda when available, else cpu. Under torchrun a CUDA device becomes cuda:LOCAL_RANK
    (an explicit index is kept only for a single process).
    """
    requested = command_device(device)
    if not launched_by_torchrun():
        return DistContext(0, 1, 0, requested)
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if requested.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} needs GPU {local_rank} but {torch.cuda.device_count()} are visible: "
                "use --nproc-per-node ≤ the GPUs per node, or --device cpu"
            )
        requested = torch.device("cuda", local_rank)
        torch.cuda.set_device(requested)
    if not dist.is_initialized():
        # on GPUs NCCL for CUDA tensors and gloo for CPU ones (torch's own default pair): "nccl" alone has no
        # backend for a CPU tensor, and evaluate() sums its counts and loss on the CPU
        backend = "cpu:gloo,cuda:nccl" if requested.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": requested} if requested.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistContext(rank, world, local_rank, requested)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum over ranks (in place, returned); integer counts stay exact."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def print0(ctx: DistContext, *args: Any, file: Any = None, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if ctx.is_main:
        print(*args, file=file or sys.stdout, **kwargs)


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank r gets samples r, r + world, r + 2·world, … in order: shards differ by at most one sample, no padding."""

    def __init__(self, length: int, ctx: DistContext) -> None:
        self.indices = range(ctx.rank, length, ctx.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
