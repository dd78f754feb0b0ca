"""The defenses' figures: STRIP histograms (paper Fig. 6), Neural Cleanse norms (Fig. 7a),
SentiNet scatter and Grad-CAM maps (Fig. 7b), Fine-pruning / NAD curves (Table III as a plot),
the score histograms of other input-level detectors (SCALE-UP, entropy, Cognitive Distillation,
IBD-PSC), MM-BD's per-class maximum margins, Cognitive Distillation's masks and the budget curves
of trigger inversion and dispersion inversion. Kept here, away from the detectors, so that a
detector's module holds its method and numbers and matplotlib is set up in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..figures import save_figure as _save  # noqa: E402


def plot_scores(s_clean: np.ndarray, s_bd: np.ndarray, threshold: float, path: Path, xlabel: str,
                threshold_label: str, title: str = "", bins: int | np.ndarray = 40,
                band: tuple[float, float] | None = None, band_label: str = "") -> Path:
    """Histograms of an input-level detector's score on clean and backdoor inputs, with its threshold
    and, with ``band``, the (lower, upper) thresholds of a two-sided rule (dotted)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if isinstance(bins, int):
        bins = np.linspace(min(0.0, float(np.min(s_clean)), float(np.min(s_bd))),
                           max(float(np.max(s_clean)), float(np.max(s_bd)), 1e-3), bins)
    ax.hist(s_clean, bins=bins, alpha=0.6, density=True, label="clean inputs")
    ax.hist(s_bd, bins=bins, alpha=0.6, density=True, label="backdoor inputs")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=threshold_label)
    if band is not None:
        for i, t in enumerate(band):
            ax.axvline(t, color="tab:red", ls=":", lw=1, label=band_label if i == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_strip(e_clean: np.ndarray, e_bd: np.ndarray, threshold: float, path: Path, title: str = "",
               two_sided: tuple[float, float] | None = None, frr: float = 0.01) -> Path:
    return plot_scores(e_clean, e_bd, threshold, path, "mean entropy over superimpositions (bits)",
                       f"one-sided threshold (FRR {100 * frr:g}%)", title, band=two_sided,
                       band_label=f"two-sided thresholds (FRR {100 * frr:g}%)")


def plot_neural_cleanse(norms: Sequence[float], flagged: Sequence[int], anomaly_index: float, masks: np.ndarray,
                        path: Path, title: str = "") -> Path:
    k = len(norms)
    fig = plt.figure(figsize=(max(6, 0.9 * k), 4.2))
    ax = fig.add_subplot(2, 1, 1)
    colors = ["tab:red" if c in flagged else "tab:blue" for c in range(k)]
    ax.bar(np.arange(k), norms, color=colors)
    ax.axhline(float(np.median(norms)), color="k", ls="--", lw=0.8, label="median")
    ax.set_ylabel("mask L1 norm")
    ax.set_xticks(np.arange(k))
    ax.legend(fontsize=7)
    ax.set_title(title or f"Neural Cleanse: anomaly index {anomaly_index:.2f} (flag > 2; red = flagged)", fontsize=9)
    for c in range(k):
        a = fig.add_subplot(2, k, k + c + 1)
        a.imshow(masks[c], cmap="gray", vmin=0, vmax=1)
        a.set_xticks([])
        a.set_yticks([])
        a.set_xlabel(str(c), fontsize=7)
    return _save(fig, path)


def plot_sentinet(clean: np.ndarray, bd: np.ndarray, coeffs: Sequence[float], path: Path, title: str = "") -> Path:
    """Points are (average confidence on the inert patch, fooled rate); the curve is the fitted boundary."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(clean[:, 0], clean[:, 1], s=6, alpha=0.5, label="clean inputs")
    ax.scatter(bd[:, 0], bd[:, 1], s=6, alpha=0.5, label="backdoor inputs")
    xs = np.linspace(0, 1, 100)
    ax.plot(xs, np.polyval(coeffs, xs), "k--", lw=1, label="boundary")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("average confidence on the inert patch")
    ax.set_ylabel("fooled rate")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_cam_maps(images: np.ndarray, cams: np.ndarray, labels: Sequence[str], path: Path, title: str = "") -> Path:
    """Row 1: images; row 2: their Grad-CAM maps over the image."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2), squeeze=False)
    for i in range(n):
        img = images[i]
        shown = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        for r in range(2):
            axes[r, i].imshow(shown, cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
        axes[1, i].imshow(cams[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[0, i].set_title(labels[i], fontsize=7)
    fig.suptitle(title or "Grad-CAM of the predicted class (SentiNet's saliency)", fontsize=9)
    return _save(fig, path)


def plot_removal(rows: Sequence[dict], x_key: str, path: Path, xlabel: str, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [r[x_key] for r in rows]
    ax.plot(xs, [100 * r["ca"] for r in rows], "o-", label="CA")
    ax.plot(xs, [100 * r["asr"] if r["asr"] is not None else np.nan for r in rows], "s-", label="ASR")
    # ASR-C: over test images the same repaired model still classifies correctly when clean
    if any(r.get("asr_c") is not None for r in rows):
        ax.plot(xs, [100 * r["asr_c"] if r.get("asr_c") is not None else np.nan for r in rows], "^-", label="ASR-C")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_mm_bd(stats: Sequence[float], detected: int, flagged: bool, critical: float | None, path: Path,
               title: str = "") -> Path:
    """MM-BD's maximum-margin statistic per class: the largest bar is red when the model is
    flagged, and the dashed line is the largest value the fitted null would still accept."""
    k = len(stats)
    fig, ax = plt.subplots(figsize=(min(12, max(5, 0.4 * k)), 3.2))
    colors = ["tab:red" if (c == detected and flagged) else "tab:blue" for c in range(k)]
    ax.bar(np.arange(k), stats, color=colors)
    if critical is not None:
        ax.axhline(critical, color="k", ls="--", lw=1, label="critical value of the largest (Gamma null)")
        ax.legend(fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("maximum logit margin")
    if k <= 50:  # beyond that the labels overlap
        ax.set_xticks(np.arange(k))
    ax.set_title(title or "MM-BD maximum-margin statistics (red = flagged)", fontsize=9)
    return _save(fig, path)


def plot_distilled_masks(clean: np.ndarray, m_clean: np.ndarray, bd: np.ndarray, m_bd: np.ndarray, path: Path,
                         title: str = "") -> Path:
    """Cognitive Distillation: rows are clean inputs, their masks, backdoor twins, their masks (each
    mask's L1 norm under it), so a reader sees *what* part of an input the model keeps."""
    n = len(clean)
    fig, axes = plt.subplots(4, max(n, 1), figsize=(1.3 * max(n, 1), 5.6), squeeze=False)
    rows = ((clean, "clean"), (m_clean, "mask"), (bd, "backdoor"), (m_bd, "mask"))
    for r, (imgs, label) in enumerate(rows):
        for i in range(n):
            img, ax = imgs[i], axes[r, i]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if label == "mask":
                ax.set_xlabel(f"L1 {float(np.abs(img).sum()):.1f}", fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title or "Cognitive Distillation masks", fontsize=9)
    return _save(fig, path)


def plot_trigger_inversion(budgets: Sequence[float], rate_fit: Sequence[float | None], rate_holdout: Sequence[float | None],
                           target: float, score: float | None, delta: np.ndarray | None, path: Path,
                           title: str = "") -> Path:
    """Untargeted trigger inversion: the flip rate of the best universal perturbation per L-inf
    budget (log axis, in 1/255), with the target line; beside it the perturbation found at the
    score budget (grey = 0), when one reached the target."""
    fig, (ax, ax_img) = plt.subplots(1, 2, figsize=(7.5, 3.2), gridspec_kw={"width_ratios": [2.2, 1]})
    nan = lambda v: [np.nan if r is None else r for r in v]  # noqa: E731  (budgets not run: stopped at the target)
    ax.plot(budgets, nan(rate_fit), "o-", label="fit inputs")
    ax.plot(budgets, nan(rate_holdout), "s-", label="held-out inputs")
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target {100 * target:g}%")
    if score is not None:
        ax.axvline(score, color="tab:red", ls=":", lw=1, label=f"score {score:g}/255")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(budgets), [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("L-inf budget (1/255)")
    ax.set_ylabel("flip rate (prediction leaves its class)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    if delta is not None:
        lim = max(float(np.abs(delta).max()), 1e-12)
        shown = delta.mean(0) if delta.shape[0] > 1 else delta[0]
        ax_img.imshow(shown, cmap="gray", vmin=-lim, vmax=lim)
        ax_img.set_title("perturbation at the score budget" + (" (channel mean)" if delta.shape[0] > 1 else ""), fontsize=7)
    else:
        ax_img.set_title("target not reached", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_budget_curve(rows: list[dict[str, Any]], target_rate: float, target_dispersion: float, score: float | None,
                      cutoff: float | None, path: Path, title: str = "") -> Path:
    """Dispersion inversion's figure: flip rate and dispersion against the budget (in /255, log
    scale), with the two targets, the score (solid) and the reference cutoff (dashed) when there is one."""
    eps = [r["eps_255"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(eps, [r["flip_rate"] for r in rows], "o-", label="flip rate")
    ax.plot(eps, [r["dispersion"] for r in rows], "s-", label="dispersion")
    ax.axhline(target_rate, color="tab:blue", ls=":", lw=1, label=f"target flip rate ({target_rate:g})")
    ax.axhline(target_dispersion, color="tab:orange", ls=":", lw=1, label=f"target dispersion ({target_dispersion:g})")
    if score is not None:
        ax.axvline(score * 255, color="k", lw=1, label=f"score ({score * 255:.3g}/255)")
    if cutoff is not None:
        ax.axvline(cutoff * 255, color="tab:red", ls="--", lw=1, label=f"reference cutoff ({cutoff * 255:.3g}/255)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("budget eps of the universal perturbation (x/255, L-inf)")
    ax.set_ylabel("share / normalised entropy")
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_detector_matrix(rows: Sequence[str], cols: Sequence[str], share: Sequence[Sequence[float | None]],
                         text: Sequence[Sequence[str]], path: Path, title: str = "") -> Path:
    """The detector matrix folded over seeds as a heatmap (:func:`cuba.defenses.summary.win_shares`):
    green where a detector's own rule won for the defender on every model of a group it decided, red
    where on none, grey where it decided nothing (n/a, no verdict, imported models), hatched where
    some models were left undecided or the detector did not apply to them; each cell's text says on how many models it won and, for an
    input-level detector, the mean AUROC. A reader sees at a glance which detector holds against which attack."""
    values = np.array([[np.nan if v is None else v for v in r] for r in share], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 1.05 * len(cols)), 1.2 + 0.55 * len(rows)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")  # grey: n/a or no verdict
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(text):
        for j, t in enumerate(row):
            ax.text(j, i, t, ha="center", va="center", fontsize=7)
            if share[i][j] is not None and ("\nno verdict" in t or "\nn/a" in t):  # some models not decided
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", lw=0, color="0.35"))
    ax.set_xticks(np.arange(len(cols)), labels=list(cols), rotation=35, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(rows)), labels=list(rows), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02).set_label("share of decided models where the rule won", fontsize=8)
    ax.set_title(title or "each detector's own rule, folded over seeds\n(won on k of the group's n models; hatched: some "
                 "undecided or n/a; input-level: mean AUROC)", fontsize=9)
    return _save(fig, path)
