"""STRIP (Gao et al., ACSAC 2019): a trojaned input stays confidently classified when blended
with other images, so its predictions have *low entropy* across perturbations.

For each input x and N held-out clean images x_i, classify clip(x + x_i, 0, 1) (plain sum with
weight 1 each, as the original code's ``cv2.addWeighted(.., 1, .., 1, 0)`` saturates; alpha
blending is an option) and average the base-2 entropies of the N softmax outputs. The
threshold is the FRR-quantile (1%) of a normal fitted to the entropies of clean calibration
images; inputs below it are flagged.

defense.json: ``auroc`` (ROC AUC of -entropy separating backdoor from clean test inputs),
``auroc_high_entropy`` (the same with +entropy: the tail STRIP does not test),
``far_at_frr_1pct`` (share of backdoor inputs *not* flagged at that threshold),
``frr_measured`` (share of clean test inputs flagged), ``threshold``, and the per-input
entropy arrays ``entropy_clean`` / ``entropy_backdoor`` (paper Fig. 6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from .base import AttackRun, Defense, DefenseResult, check_param, register
from .plots import plot_strip


@torch.inference_mode()
def strip_entropy(run: AttackRun, x: torch.Tensor, overlays: torch.Tensor, blend: str = "sum", alpha: float = 0.5,
                  chunk_images: int = 8192) -> torch.Tensor:
    """Mean base-2 prediction entropy of each input over its superimpositions with ``overlays``."""
    n = len(overlays)
    per = max(1, chunk_images // n)
    out = []
    for xb in x.split(per):
        if blend == "sum":
            mix = (xb[:, None] + overlays[None]).clamp_(0.0, 1.0)
        else:
            mix = alpha * xb[:, None] + (1 - alpha) * overlays[None]
        p = run.logits(mix.flatten(0, 1)).softmax(1)
        ent = -(p * p.clamp_min(1e-12).log2()).sum(1)
        out.append(ent.view(len(xb), n).mean(1))
    return torch.cat(out).cpu()


@register
class Strip(Defense):
    name = "strip"
    needs_trigger = True

    @classmethod
    def headline(cls, f: dict) -> str:
        high = f" (high-entropy AUROC {f['auroc_high_entropy']:.3f})" if "auroc_high_entropy" in f else ""
        return f"AUROC {f['auroc']:.3f}, FAR@FRR1% {f['far_at_frr_1pct']:.3f}{high}"

    def __init__(self, n_overlay: int = 100, n_eval: int = 1000, n_calib: int = 1000, frr: float = 0.01,
                 blend: str = "sum", alpha: float = 0.5, seed: int = 0) -> None:
        super().__init__(seed)
        for name, v in (("n_overlay", n_overlay), ("n_eval", n_eval), ("n_calib", n_calib)):
            check_param(name, isinstance(v, int) and v >= 2, "an integer >= 2", v)
        check_param("frr", 0 < frr < 0.5, "in (0, 0.5)", frr)
        check_param("blend", blend in ("sum", "alpha"), "sum or alpha", blend)
        check_param("alpha", 0 < alpha < 1, "in (0, 1)", alpha)
        self.n_overlay, self.n_eval, self.n_calib, self.frr, self.blend, self.alpha = n_overlay, n_eval, n_calib, frr, blend, alpha

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        held, _ = run.clean_train(self.n_overlay + self.n_calib, seed=self.seed)
        overlays, calib = held[: self.n_overlay], held[self.n_overlay:]
        x, _ = run.attacked_test(self.n_eval, seed=self.seed)
        ent = lambda z: strip_entropy(run, z, overlays, self.blend, self.alpha).numpy()  # noqa: E731
        e_calib, e_clean, e_bd = ent(calib), ent(x), ent(run.backdoor(x))
        mu, sigma = float(e_calib.mean()), float(e_calib.std(ddof=1))
        threshold = float(norm.ppf(self.frr, loc=mu, scale=max(sigma, 1e-12)))
        labels = np.r_[np.zeros(len(e_clean)), np.ones(len(e_bd))]
        fields = {
            "auroc": float(roc_auc_score(labels, -np.r_[e_clean, e_bd])),
            # the opposite tail, which STRIP does not test: a backdoor that spreads its predictions
            # (CUBA) can give *higher* entropy than clean inputs; an adaptive defender would look here
            "auroc_high_entropy": float(roc_auc_score(labels, np.r_[e_clean, e_bd])),
            "far_at_frr_1pct" if self.frr == 0.01 else f"far_at_frr_{self.frr:g}": float((e_bd >= threshold).mean()),
            "frr_measured": float((e_clean < threshold).mean()),
            "threshold": threshold, "calib_mean": mu, "calib_std": sigma, "trigger": run.trigger_kind,
            "entropy_clean": e_clean.round(5).tolist(), "entropy_backdoor": e_bd.round(5).tolist(),
        }
        fig = plot_strip(e_clean, e_bd, threshold, out / "strip_entropy.png", title=f"STRIP on {run.cfg.label()}: AUROC {fields['auroc']:.3f}")
        return DefenseResult(self.name, fields, self.params, [fig])
