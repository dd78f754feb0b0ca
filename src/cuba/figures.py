"""Figures of a run: triggers (paper Fig. 4), the confidences of backdoor images (Fig. 5) and
backdoor prediction histograms per source class (our companion to Fig. 5; Fig. 8 compares runs)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .metrics import per_class_ds  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Lay out, write (atomically: a killed run never leaves half a PNG) and close a figure; return its path."""
    from .runs import _atomic_write

    fig.tight_layout()
    _atomic_write(path, lambda t: fig.savefig(t, dpi=120, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def _show(ax: plt.Axes, img: np.ndarray) -> None:
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_triggers(clean: torch.Tensor, backdoor: torch.Tensor, path: Path, labels: list[str] | None = None) -> Path:
    """Rows: clean images, backdoor images, |x* - x| amplified to the full range (per image)."""
    clean, backdoor = clean.float().cpu().numpy(), backdoor.float().cpu().numpy()
    n = len(clean)
    res = np.abs(backdoor - clean)
    scale = res.reshape(n, -1).max(1).clip(min=1e-8)
    amp = res / scale[:, None, None, None]
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
    for i in range(n):
        _show(axes[0, i], clean[i])
        _show(axes[1, i], backdoor[i])
        _show(axes[2, i], amp[i])
        axes[2, i].set_xlabel(f"x{1 / scale[i]:.0f}", fontsize=7)
        if labels:
            axes[0, i].set_title(labels[i], fontsize=7)
    for r, name in enumerate(("clean", "backdoor", "residual")):
        axes[r, 0].set_ylabel(name)
    fig.suptitle("Clean images, backdoor images, and |x* - x| (amplified by the factor shown)", fontsize=9)
    return save_figure(fig, path)


def plot_confidences(probs: np.ndarray, labels: np.ndarray, targets: torch.Tensor, path: Path,
                     classes: list[str] | None = None, title: str = "") -> Path:
    """Paper Fig. 5: the softmax vector of a few backdoor images per true class, one row per image.

    A heatmap (rows: images grouped by true class; columns: output classes) instead of the paper's
    bars, so 30 confidence vectors fit in one readable figure. Cells of the true class are
    outlined in blue, the target set's columns carry the numbers; a CUBA FRA row should read
    about 1/9 everywhere but its own class, a targeted backdoor a single bright cell.
    """
    n, k = probs.shape
    names = classes or [str(j) for j in range(k)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.9 + 0.24 * n))
    # colour up to the largest confidence shown (at least 0.2): CUBA's ~1/9 rows stay readable
    im = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=max(0.2, float(probs.max())), aspect="auto")
    for i in range(n):
        y = int(labels[i])
        ax.add_patch(plt.Rectangle((y - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:blue", lw=1.5))
        if k <= 12:
            for j in np.nonzero(targets[y].numpy())[0]:
                ax.text(j, i, f"{probs[i, j]:.2f}", ha="center", va="center", fontsize=5,
                        color="white" if probs[i, j] < 0.6 * max(0.2, float(probs.max())) else "black")
    ax.set_xticks(np.arange(k), names, fontsize=6, rotation=90 if k > 10 else 0)
    ax.set_yticks(np.arange(n), [names[int(c)] for c in labels], fontsize=6)
    ax.set_xlabel("output class")
    ax.set_ylabel("true class of the backdoor image")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="softmax confidence")
    ax.set_title(title or "Confidence of backdoor images (blue box: true class)", fontsize=9)
    return save_figure(fig, path)


def _source_bars(ax: plt.Axes, y_true: np.ndarray, y_pred: np.ndarray, targets: torch.Tensor, source: int) -> np.ndarray:
    """Bar chart of where the backdoor images of ``source`` were classified (red: T(source), blue: itself)."""
    k = targets.shape[0]
    preds = y_pred[y_true == source]
    share = np.bincount(preds, minlength=k) / max(1, len(preds))
    colors = np.where(targets[source].numpy(), "tab:red", "tab:gray")
    colors[source] = "tab:blue"
    ax.bar(np.arange(k), share, color=colors)
    return share


def plot_histograms(
    y_true: np.ndarray, y_pred_bd: np.ndarray, targets: torch.Tensor, full_range: bool, path: Path,
    classes: list[str] | None = None, max_sources: int = 10, title: str = "",
) -> Path:
    """One bar chart per source class: where its backdoor images were classified; target set in colour."""
    k = targets.shape[0]
    ds = per_class_ds(y_true, y_pred_bd, targets, full_range)
    sources = list(range(min(k, max_sources)))
    cols = min(5, len(sources))
    rows = (len(sources) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    for ax, c in zip(axes.flat, sources):
        share = _source_bars(ax, y_true, y_pred_bd, targets, c)
        name = classes[c] if classes else str(c)
        if targets[c].any():
            ax.axhline(1.0 / targets[c].sum().item(), color="k", lw=0.7, ls="--")
            ax.set_title(f"source {name}: DS_c={ds[c]:.3f}", fontsize=8)
        else:  # the target class of an all-to-one attack is not attacked
            ax.set_title(f"source {name}: not attacked", fontsize=8)
        ax.set_ylim(0, max(0.3, float(share.max()) * 1.1))
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(sources):]:
        ax.axis("off")
    fig.suptitle(title or "Predictions of backdoor images per source class (red: target set, blue: true class; dashed: uniform)", fontsize=9)
    return save_figure(fig, path)


def plot_source_class_comparison(
    entries: list[tuple[str, np.ndarray, np.ndarray, torch.Tensor, bool]], source: int, path: Path,
    classes: list[str] | None = None,
) -> Path:
    """Paper Fig. 8: for one source class, the backdoor prediction histogram of several runs side by side.

    ``entries`` holds (name, y_true, y_pred_backdoor, target matrix, full_range) per run; each
    panel is titled with that run's DS_c for the source class, so the collapse (or its absence)
    reads as a number, not only as a shape.
    """
    n = len(entries)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for ax, (name, y_true, y_pred, targets, full_range) in zip(axes[0], entries):
        k = targets.shape[0]
        _source_bars(ax, y_true, y_pred, targets, source)
        ds_c = per_class_ds(y_true, y_pred, targets, full_range)[source]
        ax.set_title(f"{name}\nDS_{source}={ds_c:.3f}", fontsize=8)
        ax.set_ylim(0, 1.0)
        ax.set_xticks(np.arange(k), [classes[j] if classes else str(j) for j in range(k)], fontsize=6)
    src = classes[source] if classes else str(source)
    fig.suptitle(f"Backdoor predictions of source class {src} (red: target set, blue: true class)", fontsize=9)
    return save_figure(fig, path)


def plot_sweep(rows: list[dict], field: str, path: Path) -> Path:
    """DS, ASR and CA against one swept config field: every seed as a dot, the mean as a line.

    Dots rather than mean ± std error bars: a sweep's failures are bimodal (one seed collapses,
    the others do not), which a std bar hides and even draws above 100%. Log x-axis for wide ranges.
    """
    labels = [str(r[field]) for r in rows]
    try:
        xs = np.array([float(r[field]) for r in rows])
        numeric = True
    except (TypeError, ValueError):  # a field of names (generator_mode, attack): one position per value
        xs, numeric = np.arange(len(rows), dtype=float), False
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0))
    has_val = any(not np.isnan(r.get("val.ds", (np.nan,))[0]) for r in rows)
    for ax, (key, title) in zip(axes, (("ds", "DS %"), ("asr", "ASR %"), ("ca", "CA %"))):
        ax.plot(xs, [r[key][0] for r in rows], marker="o", label="test mean")
        if has_val:  # the sweep's ranking reads these; the test line is what gets reported
            ax.plot(xs, [r.get(f"val.{key}", (np.nan,))[0] for r in rows], marker="s", ls="--", label="validation mean")
        for x, r in zip(xs, rows):
            vals = r.get(f"{key}_values", [])
            ax.scatter([x] * len(vals), vals, s=14, color="0.4", alpha=0.7, zorder=3,
                       label="one seed" if x == xs[0] else None)
        if not numeric:
            ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=7)
        elif len(xs) > 1 and xs.min() > 0 and xs.max() / xs.min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel(field)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    n = sorted({r["n"] for r in rows})
    what = "dots = test, one per seed; lines = means" + ("; settings are chosen on validation" if has_val else "")
    fig.suptitle(f"Sweep over {field} ({'/'.join(map(str, n))} seed(s) per value: {what})", fontsize=9)
    return save_figure(fig, path)
