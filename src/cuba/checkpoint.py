"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the classifier and generator weights, both optimisers, the lr schedule,
the data-order generator and the global torch RNG (augmentation draws from it), the step, the
epoch, the position inside the epoch and that epoch's data order, the per-epoch history and the
target sets. Restoring all of it makes a resumed run follow the same trajectory as one that was
never interrupted (bit-for-bit on CPU with ``--deterministic``; a test kills a real run with
SIGKILL to prove it).

The file is written under a temporary name and renamed (a kill mid-write leaves the previous
checkpoint intact), and it is read with ``torch.load(weights_only=True)``: it contains only
tensors and plain containers, so loading it can never run code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"


def capture(
    classifier: torch.nn.Module, generator: torch.nn.Module | None, opt: torch.optim.Optimizer,
    opt_g: torch.optim.Optimizer | None, sched: Any, data_gen: torch.Generator, state: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint payload: model/optimiser/schedule state dicts, RNG states, and the loop ``state``."""
    return {
        "classifier": classifier.state_dict(),
        "generator": generator.state_dict() if generator is not None else None,
        "opt": opt.state_dict(),
        "opt_g": opt_g.state_dict() if opt_g is not None else None,
        "sched": sched.state_dict(),
        "data_gen": data_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "state": state,
    }


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    from .runs import _atomic_write

    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(run_dir) / CHECKPOINT
    _atomic_write(path, lambda t: Path(t).write_bytes(buf.getvalue()))
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's checkpoint, or None when it has none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def restore(
    payload: dict[str, Any], classifier: torch.nn.Module, generator: torch.nn.Module | None, opt: torch.optim.Optimizer,
    opt_g: torch.optim.Optimizer | None, sched: Any, data_gen: torch.Generator,
) -> dict[str, Any]:
    """Load a payload into freshly built objects (in place); return the loop state."""
    classifier.load_state_dict(payload["classifier"])
    if generator is not None and payload["generator"] is not None:
        generator.load_state_dict(payload["generator"])
    opt.load_state_dict(payload["opt"])
    if opt_g is not None and payload["opt_g"] is not None:
        opt_g.load_state_dict(payload["opt_g"])
    sched.load_state_dict(payload["sched"])
    data_gen.set_state(payload["data_gen"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return payload["state"]


def own_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's random streams (CPU, and its GPU's). Under torchrun every rank is seeded apart
    so their augmentation differs; the checkpoint keeps each rank's (``rank_rng``), since restoring
    rank 0's everywhere would make the ranks draw alike after a resume."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_own_rng(payload: dict[str, Any], rank: int, world: int, device: torch.device) -> None:
    """Set this rank's streams from ``payload["rank_rng"]`` (:func:`own_rng_state` of every rank);
    a checkpoint written before them, or by another number of processes, keeps what :func:`restore` set."""
    ranks = payload.get("rank_rng") or []
    if len(ranks) != world:
        return
    cpu_state, cuda_state = ranks[rank]
    torch.set_rng_state(cpu_state)
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
