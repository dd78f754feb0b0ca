"""SCALE-UP (Guo et al., ICLR 2023): a backdoor input keeps its prediction when its pixel values
are amplified, because the trigger's features dominate the decision; a clean input's prediction
drifts. A black-box, input-level detector: it needs only the model's predicted labels.

For an input x with prediction c = F(x) and each factor n in ``scales`` (default 3, 5, 7, 9, 11,
the public implementations' set), classify clip(n * x, 0, 1) in pixel space [0, 1] (our
classifiers normalise their input themselves). The *scaled prediction consistency* is
SPC(x) = share of the factors whose prediction is still c. High SPC is flagged: SPC > ``threshold``
(0.5) in the data-free mode. With ``standardize`` (the paper's data-limited mode) SPC is replaced
by its z-score against clean *validation* images of the same predicted class (classes with fewer
than two such images use the global mean and std), and the threshold applies to that z-score. The
reference images and the calibration images below are disjoint parts of the validation split (the
same images for both would standardise the calibration scores against themselves: with a class
whose reference SPCs are all equal, every calibration z-score is 0 while a clean test image one
step off is far out).
(Validation, not training, images: the model was fitted on its training images, so their SPC
describes memorised inputs rather than the unseen clean inputs a deployed detector meets.)

Calibrated rules. Every other threshold is fitted on the scores of clean validation images
(:meth:`AttackRun.clean_val`), never on the test inputs it is scored on:

* one-sided (the paper's direction, high SPC = backdoor): flag score > the empirical 95% quantile
  of the validation scores (``tpr_at_fpr_5pct``, with the FPR it realises on the clean test
  inputs, ``test_fpr_at_fpr_5pct``);
* two-sided, the FPR split evenly between the tails: flag score < the empirical fpr/2 quantile or
  > the 1 - fpr/2 quantile, at 1% and 5%. The low tail matters for a backdoor whose prediction is
  a near-tie between classes (CUBA's), which may drift *more* than clean inputs under scaling.
  Earlier versions reported the AUROC of -SPC instead -- exactly 1 - AUROC, a tail chosen after
  seeing the attack.

SPC takes only len(scales) + 1 values, so a normal fit would be meaningless and quantiles land on
values that many inputs share: the rules use *empirical* quantiles at observed values and flag
strictly beyond them, which keeps the validation FPR at or under the nominal rate (ties make the
rule conservative -- often far under it). Read the realised test FPR beside each TPR.

Not applicable (``"applicable": false``) when every test input, clean and backdoor, has the same
score: the AUROC is then 0.5 and the flags all-or-nothing by construction.

defense.json: ``auroc`` (score separating backdoor from clean *test* inputs; higher =
backdoor), ``tpr_at_fpr_5pct`` / ``test_fpr_at_fpr_5pct`` / ``threshold_at_fpr_5pct``,
``far_at_frr_{1,5}pct`` / ``frr_at_frr_{1,5}pct`` (the one-sided validation rule read as the
harness's FAR, with the FRR it realises on clean test inputs),
``tpr_at_fpr_{1,5}pct_two_sided`` / ``test_fpr_at_fpr_{1,5}pct_two_sided`` and ``thresholds``
([lower, upper] per two-sided rule), ``flagged_backdoor`` / ``flagged_clean`` (shares above the
data-free ``threshold``), ``calibration`` / ``n_calib_used``, ``applicable`` (+ ``reason``), and
the per-input scores ``spc_clean`` / ``spc_backdoor`` / ``spc_val`` (raw SPC, before any
standardisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import AttackRun, Defense, DefenseResult, check_param, register, rule_headline
from .plots import plot_scores
# empirical_two_sided lives in .rules with the other rules; still importable from here, where it was defined
from .rules import clean_model_reason, constant_scores, empirical_two_sided, rate_tag, roc_summary, split_sizes  # noqa: F401


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


def two_sided_rates(s_clean: np.ndarray, s_bd: np.ndarray, lower: float, upper: float) -> tuple[float, float]:
    """(TPR on backdoor inputs, FPR on clean inputs) of "flag score < lower or > upper"."""
    flagged = lambda s: (np.asarray(s) < lower) | (np.asarray(s) > upper)  # noqa: E731
    return float(flagged(s_bd).mean()), float(flagged(s_clean).mean())


REPORTED_FPR = (0.01, 0.05)


@register
class ScaleUp(Defense):
    name = "scale-up"
    rule = ("tpr_at_fpr_5pct", "tpr")  # the operating point cuba.defenses.verdict judges

    @classmethod
    def headline(cls, f: dict) -> str:
        return rule_headline(f, "TPR@FPR5%", "tpr_at_fpr_5pct", "test_fpr_at_fpr_5pct", "FPR")

    def __init__(self, scales: tuple[float, ...] = (3, 5, 7, 9, 11), threshold: float = 0.5, standardize: bool = False,
                 n_eval: int = 1000, n_ref: int = 1000, n_calib: int = 1000, seed: int = 0) -> None:
        super().__init__(seed)
        scales = tuple(scales) if isinstance(scales, (list, tuple)) else (scales,)
        check_param("scales", len(scales) >= 1 and all(isinstance(n, (int, float)) and n > 1 for n in scales),
                    "a list of amplification factors > 1", scales)
        for name, v in (("n_eval", n_eval), ("n_ref", n_ref), ("n_calib", n_calib)):
            check_param(name, isinstance(v, int) and v >= 2, "an integer >= 2", v)
        check_param("threshold", isinstance(threshold, (int, float)) and np.isfinite(threshold), "a finite number", threshold)
        self.scales, self.threshold, self.standardize = tuple(float(n) for n in scales), float(threshold), bool(standardize)
        self.n_eval, self.n_ref, self.n_calib = n_eval, n_ref, n_calib

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        x, _ = run.attacked_test(self.n_eval, seed=self.seed)
        if self.standardize:  # the defender's few clean images per class, and the calibration images: disjoint
            both, _ = run.clean_val(self.n_ref + self.n_calib, seed=self.seed)
            n_ref, _ = split_sizes(len(both), self.n_ref, self.n_calib)
            ref, xv = both[:n_ref], both[n_ref:]
        else:
            xv, _ = run.clean_val(self.n_calib, seed=self.seed)
        spc_clean, pred_clean = scaled_consistency(run, x, self.scales)
        spc_bd, pred_bd = scaled_consistency(run, run.backdoor(x), self.scales)
        spc_val, pred_val = scaled_consistency(run, xv, self.scales)
        s_clean, s_bd, s_val = spc_clean, spc_bd, spc_val
        if self.standardize:
            ref_spc, ref_pred = scaled_consistency(run, ref, self.scales)
            z = lambda spc, pred: standardize_by_class(spc, pred, ref_spc, ref_pred, run.num_classes)  # noqa: E731
            s_clean, s_bd, s_val = z(spc_clean, pred_clean), z(spc_bd, pred_bd), z(spc_val, pred_val)
        s_clean, s_bd, s_val = s_clean.numpy(), s_bd.numpy(), s_val.numpy()
        fields: dict = {**roc_summary(s_clean, s_bd, s_val), "calibration": run.calibration_source, "n_calib_used": len(s_val)}
        thresholds = {}
        for rate in REPORTED_FPR:
            lo, hi = empirical_two_sided(s_val, rate)
            tag = rate_tag(rate) + "_two_sided"
            fields[f"tpr_at_fpr_{tag}"], fields[f"test_fpr_at_fpr_{tag}"] = two_sided_rates(s_clean, s_bd, lo, hi)
            thresholds[tag] = [lo, hi]
        reason = None
        if run.imported:  # its trigger is unknown: the probe patch scored above says nothing of its backdoor
            reason = clean_model_reason(scored="SPCs", imported=True)
        elif constant_scores(s_clean, s_bd):
            reason = (f"every test input, clean and backdoor, has the same score ({float(s_clean[0]):g}): "
                      "AUROC 0.5 and all-or-nothing flags by construction")
        fields.update({
            "applicable": reason is None, **({"reason": reason} if reason else {}), "thresholds": thresholds,
            "flagged_backdoor": float((s_bd > self.threshold).mean()), "flagged_clean": float((s_clean > self.threshold).mean()),
            "trigger": run.trigger_kind,
            "spc_clean": spc_clean.double().numpy().round(4).tolist(), "spc_backdoor": spc_bd.double().numpy().round(4).tolist(),
            "spc_val": spc_val.double().numpy().round(4).tolist(),
        })
        # SPC takes len(scales) + 1 values: one bin per value keeps the histogram honest
        bins = None if self.standardize else np.linspace(-0.5, len(self.scales) + 0.5, len(self.scales) + 2) / len(self.scales)
        band = thresholds["5pct_two_sided"]
        fig = plot_scores(s_clean, s_bd, self.threshold, out / "scale_up_spc.png",
                          "SPC z-score (per predicted class)" if self.standardize else "scaled prediction consistency (SPC)",
                          f"threshold ({self.threshold:g})", f"SCALE-UP on {run.cfg.label()}: AUROC {fields['auroc']:.3f}",
                          band=(band[0], band[1]), band_label="two-sided rule, FPR 5% (validation)",
                          **({} if bins is None else {"bins": bins}))
        return DefenseResult(self.name, fields, self.params, [fig])
