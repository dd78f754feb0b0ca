"""Attack metrics with the fixed definitions of METHOD.md §2.

All functions take plain label tensors/arrays so they can be recomputed from a saved
``predictions.npz`` without the models (``cuba evaluate``).

* CA  -- accuracy on clean test images.
* ASR -- share of backdoor test images whose prediction satisfies the variant's success rule:
  prediction in T(y) (for FRA, T(y) = every class but y, i.e. prediction != y). Images whose
  class has an empty T(y) -- the target class of an all-to-one attack -- are not attacked and
  are left out. ASR-C is the same restricted to images the model classifies correctly when clean,
  ``asr_clean_wrong`` restricted to those it misclassifies; ``asr_pred`` counts a prediction in
  T(y_hat) of the clean prediction y_hat instead of T(y) (:func:`asr_relative_to_prediction`).
* DS  -- per source class c, over the *successful* backdoor images of c: with H_c the classes
  the predictions should spread over (all K for FRA, T(c) for NRA) and p_j the share of those
  predictions on class j, DS_c = 1 - sqrt(mean_{j in H_c} (p_j - 1/|H_c|)^2). Headline DS is
  the mean of DS_c over source classes that have at least one successful image; DS-min their min.
* DS on its own scale -- DS alone does not compare across data sets: its range depends on |H_c|
  and its ceiling on how many successful images a class has (a finite sample of a perfectly
  uniform attacker is never exactly uniform). So every DS comes with two reference points,
  computed over the same source classes and with the same H_c as the headline DS:

  - ``ds_floor``: the DS of total collapse onto one class, 1 - sqrt(|H_c| - 1) / |H_c|, averaged
    over the classes (0.70 at K = 10, 0.849 at K = 43, 0.90 at K = 100 for FRA);
  - ``ds_uniform``: the expected DS of an attacker whose n_c successful predictions for class c
    (n_c taken from this run) are drawn i.i.d. uniformly from T(c), averaged over the classes.
    Exact (enumerating every histogram) when there are few histograms, otherwise a fixed-seed
    simulation of :data:`UNIFORM_DRAWS` multinomial draws, so a run's value never changes.
    A balanced deterministic assignment can exceed it (up to 1 - 1/(K sqrt(K-1)) for FRA).

  A DS near ``ds_floor`` means collapse; near ``ds_uniform`` means "as spread as random".
* effective classes -- per source class, e^(natural-log entropy) of the histogram of its
  *successful* backdoor predictions: the number of classes the predictions are really spread
  over (9 for a uniform FRA at K = 10, 1 for a collapse). Unlike DS its scale does not depend on
  K, so it reads the same on MNIST and CIFAR-100. ``effective_classes`` is the mean over classes
  with a successful image, ``effective_classes_per_class`` the list (NaN where none).
* D_p -- UBW's dispersibility: per source class, the natural-log entropy of the histogram of
  the predictions of all its backdoor images, averaged over classes.
* PSNR / SSIM / L-inf -- stealth of x* against x, per image, on pixel values in [0, 1].
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from scipy.special import gammaln
from skimage.metrics import structural_similarity

# simulated draws per class for ds_uniform when exact enumeration is too large (>= 1,000 asked by
# METHOD.md; 4,000 puts the Monte-Carlo error of the mean around 1e-4, far under any DS gap we read)
UNIFORM_DRAWS = 4000
# enumerate the multinomial exactly while it has at most this many histograms (cheap, and exact
# values make small cases hand-checkable)
EXACT_LIMIT = 20_000
UNIFORM_SEED = 0


def _t(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).long().flatten()


def at_chance(ca: float | None, num_classes: int | None) -> bool:
    """The one chance-level rule (training, compare, tables, defenses): clean accuracy under twice
    chance, 2/K. Such a model has (nearly) stopped classifying, so every backdoor image "succeeds"
    for free and an ASR or DS measured on it no longer means a backdoor."""
    return ca is not None and bool(num_classes) and ca < 2.0 / num_classes


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


def _success_share(y_true, y_pred_bd, targets: torch.Tensor, keep: torch.Tensor) -> float:
    """Share of successful backdoor predictions among the images ``keep`` selects (NaN if none)."""
    ok = success_mask(y_true, y_pred_bd, targets)[keep]
    return float(ok.float().mean()) if len(ok) else float("nan")


def attack_success_rate(
    y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, targets: torch.Tensor,
    y_pred_clean: torch.Tensor | np.ndarray | None = None,
) -> float:
    """ASR; with ``y_pred_clean`` given, ASR-C (only images classified correctly when clean)."""
    keep = attacked_mask(y_true, targets)
    if y_pred_clean is not None:
        keep &= _t(y_true) == _t(y_pred_clean)
    return _success_share(y_true, y_pred_bd, targets, keep)


def asr_clean_wrong(
    y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, targets: torch.Tensor,
    y_pred_clean: torch.Tensor | np.ndarray,
) -> float:
    """ASR over the attacked images the model *misclassifies* when clean (ASR-C's complement):
    ASR = CA' * ASR-C + (1 - CA') * this, with CA' the clean accuracy on attacked images."""
    keep = attacked_mask(y_true, targets) & (_t(y_true) != _t(y_pred_clean))
    return _success_share(y_true, y_pred_bd, targets, keep)


def asr_relative_to_prediction(
    y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, targets: torch.Tensor,
    y_pred_clean: torch.Tensor | np.ndarray,
) -> float:
    """``asr_pred``: share of attacked backdoor images whose prediction lies in T(y_hat), y_hat the
    model's *clean* prediction, instead of T(y).

    Why: the backdoor can only be keyed to the class the model perceives. On an image it
    misclassifies clean as y_hat, the trigger sends it into T(y_hat), which for NRA seldom meets
    T(y); a paper that reports near-perfect NRA success at imperfect clean accuracy may have
    measured this (or ASR-C) rather than ASR. Images whose T(y_hat) is empty (an all-to-one
    target class predicted clean) are left out.
    """
    t = targets.bool()
    yc = _t(y_pred_clean)
    keep = attacked_mask(y_true, targets) & t.any(dim=1)[yc]
    ok = t[yc, _t(y_pred_bd)][keep]
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


def ds_floor_of(h: int) -> float:
    """DS of total collapse onto one class of H: p is one-hot, mean sq = (h-1)/h^2."""
    if int(h) != h or h < 1:
        raise ValueError(f"ds_floor: |H| must be a whole number >= 1, got {h!r}")
    return 1.0 - math.sqrt(h - 1) / h


def _compositions(n: int, m: int) -> np.ndarray:
    """Every way to put n balls into m boxes, as a (C(n+m-1, m-1), m) count array (stars and bars)."""
    from itertools import combinations

    if m == 1:
        return np.array([[n]], dtype=np.int64)
    bars = np.array(list(combinations(range(n + m - 1), m - 1)), dtype=np.int64).reshape(-1, m - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), n + m - 1)], axis=1)
    return np.diff(edges, axis=1) - 1


@lru_cache(maxsize=4096)  # classes with equal (n, |T|, |H|) -- common in balanced test sets -- cost one draw
def expected_uniform_ds(
    n: int, m: int, h: int, draws: int = UNIFORM_DRAWS, seed: int = UNIFORM_SEED, exact_limit: int = EXACT_LIMIT,
) -> float:
    """E[DS_c] when n predictions fall i.i.d. uniformly on m target classes and DS_c is read over
    h >= m classes (the h - m others, e.g. the true class under FRA, get none of them).

    Exact when the multinomial has at most ``exact_limit`` outcomes, otherwise the mean over
    ``draws`` vectorised draws of a generator seeded by (seed, n, m, h): the same inputs always
    give the same value, whichever other classes a run has.
    """
    if n < 1 or m < 1 or h < m:
        raise ValueError(f"ds_uniform: needs n >= 1 successful images and 1 <= |T| <= |H|, got n={n}, |T|={m}, |H|={h}")
    if draws < 1:
        raise ValueError(f"ds_uniform: draws must be >= 1, got {draws}")
    if math.comb(n + m - 1, m - 1) <= exact_limit:
        counts = _compositions(n, m)
        logp = gammaln(n + 1) - gammaln(counts + 1).sum(1) - n * math.log(m)
        weights = np.exp(logp)
    else:
        rng = np.random.default_rng([seed, n, m, h])
        counts = rng.multinomial(n, np.full(m, 1.0 / m), size=draws)
        weights = np.full(len(counts), 1.0 / len(counts))
    sq = ((counts / n - 1.0 / h) ** 2).sum(1) + (h - m) / h**2  # the h - m untargeted classes: p = 0
    return float((weights * (1.0 - np.sqrt(sq / h))).sum() / weights.sum())


def _class_counts(y_true, y_pred_bd, targets: torch.Tensor) -> np.ndarray:
    """(K, K) histogram: row c counts the successful backdoor predictions of source class c."""
    y_true, y_pred = _t(y_true), _t(y_pred_bd)
    k = targets.shape[0]
    ok = success_mask(y_true, y_pred, targets)
    return torch.bincount(y_true[ok] * k + y_pred[ok], minlength=k * k).reshape(k, k).numpy()


def ds_reference(
    y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, targets: torch.Tensor, full_range: bool,
    draws: int = UNIFORM_DRAWS, seed: int = UNIFORM_SEED,
) -> tuple[float, float]:
    """(ds_floor, ds_uniform) over the source classes that enter the headline DS (>= 1 success),
    with H_c = K when ``full_range`` else T(c), each averaged over those classes like DS."""
    counts = _class_counts(y_true, y_pred_bd, targets)
    t = targets.bool().numpy()
    k = t.shape[0]
    floors, uniforms = [], []
    for c in range(k):
        n = int(counts[c].sum())
        if n == 0:
            continue
        m = int(t[c].sum())
        h = k if full_range else m
        floors.append(ds_floor_of(h))
        uniforms.append(expected_uniform_ds(n, m, h, int(draws), int(seed)))
    if not floors:
        return float("nan"), float("nan")
    return float(np.mean(floors)), float(np.mean(uniforms))


def effective_classes_per_class(
    y_true: torch.Tensor | np.ndarray, y_pred_bd: torch.Tensor | np.ndarray, targets: torch.Tensor,
) -> list[float]:
    """exp(entropy) of each source class's histogram of successful predictions; NaN without one."""
    out = []
    for row in _class_counts(y_true, y_pred_bd, targets):
        n = row.sum()
        if n == 0:
            out.append(float("nan"))
            continue
        p = row[row > 0] / n
        out.append(float(np.exp(-(p * np.log(p)).sum())))
    return out


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


# the scalar metrics that only exist for a backdoored model (NaN for a clean one)
BACKDOOR_KEYS = ("asr", "asr_c", "asr_clean_wrong", "asr_pred", "ds", "ds_min", "d_p", "ds_floor", "ds_uniform", "effective_classes")


def compute_metrics(
    y_true: torch.Tensor | np.ndarray, y_pred_clean: torch.Tensor | np.ndarray,
    y_pred_bd: torch.Tensor | np.ndarray | None, targets: torch.Tensor | None, full_range: bool,
) -> dict[str, float | list[float]]:
    """The label-based metrics of one run; backdoor keys are NaN for a clean model."""
    k = targets.shape[0] if targets is not None else int(max(_t(y_true).max(), _t(y_pred_clean).max())) + 1
    out: dict[str, float | list[float]] = {"ca": accuracy(y_true, y_pred_clean)}
    if y_pred_bd is None or targets is None:
        out.update({key: float("nan") for key in BACKDOOR_KEYS})
        return out
    ds, ds_min = dispersibility_score(y_true, y_pred_bd, targets, full_range)
    floor, uniform = ds_reference(y_true, y_pred_bd, targets, full_range)
    eff = effective_classes_per_class(y_true, y_pred_bd, targets)
    eff_seen = [v for v in eff if not math.isnan(v)]
    out.update(
        asr=attack_success_rate(y_true, y_pred_bd, targets),
        asr_c=attack_success_rate(y_true, y_pred_bd, targets, y_pred_clean),
        asr_clean_wrong=asr_clean_wrong(y_true, y_pred_bd, targets, y_pred_clean),
        asr_pred=asr_relative_to_prediction(y_true, y_pred_bd, targets, y_pred_clean),
        ds=ds, ds_min=ds_min, d_p=ubw_dispersibility(y_true, y_pred_bd, k),
        ds_floor=floor, ds_uniform=uniform,
        effective_classes=float(np.mean(eff_seen)) if eff_seen else float("nan"),
        ds_per_class=per_class_ds(y_true, y_pred_bd, targets, full_range),
        effective_classes_per_class=eff,
    )
    return out
