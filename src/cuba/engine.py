"""Device, precision and memory-format choices, made once per run.

bf16 autocast is used on CUDA GPUs that support it and on CPUs with native bf16 units
(AVX512-BF16 / AMX), where it is several times faster than fp32 (BENCHMARKS.md gives the
measurements, with the CPU of each). Older CPUs emulate bf16 slowly, so they fall back to fp32.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from .allocator import keep_freed_memory, release_freed_memory
from .config import DEVICES, ConfigError


@dataclass(frozen=True)
class Engine:
    device: torch.device
    bf16: bool
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def batch(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on any device -> float [0, 1] on the engine's device and layout."""
        x = x_uint8.to(self.device, non_blocking=True).float().div_(255.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def make_engine(device: str = "auto", precision: str = "auto", channels_last: bool = True) -> Engine:
    """The run's device and precision. A device that is not there is a :class:`ConfigError`
    (the CLI prints it as one line) rather than a CUDA error in the middle of a run. Every run and
    defense comes through here, so a CPU engine applies the host allocator policy here (once per
    process, :func:`cuba.allocator.keep_freed_memory`) and hands back what the previous phase kept
    (:func:`cuba.allocator.release_freed_memory`); a GPU run's large blocks live on the GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device: must be {DEVICES}, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} was asked for but no CUDA GPU is available (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r} was asked for but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device: {device!r} was asked for but this machine has no Apple GPU (use --device cpu or auto)")
    if dev.type == "cpu":
        keep_freed_memory()
        release_freed_memory()
    if precision == "auto":
        bf16 = (dev.type == "cuda" and cuda_has_bf16(dev)) or (dev.type == "cpu" and cpu_has_bf16())
    else:
        bf16 = precision == "bf16"
    return Engine(dev, bf16, channels_last)


def cuda_has_bf16(dev: torch.device) -> bool:
    """Native bf16 on the GPU ``dev`` (compute capability 8.0, Ampere, or later). Not
    ``torch.cuda.is_bf16_supported()``: by default it also accepts emulated bf16 (slow on V100 / T4)
    and it asks about the current GPU, not the requested one."""
    return torch.cuda.get_device_capability(dev)[0] >= 8


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
