"""Prediction entropy: an input-level detector aimed at CUBA's own signature, with no superimposition.

Why it exists. CUBA's trigger is trained so that a backdoor input's prediction is spread (near
uniformly under FRA, over k classes under NRA) across the wrong classes: its softmax output has a
*high* entropy, while a clean input is classified confidently (low entropy) and a targeted backdoor
input even more so. STRIP measures entropy after blending the input with clean images (its
paper's rule flags only the low tail); this detector scores the input as it is and flags *both*
tails, so it needs no assumption about which kind of backdoor it faces.

Score. s_raw(x) = base-2 entropy of the classifier's softmax on x itself (fp32, eval mode, from
``log_softmax`` so that saturated probabilities do not lose precision), in bits, between 0 and
log2(K). This is the one primary score; no second statistic is computed.

Calibration, fixed before any backdoor input is seen: the entropies of clean *validation* images
(:meth:`AttackRun.clean_val`; ``calibration`` in defense.json says which split) give

* the two-sided rule at FRR 1% and 5%, the FRR split evenly between the tails: flag entropy below
  the empirical frr/2 quantile or above the empirical 1 - frr/2 quantile, each taken at an
  observed validation value on the side that flags at most frr/2 of the validation images
  (:func:`~cuba.defenses.rules.empirical_two_sided`). No normal is fitted: clean entropies of a
  confident model pile up near 0 and are far from normal. With few validation images the 1% rule
  sits on the extreme validation values (142 digits images: the minimum and the maximum);
* a ranking score for the AUROC that also commits to no tail: s(x) = |F_val(x) - 0.5|, the
  distance of x's rank among the clean validation entropies from their median, with F_val the
  empirical CDF (ties counted half, so every clean score at a tie ranks alike). Both extremes
  score high; ``auroc`` is the ROC AUC of s on backdoor vs clean *test* inputs (``auroc_two_sided``
  holds the same number under its explicit name).

Each FAR (share of backdoor inputs *not* flagged) comes with the FRR the same thresholds realise on
the clean *test* inputs (``frr_at_frr_{1,5}pct_two_sided``).

Not applicable (``"applicable": false`` with a ``reason``; the numbers stay for inspection):

* a clean model (no trigger): there is no backdoor to detect. The backdoor column then scores the
  3x3 probe patch of :meth:`AttackRun.backdoor`, kept as a negative control only;
* clean validation entropies that are all equal (the quantile thresholds coincide, the CDF is a
  step) or test scores that are all equal (the score ranks nothing).

defense.json: ``auroc`` / ``auroc_two_sided``; ``far_at_frr_{1,5}pct_two_sided`` /
``frr_at_frr_{1,5}pct_two_sided``, the same under the harness's plain keys ``far_at_frr_{1,5}pct`` /
``frr_at_frr_{1,5}pct`` with ``rule_sides: "two"``; ``thresholds`` ([lower, upper] per rule, in bits); ``calib_median``;
``calibration`` / ``n_calib_used``; ``max_entropy`` (log2 K); ``applicable`` (+ ``reason``);
``trigger``; and the per-input entropies ``entropy_clean`` / ``entropy_backdoor`` / ``entropy_val``.
Figure: ``entropy_hist.png`` (the two test histograms with the 5% two-sided thresholds).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .base import AttackRun, DefenseResult, SampledInputDetector, register, rule_headline
from .plots import plot_scores
from .rules import REPORTED_FRR, rule_table, score_inapplicable_reason


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Base-2 entropy (bits) of softmax(logits) per row. Computed from ``log_softmax`` rather than
    log(softmax), so tiny probabilities keep their digits; a probability of 0 (a -inf logit, or an
    underflow) contributes 0, never 0 * -inf."""
    logp = logits.float().log_softmax(1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(1) / math.log(2.0)


def input_entropy(run: AttackRun, x: torch.Tensor) -> np.ndarray:
    """Entropy of the run's classifier on each float image of ``x``, as float64 on the CPU."""
    return softmax_entropy(run.logits(x)).double().cpu().numpy()


def empirical_cdf(ref: np.ndarray, s: np.ndarray) -> np.ndarray:
    """F_ref(s) with ties counted half: (#ref < s + #ref <= s) / (2 n). Counting ties half keeps
    a score equal to many reference values at the middle of their run of ranks, so a pile of
    identical clean scores is not pushed to one tail."""
    ref = np.sort(np.asarray(ref, dtype=float))
    s = np.asarray(s, dtype=float)
    below = np.searchsorted(ref, s, side="left")
    at_or_below = np.searchsorted(ref, s, side="right")
    return (below + at_or_below) / (2.0 * len(ref))


def rank_distance(ref: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The two-sided ranking score |F_ref(s) - 0.5|: how far into either tail of the clean
    reference scores ``s`` lies, so the AUROC commits to no tail before seeing the attack."""
    return np.abs(empirical_cdf(ref, s) - 0.5)


def two_sided_summary(e_val: np.ndarray, e_clean: np.ndarray, e_bd: np.ndarray) -> dict:
    """The calibrated numbers of the detector: two-sided AUROC and the two-sided rules at FRR
    1% and 5% (FAR on backdoor test inputs, realised FRR on clean test inputs, thresholds)."""
    s_clean, s_bd = rank_distance(e_val, e_clean), rank_distance(e_val, e_bd)
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_bd))]
    auroc = float(roc_auc_score(labels, np.r_[s_clean, s_bd]))
    rules = rule_table(e_val, e_clean, e_bd, one_sided=None, rates=REPORTED_FRR)
    # the harness's plain keys (issue 18: "for a two-sided detector, its two-sided rule"), as "auroc" is
    # the two-sided AUROC: a reader of far_at_frr_1pct across detectors gets each one's own rule
    plain = {k.removesuffix("_two_sided"): v for k, v in rules.items() if k.endswith("_two_sided")}
    if "unresolved_rules" in rules:  # the plain keys are the same rules: unresolved alike
        rules["unresolved_rules"] = [*rules["unresolved_rules"], *(t.removesuffix("_two_sided") for t in rules["unresolved_rules"])]
    return {"auroc": auroc, "auroc_two_sided": auroc, **plain, **rules, "rule_sides": "two"}


def inapplicable_reason(run: AttackRun, e_val: np.ndarray, e_clean: np.ndarray, e_bd: np.ndarray) -> str | None:
    """Why the entropy detector's numbers measure nothing on this run (None when they do): the shared
    checks of :func:`~.rules.score_inapplicable_reason`, worded for entropies in bits."""
    return score_inapplicable_reason(run, "entropy", e_val, e_clean, e_bd, unit=" bits", rules="the two-sided thresholds")


@register
class PredictionEntropy(SampledInputDetector):
    name = "entropy"
    rule = ("far_at_frr_1pct_two_sided", "far")  # the operating point cuba.defenses.verdict judges

    @classmethod
    def headline(cls, f: dict) -> str:
        return rule_headline(f, "two-sided FAR@FRR1%", "far_at_frr_1pct_two_sided", "frr_at_frr_1pct_two_sided", "FRR")

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        x_val, _ = run.clean_val(self.n_calib, seed=self.seed)
        x, _ = run.attacked_test(self.n_eval, seed=self.seed)
        e_val, e_clean, e_bd = input_entropy(run, x_val), input_entropy(run, x), input_entropy(run, run.backdoor(x))
        fields: dict = {**two_sided_summary(e_val, e_clean, e_bd), "calibration": run.calibration_source,
                        "n_calib_used": len(e_val), "calib_median": float(np.median(e_val)),
                        "max_entropy": math.log2(run.num_classes)}
        reason = inapplicable_reason(run, e_val, e_clean, e_bd)
        fields.update({
            "applicable": reason is None, **({"reason": reason} if reason else {}), "trigger": run.trigger_kind,
            # unrounded: near 0 the thresholds are ~1e-7 bits, and rounded copies would cross them
            "entropy_clean": e_clean.tolist(), "entropy_backdoor": e_bd.tolist(), "entropy_val": e_val.tolist(),
        })
        band = fields["thresholds"]["5pct_two_sided"]
        title = f"Entropy on {run.cfg.label()}: two-sided AUROC {fields['auroc']:.3f}" + ("" if reason is None else " (n/a)")
        fig = plot_scores(e_clean, e_bd, fields["calib_median"], out / "entropy_hist.png",
                          "softmax entropy of the input (bits)", "clean validation median", title,
                          band=(band[0], band[1]), band_label="two-sided rule, FRR 5% (validation)")
        return DefenseResult(self.name, fields, self.params, [fig])
