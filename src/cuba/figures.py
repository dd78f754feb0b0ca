"""Figures of a run: triggers (paper Fig. 4) and backdoor prediction histograms (Figs. 5 and 8)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .metrics import per_class_ds  # noqa: E402


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
        preds = y_pred_bd[y_true == c]
        share = np.bincount(preds, minlength=k) / max(1, len(preds))
        colors = np.where(targets[c].numpy(), "tab:red", "tab:gray")
        colors[c] = "tab:blue"
        ax.bar(np.arange(k), share, color=colors)
        ax.axhline(1.0 / targets[c].sum().item(), color="k", lw=0.7, ls="--")
        name = classes[c] if classes else str(c)
        ax.set_title(f"source {name}: DS_c={ds[c]:.3f}", fontsize=8)
        ax.set_ylim(0, max(0.3, float(share.max()) * 1.1))
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(sources):]:
        ax.axis("off")
    fig.suptitle(title or "Predictions of backdoor images per source class (red: target set, blue: true class; dashed: uniform)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
