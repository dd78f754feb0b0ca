"""IBD-PSC (Hou et al., "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling
Consistency", ICML 2024): an input-level detector that amplifies the model's *parameters* instead
of the input's pixels (compare SCALE-UP, :mod:`.scale_up`). Multiplying the affine parameters of the
deeper BatchNorm layers by a factor drives a clean input's prediction away from its class, while a
backdoor input -- whose trigger features dominate the decision -- keeps its prediction: the
*parameter-oriented scaling consistency*.

Amplified models. The BatchNorm layers with affine parameters, in the model's module order
(``model.modules()``: for our ResNets the order of the forward pass, a block's shortcut BN after its
main path), counted from the
last: amplifying "the last k layers" multiplies weight (gamma) *and* bias (beta) of each of them by
``factor``, each once (not compounded), on a deep copy -- the run's classifier is never modified.

* Layer selection (on clean *validation* images, :meth:`AttackRun.clean_val`): k* = the smallest
  k >= 1 for which amplifying the last k layers makes the clean validation *error rate* exceed
  ``xi``. If no k up to the number of layers L does, k* = L and ``xi_reached`` is false.
* The ``n_models`` amplified models amplify the last min(k* + i, L) layers, i = 1 .. n_models (a
  model whose count is capped at L is the same model again and counts again in the mean).
* PSC(x) = mean over the amplified models of the softmax probability they give to the class the
  *original* model predicts for x (eval mode; fp32 logits, softmax in float64). High PSC = backdoor.

Score. The rules and AUROCs rank inputs by s(x) = -ln(1 - PSC(x)), a strictly increasing function
of PSC computed in log space (:func:`log_complement`): PSC of a confidently classified input rounds
to exactly 1.0 -- once 1 - PSC is under ~6e-8 in fp32 or ~1e-16 in float64, both common on small,
confident models -- and a quantile threshold at a tie of 1.0 flags nothing. s ranks exactly as PSC wherever PSC
is representable and keeps ranking beyond. PSC itself is kept for the paper's fixed rule.

Calibration, fixed before any backdoor input is seen, on the scores of clean validation images:

* one-sided (the paper's direction): flag s > the empirical 1 - frr quantile of the validation
  scores, taken at an observed value (:func:`~.rules.val_threshold`), at FRR 1% and 5%;
* two-sided, the FRR split evenly between the tails (:func:`~.rules.empirical_two_sided`): a
  CUBA backdoor input sits on a near-tie between wrong classes and may *lose* its prediction faster
  than a clean one, i.e. land in the low tail;
* the paper's fixed rule, PSC >= ``threshold`` (0.9), reported beside them uncalibrated.

Each FAR (share of backdoor test inputs not flagged) comes with the FRR the same rule realises on the
clean *test* inputs. ``auroc`` is the ROC AUC of s (= of PSC, ties resolved; backdoor vs clean test
inputs, higher = backdoor, the paper's direction); ``auroc_two_sided`` that of the tail-free rank
score |F_val(s) - 0.5| of :func:`.entropy.rank_distance`.

Defaults and what we could verify (2026-12-01). The paper's PDF was not reachable here, only its
abstract; its equations were read in a third-party transcription (Eq. 2: gamma and beta of the last
k BN layers times omega = 1.5; Algorithm 1: k = the smallest i with error rate > xi = 60% on a
small benign set, 100 images in its Section 5.1; Eq. 4: PSC averaged over n = 5 amplified models;
T = 0.9). The authors' code (BackdoorBox, core/defenses/IBD_PSC.py) agrees on ``factor`` 1.5,
``n_models`` 5, ``xi`` 0.6 as an *error rate* (the amplified model wrong on more than 60% of clean
validation images, i.e. accuracy under 40% -- not "accuracy under 60%") and ``threshold`` 0.9,
flagged with >= (its docstring says >); it takes only ``BatchNorm2d`` layers (we take every
BatchNorm with affine parameters: the same on our 2-D ResNets) and amplifies k* + 1 .. k* + n
layers, kept here -- the transcription's Eq. 4 reads k* .. k* + n - 1, one layer less, which we
could not check against the paper itself. That code searches k only up to L - 1 and fails when
nothing crosses xi; we search up to L and fall back to L, saying so. We select k* on ``n_calib``
(1000) clean validation images, not the paper's 100: a better estimate of the same error rate.
BackdoorBox scores only inputs the model classifies "correctly" (clean: as their label, backdoor:
as the target; backdoor-toolbox only on request); METHOD.md section 4's harness rule forbids that
for untargeted attacks, so every attacked test input and its backdoor twin is scored here.

Not applicable (``"applicable": false`` with a ``reason``): a model without a BatchNorm layer with
affine parameters (SimpleCNN; nothing is computed); a clean model (no trigger: the backdoor column
scores the 3x3 probe patch of :meth:`AttackRun.backdoor`, kept as a negative control); test PSCs
that are all equal. ``assumes_target_class`` is false: the rule only asks whether a prediction
survives amplification, whatever class it is.

defense.json: ``auroc`` / ``auroc_two_sided``; ``far_at_frr_{1,5}pct`` / ``frr_at_frr_{1,5}pct``
and the same with ``_two_sided``; ``thresholds`` (on s); ``paper_far`` / ``paper_frr`` at ``threshold``;
``start_layers`` (k*), ``amplified_layers`` (per model), ``n_bn_layers``, ``xi_reached``,
``selection_errors`` (clean validation error for k = 1 .. k*); ``calibration`` / ``n_calib_used``;
``applicable`` (+ ``reason``); ``trigger``; per input ``psc_clean`` / ``psc_backdoor`` / ``psc_val`` and
the ranking scores s, ``score_clean`` / ``score_backdoor`` / ``score_val`` (thresholds are on s).
Figure: ``ibd_psc_hist.png`` (histograms of s with the 5% rules).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from .base import AttackRun, Defense, DefenseResult, check_param, register, rule_headline
from .entropy import rank_distance
from .plots import plot_scores
from .rules import REPORTED_FRR, clean_model_reason, constant_scores, rule_table

NO_BN_REASON = "no BatchNorm layer to amplify (IBD-PSC scales BN parameters)"


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers IBD-PSC can amplify (those with affine weight and bias), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def amplify_last(model: nn.Module, k: int, factor: float) -> nn.Module:
    """A deep copy of ``model`` in eval mode whose last ``k`` BatchNorm layers have weight and bias
    multiplied by ``factor``. A copy, so that the caller's model (the run's classifier) is untouched."""
    amp = copy.deepcopy(model).eval()
    layers = bn_layers(amp)
    with torch.no_grad():
        for bn in layers[len(layers) - k:] if k > 0 else []:
            bn.weight.mul_(factor)
            bn.bias.mul_(factor)
    return amp


@torch.inference_mode()
def _log_probs(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """log-softmax of ``model``'s fp32 logits on ``x``, taken in float64, in batches."""
    return torch.cat([model(xb).double().log_softmax(1) for xb in x.split(batch_size)])


def select_start(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, factor: float,
                 xi: float) -> tuple[int, list[float], bool]:
    """(k*, the clean validation error of k = 1 .. k*, whether it exceeded ``xi``): the fewest last
    BatchNorm layers whose amplification makes the model wrong on more than ``xi`` of the clean
    validation images. Falls back to all L layers (and False) when none does."""
    n_layers = len(bn_layers(model))
    errors: list[float] = []
    for k in range(1, n_layers + 1):
        pred = _log_probs(amplify_last(model, k, factor), x_val).argmax(1)
        errors.append(float((pred != y_val.to(pred.device)).float().mean()))
        if errors[-1] > xi:
            return k, errors, True
    return n_layers, errors, False


def amplified_counts(start: int, n_models: int, n_layers: int) -> list[int]:
    """How many last BatchNorm layers each amplified model scales: min(start + i, L), i = 1 .. n."""
    return [min(start + i, n_layers) for i in range(1, n_models + 1)]


def log_complement(log_probs: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """ln(1 - p_cls) per row, from log-probabilities: the log-sum-exp of the other classes' log
    probabilities. Finite even where p_cls rounds to 1.0 (1 - p below 1e-16 in float64)."""
    return log_probs.scatter(1, cls[:, None], float("-inf")).logsumexp(1)


def psc_scores(model: nn.Module, xs: list[torch.Tensor], counts: list[int],
               factor: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(PSC, -ln(1 - PSC)) of every input of every tensor in ``xs``. PSC = the mean, over the
    amplified models (one per entry of ``counts``), of the probability each gives to the original
    model's predicted class. The second, a strictly increasing function of PSC, is computed in log
    space: it keeps ranking inputs whose PSC rounds to 1.0 -- a confident model's clean inputs
    often do, even in float64 -- where PSC itself would tie them. An amplified model that appears
    twice in ``counts`` is built once and counted twice."""
    original = amplify_last(model, 0, factor)  # an eval-mode copy: a model left in train mode would update its BN stats
    base = [_log_probs(original, x).argmax(1) for x in xs]
    psc = [torch.zeros(len(x), dtype=torch.float64, device=b.device) for x, b in zip(xs, base)]
    logc: list[list[torch.Tensor]] = [[] for _ in xs]  # ln(times) + ln(1 - p) per distinct amplified model
    for k in sorted(set(counts)):
        amp, times = amplify_last(model, k, factor), counts.count(k)
        for i, (x, b) in enumerate(zip(xs, base)):
            lp = _log_probs(amp, x)
            psc[i] += times * lp.gather(1, b[:, None]).squeeze(1).exp()
            logc[i].append(log_complement(lp, b) + math.log(times))
        del amp
    n = len(counts)
    return [((p / n).cpu().numpy(), (math.log(n) - torch.stack(lc).logsumexp(0)).cpu().numpy())
            for p, lc in zip(psc, logc)]


def psc_summary(s_val: np.ndarray, s_clean: np.ndarray, s_bd: np.ndarray) -> dict:
    """The calibrated numbers of a score that is high for backdoor inputs (here -ln(1 - PSC)): its
    AUROC and that of its two-sided rank score, and the one- and two-sided rules at FRR 1% and 5%
    fitted on the clean validation scores ``s_val`` (FAR on backdoor, realised FRR on clean test inputs)."""
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_bd))]
    out: dict = {"auroc": float(roc_auc_score(labels, np.r_[s_clean, s_bd])),
                 "auroc_two_sided": float(roc_auc_score(labels, np.r_[rank_distance(s_val, s_clean),
                                                                     rank_distance(s_val, s_bd)]))}
    return {**out, **rule_table(s_val, s_clean, s_bd, one_sided="upper", rates=REPORTED_FRR)}


def paper_rule(psc_clean: np.ndarray, psc_bd: np.ndarray, threshold: float) -> dict[str, float]:
    """The paper's fixed, uncalibrated rule PSC >= ``threshold``: its FAR on backdoor and FRR on clean test inputs."""
    return {"paper_far": float((np.asarray(psc_bd) < threshold).mean()),
            "paper_frr": float((np.asarray(psc_clean) >= threshold).mean())}


def inapplicable_reason(run: AttackRun, s_clean: np.ndarray, s_bd: np.ndarray) -> str | None:
    """Why IBD-PSC's numbers on a model with BatchNorm layers measure nothing (None when they do).
    It shares :func:`~.rules.clean_model_reason` but not the rest of
    :func:`~.rules.score_inapplicable_reason`: it has never checked its validation scores for ties,
    and its test-score reason is worded differently (with the value) -- kept as it was."""
    if run.trigger is None:
        return clean_model_reason(imported=run.imported)
    if constant_scores(s_clean, s_bd):
        return f"every test input, clean and backdoor, has the same score ({float(s_clean[0]):.4g}): it ranks nothing"
    return None


@register
class IBDPSC(Defense):
    name = "ibd-psc"
    rule = ("far_at_frr_1pct", "far")  # the operating point cuba.defenses.verdict judges

    @classmethod
    def headline(cls, f: dict) -> str:
        return rule_headline(f, "FAR@FRR1%", "far_at_frr_1pct", "frr_at_frr_1pct", "FRR")

    def __init__(self, factor: float = 1.5, n_models: int = 5, xi: float = 0.6, threshold: float = 0.9,
                 n_eval: int = 1000, n_calib: int = 1000, seed: int = 0) -> None:
        super().__init__(seed)
        check_param("factor", isinstance(factor, (int, float)) and not isinstance(factor, bool)
                    and math.isfinite(factor) and factor > 1, "a finite number > 1", factor)
        for name, v, least in (("n_models", n_models, 1), ("n_eval", n_eval, 2), ("n_calib", n_calib, 2)):
            check_param(name, isinstance(v, int) and not isinstance(v, bool) and v >= least, f"an integer >= {least}", v)
        check_param("xi", isinstance(xi, (int, float)) and not isinstance(xi, bool) and 0 <= xi < 1, "in [0, 1)", xi)
        check_param("threshold", isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                    and 0 <= threshold <= 1, "in [0, 1]", threshold)
        self.factor, self.n_models, self.xi, self.threshold = float(factor), n_models, float(xi), float(threshold)
        self.n_eval, self.n_calib = n_eval, n_calib

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        model = run.classifier
        base = {"assumes_target_class": False, "trigger": run.trigger_kind, "n_bn_layers": len(bn_layers(model))}
        if not bn_layers(model):
            return DefenseResult(self.name, {**base, "applicable": False, "reason": NO_BN_REASON}, self.params)
        x_val, y_val = run.clean_val(self.n_calib, seed=self.seed)
        x, _ = run.attacked_test(self.n_eval, seed=self.seed)
        start, errors, reached = select_start(model, x_val, y_val, self.factor, self.xi)
        counts = amplified_counts(start, self.n_models, len(bn_layers(model)))
        (p_val, s_val), (p_clean, s_clean), (p_bd, s_bd) = psc_scores(model, [x_val, x, run.backdoor(x)], counts,
                                                                      self.factor)
        reason = inapplicable_reason(run, s_clean, s_bd)
        fields: dict = {**psc_summary(s_val, s_clean, s_bd), **paper_rule(p_clean, p_bd, self.threshold), **base,
                        "start_layers": start, "amplified_layers": counts, "xi_reached": reached,
                        "selection_errors": [round(e, 5) for e in errors],
                        "calibration": run.calibration_source, "n_calib_used": len(s_val),
                        "applicable": reason is None, **({"reason": reason} if reason else {}),
                        "psc_clean": p_clean.tolist(), "psc_backdoor": p_bd.tolist(), "psc_val": p_val.tolist(),
                        "score_clean": s_clean.tolist(), "score_backdoor": s_bd.tolist(), "score_val": s_val.tolist()}
        band = fields["thresholds"]["5pct_two_sided"]
        title = f"IBD-PSC on {run.cfg.label()}: AUROC {fields['auroc']:.3f}" + ("" if reason is None else " (n/a)")
        fig = plot_scores(s_clean, s_bd, fields["thresholds"]["5pct"], out / "ibd_psc_hist.png",
                          "-ln(1 - PSC) (PSC: parameter-scaled prediction consistency)",
                          "one-sided rule, FRR 5% (validation)", title, band=(band[0], band[1]),
                          band_label="two-sided rule, FRR 5% (validation)")
        return DefenseResult(self.name, fields, self.params, [fig])
