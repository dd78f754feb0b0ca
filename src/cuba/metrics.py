"""Attack metrics with the fixed definitions of METHOD.md §2.

All functions take plain label tensors/arrays so they can be recomputed from a saved
``predictions.npz`` without the models (``cuba evaluate``).

* CA  -- accuracy on clean test images.
* ASR -- share of backdoor test images whose prediction satisfies the variant's success rule:
  prediction in T(y) (for FRA, T(y) = every class but y, i.e. prediction != y). Images whose
  class has an empty T(y) -- the target class of an all-to-one attack -- are not attacked and
  are left out. ASR-C is the same restricted to images the model classifies correctly when clean.
* DS  -- per source class c, over the *successful* backdoor images of c: with H_c the classes
  the predictions should spread over (all K for FRA, T(c) for NRA) and p_j the share of those
  predictions on class j, DS_c = 1 - sqrt(mean_{j in H_c} (p_j - 1/|H_c|)^2). Headline DS is
  the mean of DS_c over source classes that have at least one successful image; DS-min their min.
* D_p -- UBW's dispersibility: per source class, the natural-log entropy of the histogram of
  the predictions of all its backdoor images, averaged over classes.
* PSNR / SSIM / L-inf -- stealth of x* against x, per image, on pixel values in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import structural_similarity


def _t(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).long().flatten()


def accuracy(y_true: torch.Tensor | np.ndarray, y_pred: torch.Tensor | np.ndarray) -> float:
    y_true, y_pred = _t(y_true), _t(y_pred)
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError(f"need two equally long, non-empty label arrays, got {len(y_true)} and {len(y_pred)}")
    return float((y_true == y_pred).float().mean())


def success_mask(y_true: torch.Tensor | np.ndarray, y_pred: torch.Tensor | np.ndarray, targets: torch.Tensor) -> torch.Tensor:
    """Per-image success: prediction in T(y). ``targets`` is the (K, K) bool target matrix."""
    y_true, y_pred = _t(y_true), _t(y_pred)
    return targets.bool()[y_true, y_pred]


def attacked_mask(y_true: torch.Tensor | np.ndarray, targets: torch.Tensor) -> torch.Tensor:
    """Per-image: does its class have a non-empty target set (is it attacked at all)?"""
    return targets.bool().any(dim=1)[_t(y_true)]


def attack_success_rate(
    y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, targets: torch.Tensor,
    y_pred_clean: torch.Tensor | np.ndarray | None = None,
) -> float:
    """ASR; with ``y_pred_clean`` given, ASR-C (only images classified correctly when clean)."""
    keep = attacked_mask(y_true, targets)
    if y_pred_clean is not None:
        keep &= _t(y_true) == _t(y_pred_clean)
    ok = success_mask(y_true, y_pred_bd, targets)[keep]
    return float(ok.float().mean()) if len(ok) else float("nan")


def per_class_ds(
    y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, targets: torch.Tensor, full_range: bool,
) -> list[float]:
    """DS_c for every source class (NaN for a class with no successful backdoor image).

    ``full_range`` selects H_c = all K classes (FRA, as the paper states) instead of T(c).
    """
    y_true, y_pred = _t(y_true), _t(y_pred_bd)
    k = targets.shape[0]
    ok = success_mask(y_true, y_pred, targets)
    out: list[float] = []
    for c in range(k):
        preds = y_pred[(y_true == c) & ok]
        if len(preds) == 0:
            out.append(float("nan"))
            continue
        p = torch.bincount(preds, minlength=k).double() / len(preds)
        support = torch.ones(k, dtype=torch.bool) if full_range else targets[c].bool()
        ph = p[support]
        out.append(float(1.0 - torch.sqrt(((ph - 1.0 / len(ph)) ** 2).mean())))
    return out


def dispersibility_score(
    y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, targets: torch.Tensor, full_range: bool,
) -> tuple[float, float]:
    """(DS, DS-min): mean and minimum of DS_c over source classes with a successful image."""
    vals = [v for v in per_class_ds(y_true, y_pred_bd, targets, full_range) if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.min(vals))


def ubw_dispersibility(y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, num_classes: int) -> float:
    """D_p: mean over source classes of the natural-log entropy of their backdoor prediction histogram."""
    y_true, y_pred = _t(y_true), _t(y_pred_bd)
    ents = []
    for c in range(num_classes):
        preds = y_pred[y_true == c]
        if len(preds) == 0:
            continue
        p = torch.bincount(preds, minlength=num_classes).double() / len(preds)
        p = p[p > 0]
        ents.append(float(-(p * p.log()).sum()))
    return float(np.mean(ents)) if ents else float("nan")


def psnr_per_image(clean: torch.Tensor, backdoor: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image pair, data range 1; identical images are capped at 100 dB."""
    mse = ((backdoor.float() - clean.float()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def linf_per_image(clean: torch.Tensor, backdoor: torch.Tensor) -> torch.Tensor:
    return (backdoor.float() - clean.float()).abs().flatten(1).amax(1)


def ssim_per_image(clean: torch.Tensor, backdoor: torch.Tensor) -> np.ndarray:
    """SSIM of each pair with scikit-image's default (7x7 uniform window, data range 1)."""
    a = clean.float().cpu().numpy()
    b = backdoor.float().cpu().numpy()
    win = min(7, a.shape[-1] - (1 - a.shape[-1] % 2))  # odd window no larger than the image
    return np.array([
        structural_similarity(a[i], b[i], data_range=1.0, channel_axis=0, win_size=win) for i in range(len(a))
    ])


def compute_metrics(
    y_true: torch.Tensor | np.ndarray, y_pred_clean: torch.Tensor | np.ndarray,
    y_pred_bd: torch.Tensor | np.ndarray | None, targets: torch.Tensor | None, full_range: bool,
) -> dict[str, float | list[float]]:
    """The label-based metrics of one run; backdoor keys are NaN for a clean model."""
    k = targets.shape[0] if targets is not None else int(max(_t(y_true).max(), _t(y_pred_clean).max())) + 1
    out: dict[str, float | list[float]] = {"ca": accuracy(y_true, y_pred_clean)}
    if y_pred_bd is None or targets is None:
        out.update(asr=float("nan"), asr_c=float("nan"), ds=float("nan"), ds_min=float("nan"), d_p=float("nan"))
        return out
    ds, ds_min = dispersibility_score(y_true, y_pred_bd, targets, full_range)
    out.update(
        asr=attack_success_rate(y_true, y_pred_bd, targets),
        asr_c=attack_success_rate(y_true, y_pred_bd, targets, y_pred_clean),
        ds=ds, ds_min=ds_min, d_p=ubw_dispersibility(y_true, y_pred_bd, k),
        ds_per_class=per_class_ds(y_true, y_pred_bd, targets, full_range),
    )
    return out
