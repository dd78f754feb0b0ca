"""Evaluation: predictions of a (classifier, generator) pair on the test set, and their metrics.

Runs under ``inference_mode`` in large batches, always in fp32 even when training used bf16
autocast: a CUBA model's backdoor logits are near-ties by design (LNF pushes them to be
equal over the target set), and bf16's 8-bit mantissa turns near-ties into exact ties that
``argmax`` breaks toward the lowest class index -- a systematic artefact that lowers DS
(BENCHMARKS.md and the table of choices in docs/reference/training.md give the measurement). The only per-image
Python is scikit-image's SSIM, computed once at the end of a run (``stealth=True``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ImageDataset
from .distributed import Dist, gather_rows
from .engine import Engine
from .metrics import compute_metrics, linf_per_image, psnr_per_image, ssim_per_image
from .runs import Predictions


@torch.inference_mode()
def predict(
    classifier: nn.Module, generator: nn.Module | None, data: ImageDataset, engine: Engine,
    batch_size: int = 1024, stealth: bool = True, progress: bool = False, dist: Dist | None = None, split: str = "test",
) -> Predictions:
    """Predictions on a whole split (``test`` by default, ``val`` for model selection); under
    torchrun each rank takes ``x[rank::world]`` and the shards are gathered, so every rank returns
    the full arrays. No autocast here, on purpose: see the module docstring."""
    classifier.eval()
    if generator is not None:
        generator.eval()
    d = dist or Dist()
    clean, bd, psnr, linf, ssim = [], [], [], [], []
    x_all, y_all = data.split(split)
    batches = x_all[d.rank::d.world].split(batch_size)
    for xb in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
        x = engine.batch(xb)
        clean.append(classifier(x).argmax(1).cpu())
        if generator is not None:
            x_bd = generator(x).float()
            bd.append(classifier(x_bd).argmax(1).cpu())
        if generator is not None:
            x_bd_cpu, x_cpu = x_bd.float().cpu(), x.float().cpu()
            psnr.append(psnr_per_image(x_cpu, x_bd_cpu))
            linf.append(linf_per_image(x_cpu, x_bd_cpu))
            if stealth:
                ssim.append(ssim_per_image(x_cpu, x_bd_cpu))
    has_bd = generator is not None
    n = len(y_all)
    full = lambda parts: gather_rows(torch.cat(parts), n, d).numpy()  # noqa: E731
    return Predictions(
        y_true=y_all.numpy(),
        y_pred_clean=full(clean),
        y_pred_backdoor=full(bd) if has_bd else None,
        psnr=full(psnr) if has_bd else None,
        linf=full(linf) if has_bd else None,
        ssim=full([torch.from_numpy(np.concatenate(ssim))]) if has_bd and stealth else None,
    )


def metrics_from_predictions(pred: Predictions, targets: torch.Tensor | None, full_range: bool) -> dict:
    """Label metrics (CA, ASR, ASR-C, DS, DS-min, D_p) plus stealth summaries (PSNR, SSIM, L-inf)."""
    m = compute_metrics(pred.y_true, pred.y_pred_clean, pred.y_pred_backdoor, targets, full_range)
    nan = float("nan")
    m["psnr"] = float(np.mean(pred.psnr)) if pred.psnr is not None else nan
    m["ssim"] = float(np.mean(pred.ssim)) if pred.ssim is not None else nan
    m["linf"] = float(np.max(pred.linf)) if pred.linf is not None else nan
    m["linf_mean"] = float(np.mean(pred.linf)) if pred.linf is not None else nan
    return m


def evaluate_models(
    classifier: nn.Module, generator: nn.Module | None, data: ImageDataset, engine: Engine,
    targets: torch.Tensor | None, full_range: bool, batch_size: int = 1024, stealth: bool = True, dist: Dist | None = None,
    split: str = "test",
) -> dict:
    pred = predict(classifier, generator, data, engine, batch_size, stealth, dist=dist, split=split)
    return metrics_from_predictions(pred, targets, full_range)
