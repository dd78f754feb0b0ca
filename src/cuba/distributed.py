"""Data-parallel training across processes: ``torchrun --nproc_per_node=N -m cuba train ...``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`setup` turns them into a process group
(NCCL on GPUs, gloo on CPU). Each global batch of ``batch_size`` images is split evenly across
the ranks (every rank draws the same data order from the run's seed and keeps its own slice),
the models are wrapped in ``DistributedDataParallel`` so gradients are averaged in the
backward pass, and evaluation shards the test set and gathers the predictions, so rank 0
computes the metrics on all of it and alone writes the run folder.

The result matches a single-process run on the same global batch up to floating-point order,
with one known difference: BatchNorm layers (the U-Net, ResNets) normalise with per-rank
batch statistics, as DDP does by default.
"""

from __future__ import annotations

import os
from typing import Any
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The process's place in a torchrun launch (a single process when the variables are absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str) -> tuple[Dist, str]:
    """Join the process group when launched by torchrun; return (Dist, the device this rank uses)."""
    d = from_env()
    if not d.enabled:
        return d, device
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
        return d, f"cuda:{d.local_rank}"
    return d, "cpu"


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a tensor over ranks (identity for one process)."""
    if not d.enabled:
        return value
    v = value.detach().clone()
    dist.all_reduce(v)
    return v / d.world


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank; ``[obj]`` for one process. A collective:
    every rank must call it."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def gather_rows(t: torch.Tensor, n_total: int, d: Dist) -> torch.Tensor:
    """Reassemble a tensor sharded as ``full[rank::world]`` on every rank into the full tensor."""
    if not d.enabled:
        return t
    parts: list[torch.Tensor | None] = [None] * d.world
    dist.all_gather_object(parts, t.cpu())
    out = torch.empty((n_total, *t.shape[1:]), dtype=t.dtype)
    for r, p in enumerate(parts):
        out[r::d.world] = p
    return out


def finish(d: Dist) -> None:
    """Wait for every rank, then leave the process group (a clean exit for torchrun)."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
