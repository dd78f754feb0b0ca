"""Near-tie: an input-level detector of our own for CUBA's output signature, with no superimposition.

Why it exists. CUBA's LNF objective asks a backdoor input for a prediction spread *evenly* over
its target set T(y): under NRA-2 two classes at about 1/2 each, under NRA-5 five at about 1/5,
under FRA K - 1 classes. The ``entropy`` detector sees the spread but not the evenness, and a
clean model's uncertain images reach the same entropy (on MNIST the top 0.5% of clean validation
entropies lie above the 1 bit of an NRA-2 backdoor input, so its two-sided 1% rule misses NRA-2,
BENCHMARKS.md). What clean images seldom produce is an *exact tie* among their top classes.

Score. With p the classifier's softmax on the input sorted in decreasing order and u_k the
distribution uniform on the first k entries,

    s(x) = min over k = 2..K of || p - u_k ||_1     (0: an exact k-way tie; up to 2 - 2/k)

k = 1 is left out: a confident clean prediction is a "1-way tie" and must score high. Low is
suspicious. The score needs no knowledge of k or of T(y): the minimum finds whichever tie is there.

Rule, fixed before any backdoor input is seen: flag s below its empirical FRR quantile over clean
*validation* images (the one-sided lower rule of :func:`~cuba.defenses.rules.one_sided_lower`) at
FRR 1% and 5%; each FAR (share of backdoor test inputs not flagged) comes with the FRR the same
threshold realises on clean test inputs. ``auroc`` ranks -s, backdoor vs clean test inputs.

Provenance, for the reader judging it: the statistic was written after the entropy detector
missed the first MNIST NRA-2 model at FRR 1%, from CUBA's objective (what LNF optimises), and its
threshold only ever sees clean validation images; BENCHMARKS.md gives its numbers on that model
and, separately, on models it was not designed on.

Not applicable (``applicable: false`` + ``reason``): a clean model (no trigger; the backdoor
column then scores the probe patch, a negative control); constant validation or test scores.

defense.json: ``auroc``; ``far_at_frr_{1,5}pct`` / ``frr_at_frr_{1,5}pct``; ``thresholds``;
``unresolved_rules`` when the validation set is too small; ``calibration`` / ``n_calib_used``;
``tie_k_backdoor`` (how often each k was the nearest tie on backdoor inputs); the per-input scores
``tie_clean`` / ``tie_backdoor`` / ``tie_val``. Figure: ``near_tie_hist.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .base import AttackRun, DefenseResult, SampledInputDetector, register, rule_headline
from .plots import plot_scores
from .rules import REPORTED_FRR, rule_table, score_inapplicable_reason


def tie_distance(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, k): per row, the L1 distance of the sorted softmax to the nearest k-way uniform tie
    (k = 2..K) and that k. Vectorised over k with cumulative sums (no Python loop over rows):
    ||p - u_k||_1 = sum_{i<k} |p_i - 1/k| + (1 - sum_{i<k} p_i)."""
    p = torch.softmax(logits.float(), dim=1).sort(dim=1, descending=True).values.double()
    n, big_k = p.shape
    if big_k < 2:
        raise ValueError(f"near-tie needs at least 2 classes, got {big_k}")
    ks = torch.arange(2, big_k + 1, dtype=p.dtype)                     # (K-1,)
    head = torch.arange(big_k)[None, :] < ks[:, None].long()           # (K-1, K): i < k
    dev = (p[:, None, :] - 1.0 / ks[None, :, None]).abs() * head       # (n, K-1, K)
    tail = 1.0 - (p[:, None, :] * head).sum(dim=2)                     # mass outside the first k
    dist = dev.sum(dim=2) + tail.clamp_min(0.0)
    s, idx = dist.min(dim=1)
    return s, idx + 2


def input_ties(run: AttackRun, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The run's classifier on each image of ``x``: (tie distances, nearest k), on the CPU."""
    s, k = tie_distance(run.logits(x))
    return s.cpu().numpy(), k.cpu().numpy()


def tie_summary(s_val: np.ndarray, s_clean: np.ndarray, s_bd: np.ndarray) -> dict:
    """AUROC of -s (low distance = suspicious) and the one-sided lower rules at FRR 1% and 5%."""
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_bd))]
    auroc = float(roc_auc_score(labels, -np.r_[s_clean, s_bd]))
    return {"auroc": auroc, **rule_table(s_val, s_clean, s_bd, one_sided="lower", two_sided=False, rates=REPORTED_FRR)}


@register
class NearTie(SampledInputDetector):
    name = "near-tie"
    rule = ("far_at_frr_1pct", "far")  # the operating point cuba.defenses.verdict judges

    @classmethod
    def headline(cls, f: dict) -> str:
        return rule_headline(f, "FAR@FRR1%", "far_at_frr_1pct", "frr_at_frr_1pct", "FRR")

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        x_val, _ = run.clean_val(self.n_calib, seed=self.seed)
        x, _ = run.attacked_test(self.n_eval, seed=self.seed)
        (s_val, _), (s_clean, _), (s_bd, k_bd) = input_ties(run, x_val), input_ties(run, x), input_ties(run, run.backdoor(x))
        reason = score_inapplicable_reason(run, "tie distance", s_val, s_clean, s_bd, rules="the thresholds")
        ks, counts = np.unique(k_bd, return_counts=True)
        fields: dict = {**tie_summary(s_val, s_clean, s_bd), "calibration": run.calibration_source,
                        "n_calib_used": len(s_val), "calib_median": float(np.median(s_val)),
                        "applicable": reason is None, **({"reason": reason} if reason else {}), "trigger": run.trigger_kind,
                        "tie_k_backdoor": {int(k): int(c) for k, c in zip(ks, counts)},
                        "tie_clean": s_clean.tolist(), "tie_backdoor": s_bd.tolist(), "tie_val": s_val.tolist()}
        title = f"Near-tie on {run.cfg.label()}: AUROC {fields['auroc']:.3f}" + ("" if reason is None else " (n/a)")
        fig = plot_scores(s_clean, s_bd, fields["thresholds"]["1pct"][0], out / "near_tie_hist.png",
                          "L1 distance of the sorted softmax to the nearest k-way tie (low = suspicious)",
                          "rule at FRR 1% (validation)", title)
        return DefenseResult(self.name, fields, self.params, [fig])
