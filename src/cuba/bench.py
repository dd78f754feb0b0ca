"""``cuba bench``: training throughput of the engine, of a CUBA step, and of a conventional loop.

Three measurements per (classifier, input size), side by side in one process on synthetic
uint8 data of the real shape (speed does not depend on pixel values):

* **engine, clean**: :func:`cuba.train.train` with ``--attack none`` -- tensors resident on the
  device, batched on-device augmentation, bf16 autocast where supported, channels_last;
* **engine, CUBA**: the same loop with the joint generator step (``--attack cuba``);
* **reference**: the conventional BackdoorBench-style loop on the same work -- a torchvision
  ``Dataset`` returning PIL images, per-sample ``transforms`` (random crop + flip for 32x32
  RGB, none for 28x28), a ``DataLoader``, fp32, NCHW.

``cuba_step_over_clean_step`` = CUBA step time / clean step time (the default full-resolution
U-Net; ``cuba_half_res_step_over_clean_step``: the same with ``generator_scale 2``); ``engine_over_reference`` =
clean engine images/s / reference images/s. ``cuba_step_speedup`` = the default CUBA step's time /
the time of the **cheap step** (:data:`CHEAP_STEP`: half-resolution U-Net and a backdoor twin for
half of each batch, ``backdoor_ratio 0.5`` -- the levers issue 16 weighs for the RGB rows on a
CPU), both measured in the same run; the default step stays the baseline, and whether the cheap
one costs CA / ASR / DS is a training measurement (BENCHMARKS.md), not this bench's. Peak memory is the CUDA allocator's peak on a GPU,
and the process's maximum resident set size (cumulative over the run) on CPU.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from . import allocator
from .config import make_config
from .data import ImageDataset
from .engine import make_engine
from .models import build_classifier
from .train import train

# the cheaper joint step cuba_step_speedup compares against the default one (module docstring)
CHEAP_STEP: dict[str, Any] = {"generator_scale": 2, "backdoor_ratio": 0.5}

# (name, classifier, channels, image size, augment, steps with --quick, steps per repeat without)
CASES = (("simplecnn_28", "simplecnn", 1, 28, "none", 20, 60), ("resnet18_32", "resnet18", 3, 32, "crop+flip", 4, 20))


def cpu_flags() -> dict[str, bool]:
    """Whether this CPU has the units that decide the bf16 question (Linux /proc/cpuinfo; all False
    where it cannot be read): every timing in BENCHMARKS.md names them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        flags = set()
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}


def synthetic(channels: int, size: int, n: int, k: int = 10, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % k
    return ImageDataset(f"synthetic{size}", x, y, x[:256], y[:256])


def engine_throughput(model: str, data: ImageDataset, attack: str, augment: str, steps: int, batch: int, device: str,
                      channels_last: bool = True, **fields: Any) -> float:
    """Images/s of the training loop itself (no evaluation, no setup), over ``steps`` steps.

    The first two steps are left out, as in :func:`reference_throughput`: they pay for the
    allocator and kernel warm-up, which a short measurement would otherwise charge to the loop.

    ``fields`` are extra config fields (e.g. ``generator_scale=2``) for the variants the bench compares;
    ``channels_last`` is the engine's memory format (benchmarks/memory_format.py compares both).
    """
    cfg = make_config({
        **fields,
        "dataset": "digits", "model": model, "attack": attack, "augment": augment, "batch_size": batch,
        "epochs": steps * batch / len(data.y_train), "warmup_epochs": 0.0, "progress": False, "device": device,
        "eval_each_epoch": False, "checkpoint_every": 0.0,
    })
    return train(cfg, data, make_engine(device, "auto", channels_last)).steady_images_per_second


def reference_throughput(model: str, data: ImageDataset, augment: str, steps: int, batch: int, device: str) -> float:
    """Images/s of a conventional loop: PIL per sample, torchvision transforms, DataLoader, fp32."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    ops = [T.RandomCrop(data.image_size, padding=4), T.RandomHorizontalFlip()] if augment != "none" else []
    tf = T.Compose([*ops, T.ToTensor(), T.Normalize([0.5] * data.channels, [0.5] * data.channels)])
    arr = data.x_train.permute(0, 2, 3, 1).squeeze(-1).numpy() if data.channels == 1 else data.x_train.permute(0, 2, 3, 1).numpy()

    class PILDataset(Dataset):
        def __len__(self) -> int:
            return len(arr)

        def __getitem__(self, i: int):
            return tf(Image.fromarray(arr[i])), int(data.y_train[i])

    loader = DataLoader(PILDataset(), batch_size=batch, shuffle=True, drop_last=True, num_workers=0)
    net = build_classifier(model, data.channels, data.num_classes, data.image_size).to(dev).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    done, t0 = 0, None
    while done < steps + 2:
        for x, y in loader:
            if done == 2:  # the first two steps warm the allocator and kernels up, as in the engine's timing
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            loss = F.cross_entropy(net(x.to(dev)), y.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps + 2:
                break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def _peak_memory_mb(device: str) -> float:
    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_bench(quick: bool = False, device: str = "auto", batch: int = 128, repeats: int | None = None) -> dict[str, Any]:
    """Measure every case; ``quick`` uses few steps (under 2 minutes on 2 CPU cores).

    Each throughput is the median of ``repeats`` measurements (default 3, 1 with ``quick``),
    taken in interleaved order (clean, CUBA, half-res CUBA, cheap CUBA, reference, then again), so a slow
    spell of the machine does not land on one side of a ratio: single runs of the same code
    moved the ResNet18 ratio from 2.16 to 2.39. ``*_range`` gives the smallest and largest sample.
    """
    repeats = repeats if repeats is not None else (1 if quick else 3)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out: dict[str, Any] = {"device": str(make_engine(device).device), "bf16": make_engine(device).bf16,
                           "threads": torch.get_num_threads(), "batch_size": batch, "repeats": repeats, "torch": torch.__version__,
                           "host_allocator": allocator.current()}  # set by a CPU engine, just made above
    for name, model, ch, size, aug, quick_steps, full_steps in CASES:
        n_steps = quick_steps if quick else full_steps
        n = n_steps * batch + batch  # one pass plus a spare batch: every step sees new images
        data = synthetic(ch, size, n)
        t0 = time.perf_counter()
        measure = {
            "engine_clean_img_s": lambda: engine_throughput(model, data, "none", aug, n_steps, batch, device),
            "engine_cuba_img_s": lambda: engine_throughput(model, data, "cuba", aug, n_steps, batch, device),
            # the half-resolution U-Net (generator_scale 2, the mnist-fast preset): the default
            # U-Net alone costs more than a clean SimpleCNN step, so the 2x floor needs a cheaper one
            "engine_cuba_half_res_img_s": lambda: engine_throughput(model, data, "cuba", aug, n_steps, batch, device, generator_scale=2),
            "engine_cuba_cheap_img_s": lambda: engine_throughput(model, data, "cuba", aug, n_steps, batch, device, **CHEAP_STEP),
            "reference_img_s": lambda: reference_throughput(model, data, aug, n_steps, batch, device),
        }
        samples: dict[str, list[float]] = {k: [] for k in measure}
        for _ in range(repeats):
            for key, fn in measure.items():
                samples[key].append(fn())
        med = {k: statistics.median(v) for k, v in samples.items()}
        clean = med["engine_clean_img_s"]
        out[name] = {
            "steps": n_steps, **{k: round(v, 1) for k, v in med.items()},
            **{k.replace("_img_s", "_range"): [round(min(v), 1), round(max(v), 1)] for k, v in samples.items()},
            "cuba_step_over_clean_step": round(clean / med["engine_cuba_img_s"], 3),
            "cuba_half_res_step_over_clean_step": round(clean / med["engine_cuba_half_res_img_s"], 3),
            "cuba_step_speedup": round(med["engine_cuba_cheap_img_s"] / med["engine_cuba_img_s"], 3),
            "engine_over_reference": round(clean / med["reference_img_s"], 3), "peak_memory_mb": round(_peak_memory_mb(device), 1),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    out["cuba_step_over_clean_step"] = max(out[c[0]]["cuba_step_over_clean_step"] for c in CASES)
    out["cuba_half_res_step_over_clean_step"] = max(out[c[0]]["cuba_half_res_step_over_clean_step"] for c in CASES)
    out["cuba_step_speedup"] = min(out[c[0]]["cuba_step_speedup"] for c in CASES)
    out["cheap_step"] = CHEAP_STEP
    out["engine_over_reference"] = min(out[c[0]]["engine_over_reference"] for c in CASES)
    return out
