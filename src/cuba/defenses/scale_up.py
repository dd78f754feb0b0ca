"""SCALE-UP (Guo et al., ICLR 2023): a backdoor input keeps its prediction when its pixel values
are amplified, because the trigger's features dominate the decision; a clean input's prediction
drifts. A black-box, input-level detector: it needs only the model's predicted labels.

For an input x with prediction c = F(x) and each factor n in ``scales`` (default 3, 5, 7, 9, 11,
the public implementations' set), classify clip(n * x, 0, 1) in pixel space [0, 1] (our
classifiers normalise their input themselves). The *scaled prediction consistency* is
SPC(x) = share of the factors whose prediction is still c. High SPC is flagged: SPC > ``threshold``
(0.5) in the data-free mode. With ``standardize`` (the paper's data-limited mode) SPC is replaced
by its z-score against clean training images *of the same predicted class* (classes with fewer
than two such images use the global mean and std), and the threshold applies to that z-score.

defense.json: ``auroc`` (score separating backdoor from clean *test* inputs; higher =
backdoor), ``tpr_at_fpr_5pct``, ``flagged_backdoor`` / ``flagged_clean`` (shares above the
threshold), ``auroc_low_spc`` (the opposite tail: a backdoor whose prediction is a near-tie
between classes -- CUBA's -- may drift *more* than clean inputs), and the per-input scores
``spc_clean`` / ``spc_backdoor`` (raw SPC, before any standardisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import AttackRun, Defense, DefenseResult, check_param, register, roc_summary
from .plots import plot_scores


@torch.inference_mode()
def scaled_consistency(run: AttackRun, x: torch.Tensor, scales: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(SPC of every input, its prediction on the unscaled input), both on the CPU."""
    base = run.logits(x).argmax(1)
    same = torch.zeros(len(x), device=base.device)
    for n in scales:
        same += (run.logits((x * n).clamp_(0.0, 1.0)).argmax(1) == base).float()
    return (same / len(scales)).cpu(), base.cpu()


def standardize_by_class(spc: torch.Tensor, pred: torch.Tensor, ref_spc: torch.Tensor, ref_pred: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """z-score of each SPC against the reference (clean) SPCs of its predicted class."""
    g_mean, g_std = ref_spc.mean(), ref_spc.std().clamp_min(1e-6)
    mean = torch.full((num_classes,), float(g_mean))
    std = torch.full((num_classes,), float(g_std))
    for c in range(num_classes):
        sel = ref_spc[ref_pred == c]
        if len(sel) >= 2:
            mean[c], std[c] = sel.mean(), sel.std().clamp_min(1e-6)
    return (spc - mean[pred]) / std[pred]


@register
class ScaleUp(Defense):
    name = "scale-up"
    needs_trigger = True

    @classmethod
    def headline(cls, f: dict) -> str:
        return f"AUROC {f['auroc']:.3f}, TPR@FPR5% {f['tpr_at_fpr_5pct']:.3f} (low-SPC AUROC {f['auroc_low_spc']:.3f})"

    def __init__(self, scales: tuple[float, ...] = (3, 5, 7, 9, 11), threshold: float = 0.5, standardize: bool = False,
                 n_eval: int = 1000, n_ref: int = 1000, seed: int = 0) -> None:
        super().__init__(seed)
        scales = tuple(scales) if isinstance(scales, (list, tuple)) else (scales,)
        check_param("scales", len(scales) >= 1 and all(isinstance(n, (int, float)) and n > 1 for n in scales),
                    "a list of amplification factors > 1", scales)
        for name, v in (("n_eval", n_eval), ("n_ref", n_ref)):
            check_param(name, isinstance(v, int) and v >= 2, "an integer >= 2", v)
        check_param("threshold", isinstance(threshold, (int, float)) and np.isfinite(threshold), "a finite number", threshold)
        self.scales, self.threshold, self.standardize = tuple(float(n) for n in scales), float(threshold), bool(standardize)
        self.n_eval, self.n_ref = n_eval, n_ref

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        x, _ = run.attacked_test(self.n_eval, seed=self.seed)
        spc_clean, pred_clean = scaled_consistency(run, x, self.scales)
        spc_bd, pred_bd = scaled_consistency(run, run.backdoor(x), self.scales)
        s_clean, s_bd = spc_clean, spc_bd
        if self.standardize:  # the defender's few clean images per class come from the training set
            ref, _ = run.clean_train(self.n_ref, seed=self.seed)
            ref_spc, ref_pred = scaled_consistency(run, ref, self.scales)
            s_clean = standardize_by_class(spc_clean, pred_clean, ref_spc, ref_pred, run.num_classes)
            s_bd = standardize_by_class(spc_bd, pred_bd, ref_spc, ref_pred, run.num_classes)
        s_clean, s_bd = s_clean.numpy(), s_bd.numpy()
        fields = {
            **roc_summary(s_clean, s_bd),
            "auroc_low_spc": roc_summary(-s_clean, -s_bd)["auroc"],
            "flagged_backdoor": float((s_bd > self.threshold).mean()), "flagged_clean": float((s_clean > self.threshold).mean()),
            "trigger": run.trigger_kind,
            "spc_clean": spc_clean.double().numpy().round(4).tolist(), "spc_backdoor": spc_bd.double().numpy().round(4).tolist(),
        }
        # SPC takes len(scales) + 1 values: one bin per value keeps the histogram honest
        bins = None if self.standardize else np.linspace(-0.5, len(self.scales) + 0.5, len(self.scales) + 2) / len(self.scales)
        fig = plot_scores(s_clean, s_bd, self.threshold, out / "scale_up_spc.png",
                          "SPC z-score (per predicted class)" if self.standardize else "scaled prediction consistency (SPC)",
                          f"threshold ({self.threshold:g})", f"SCALE-UP on {run.cfg.label()}: AUROC {fields['auroc']:.3f}",
                          **({} if bins is None else {"bins": bins}))
        return DefenseResult(self.name, fields, self.params, [fig])
