"""Cognitive Distillation (Huang, Ma, Erfani and Bailey, "Distilling Cognitive Backdoor Patterns
within an Image", ICLR 2023): an input-level detector. For each input x it distils the smallest
part of x that the model needs to keep its output; a backdoor input needs far less of itself
than a clean one, because the trigger alone carries the decision.

Objective, per input, over a mask m in [0, 1]^(1 x H x W) (one mask shared by the channels):

    min_m  mean_k |f(x_cp)_k - f(x)_k|  +  alpha * ||m||_1  +  beta * TV(m),
    x_cp = x * m + (1 - m) * delta,

with f the classifier's fp32 logits (eval mode) and delta a random colour, one uniform [0, 1]
value per channel, drawn afresh at every step (the "complement" that replaces what the mask drops:
the mask cannot hide behind one fixed background). TV(m) is the authors' smoothness term: the sum
of squared differences between vertically and horizontally neighbouring mask values, divided by
C_m * H * W. The mask is parametrised as m = (tanh(a) + 1) / 2 with a = 1 at the start (m ~ 0.88
everywhere) and a is optimised with Adam. Score: s(x) = ||m||_1 of the final mask, between 0 and
H * W. *Low is suspicious* (the paper's rule); ``mask_size`` in defense.json is H * W.

Settings and what they rest on. From the authors' public code (read, not run here): Adam with lr
0.1 and betas (0.1, 0.1), 100 steps, alpha ("gamma" in their code) 0.01, beta 1, a 1-channel mask,
the logit difference averaged (not summed) over the K classes, a random colour per image and channel
as delta, the final (not the best) mask. beta 1 is what their experiment script (``extract.py``)
and their class default use; the usage example in their README shows beta 10, which was this
detector's default until 2026-11-30 (on the MNIST BadNets control: AUROC 0.702 at beta 10, 0.653
at beta 1, FAR@FRR1% 1.000 / 0.995 on an AVX2 CPU; 0.635 / 0.985 at beta 1 on an AMX one -- the
miss is alpha's, see BENCHMARKS.md). Not verified
against the paper's text: whether its experiments used other alpha / beta per data set -- the paper
studies alpha as a sensitivity parameter -- so both are parameters. Two choices of ours: the
per-image losses are *summed* over a batch (the authors average them), which makes each image's
Adam trajectory independent of the batch it is in (Adam is element-wise and, up to its epsilon,
scale-free); and delta is drawn from a generator seeded with ``seed``, per image and step, before
batching, so a run is reproducible and ``batch_size`` does not change a score.

Calibration, fixed before any backdoor input is seen, on the mask norms of clean *validation*
images (:meth:`AttackRun.clean_val`; ``calibration`` says which split):

* the paper's one-sided rule at FRR 1% and 5%: flag s(x) below the empirical frr quantile of the
  validation norms, taken at an observed value on the low side (``method="lower"``), so at most a
  share frr of the validation images lie strictly below it. (The authors' analysis script flags
  z-scores against the clean mean and std instead; an empirical quantile needs no normality);
* a two-sided rule at FRR 1% and 5%, the FRR split evenly between the tails
  (:func:`~cuba.defenses.rules.empirical_two_sided`), as the entropy detector does: CUBA's
  trigger is an image-wide residual, not a patch, so its inputs need not have small masks.

Each FAR (share of backdoor test inputs *not* flagged) comes with the FRR the same threshold
realises on the clean *test* inputs. ``auroc`` is the ROC AUC of -s (the paper's tail, committed in
advance), ``auroc_two_sided`` that of the rank distance from the validation median
(:func:`~cuba.defenses.entropy.rank_distance`).

Cost: ``steps`` forward and backward passes per input, over n_calib + 2 * n_eval inputs (clean
validation, clean test, their backdoor twins). The defaults (200 + 2 * 200 inputs, 100 steps) are
60,000 image forward/backward passes: minutes for the MNIST SimpleCNN on one CPU core, seconds on a
GPU; the cost grows linearly in ``steps``, ``n_eval`` and ``n_calib``.

Not applicable (``"applicable": false`` with a ``reason``; the numbers stay for inspection): a clean
model (no trigger: the backdoor column scores the probe patch of :meth:`AttackRun.backdoor`, a
negative control), validation norms that are all equal, or test norms that are all equal.

defense.json: ``auroc`` / ``auroc_two_sided``; ``far_at_frr_{1,5}pct`` / ``frr_at_frr_{1,5}pct`` (one-sided)
and ``..._two_sided``; ``thresholds`` ([lower, upper] per rule, null = no bound); ``calib_median``;
``calibration`` / ``n_calib_used``; ``mask_size``; ``applicable`` (+ ``reason``); ``trigger``; the
per-input norms ``mask_norm_clean`` / ``mask_norm_backdoor`` / ``mask_norm_val``. Figures:
``cd_mask_norms.png`` (the two test histograms with the 5% thresholds) and ``cd_masks.png``
(inputs and their distilled masks, clean and backdoor).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from .base import AttackRun, Defense, DefenseResult, check_param, register, rule_headline
from .entropy import rank_distance
from .plots import plot_distilled_masks, plot_scores
# one_sided_lower (CD's rule) lives in .rules with the other rules; still importable from here, where it was defined
from .rules import REPORTED_FRR, one_sided_lower, rule_table, score_inapplicable_reason  # noqa: F401


def mask_l1(m: torch.Tensor) -> torch.Tensor:
    """||m||_1 per mask of a (B, C, H, W) batch: the detector's score and the sparsity term."""
    return m.abs().flatten(1).sum(1)


def total_variation(m: torch.Tensor) -> torch.Tensor:
    """The smoothness term per mask of a (B, C, H, W) batch: squared differences of vertical and
    horizontal neighbours, summed, over C * H * W (the authors' form: squared, not absolute, so it
    penalises ragged edges more than a mask's size)."""
    c, h, w = m.shape[1:]
    dh = (m[:, :, 1:, :] - m[:, :, :-1, :]).pow(2).flatten(1).sum(1)
    dw = (m[:, :, :, 1:] - m[:, :, :, :-1]).pow(2).flatten(1).sum(1)
    return (dh + dw) / (c * h * w)


def cd_loss(model: nn.Module, x: torch.Tensor, ref_logits: torch.Tensor, m: torch.Tensor, delta: torch.Tensor,
            alpha: float, beta: float) -> torch.Tensor:
    """CD's objective per image: mean absolute logit change when x keeps only its masked part
    (the rest filled with the colour ``delta``, (B, C)), plus alpha ||m||_1 plus beta TV(m)."""
    x_cp = x * m + (1 - m) * delta[:, :, None, None]
    change = (model(x_cp).float() - ref_logits).abs().mean(1)
    return change + alpha * mask_l1(m) + beta * total_variation(m)


def _distil_batch(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, steps: int, lr: float, alpha: float,
                  beta: float) -> torch.Tensor:
    """The final masks of one batch; ``noise`` is (steps, B, C), the complement colours."""
    with torch.no_grad():
        ref = model(x).float()
    a = torch.ones(len(x), 1, *x.shape[2:], device=x.device, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr, betas=(0.1, 0.1))
    for t in range(steps):
        with torch.enable_grad():
            m = (torch.tanh(a) + 1) / 2
            loss = cd_loss(model, x, ref, m, noise[t].to(x.device), alpha, beta)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # images share no parameter: the sum keeps their optimisations independent
        opt.step()
    return ((torch.tanh(a) + 1) / 2).detach()


def distil_masks(model: nn.Module, x: torch.Tensor, steps: int = 100, lr: float = 0.1, alpha: float = 0.01,
                 beta: float = 1.0, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Cognitive Distillation's mask of every image of ``x`` (float in [0, 1]), on the CPU. The
    complement colours are drawn once, per image and step, from a generator seeded with ``seed``,
    so a mask does not depend on how the images are batched."""
    noise = torch.rand((steps, len(x), x.shape[1]), generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    out = [_distil_batch(model, x[i:i + batch_size], noise[:, i:i + batch_size], steps, lr, alpha, beta).cpu()
           for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 1, *x.shape[2:])


def cd_summary(s_val: np.ndarray, s_clean: np.ndarray, s_bd: np.ndarray) -> dict:
    """AUROCs and the one- and two-sided rules at FRR 1% and 5% (FAR on backdoor test inputs, FRR
    realised on clean test inputs, thresholds) of the mask norms; low norm = backdoor."""
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_bd))]
    out: dict = {"auroc": float(roc_auc_score(labels, -np.r_[s_clean, s_bd])),
                 "auroc_two_sided": float(roc_auc_score(labels, np.r_[rank_distance(s_val, s_clean),
                                                                      rank_distance(s_val, s_bd)]))}
    return {**out, **rule_table(s_val, s_clean, s_bd, one_sided="lower", rates=REPORTED_FRR)}


def inapplicable_reason(run: AttackRun, s_val: np.ndarray, s_clean: np.ndarray, s_bd: np.ndarray) -> str | None:
    """Why CD's numbers measure nothing on this run (None when they do): the shared checks of
    :func:`~.rules.score_inapplicable_reason`, worded for mask norms."""
    return score_inapplicable_reason(run, "mask norm", s_val, s_clean, s_bd, scored="masks")


@register
class CognitiveDistillation(Defense):
    name = "cognitive-distillation"
    rule = ("far_at_frr_1pct", "far")  # the operating point cuba.defenses.verdict judges

    @classmethod
    def headline(cls, f: dict) -> str:
        return rule_headline(f, "FAR@FRR1%", "far_at_frr_1pct", "frr_at_frr_1pct", "FRR")

    def __init__(self, n_eval: int = 200, n_calib: int = 200, steps: int = 100, lr: float = 0.1, alpha: float = 0.01,
                 beta: float = 1.0, batch_size: int = 256, seed: int = 0) -> None:
        super().__init__(seed)
        for name, v, least in (("n_eval", n_eval, 2), ("n_calib", n_calib, 2), ("steps", steps, 1),
                               ("batch_size", batch_size, 1)):
            check_param(name, isinstance(v, int) and not isinstance(v, bool) and v >= least, f"an integer >= {least}", v)
        check_param("lr", isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "a finite number > 0", lr)
        for name, v in (("alpha", alpha), ("beta", beta)):
            check_param(name, isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, "a finite number >= 0", v)
        self.n_eval, self.n_calib, self.steps, self.lr = n_eval, n_calib, steps, float(lr)
        self.alpha, self.beta, self.batch_size = float(alpha), float(beta), batch_size

    def masks(self, run: AttackRun, x: torch.Tensor) -> torch.Tensor:
        """The distilled masks of ``x`` with this detector's settings."""
        return distil_masks(run.classifier, x, self.steps, self.lr, self.alpha, self.beta, self.seed, self.batch_size)

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        x_val, _ = run.clean_val(self.n_calib, seed=self.seed)
        x, _ = run.attacked_test(self.n_eval, seed=self.seed)
        xb = run.backdoor(x)
        m_clean, m_bd = self.masks(run, x), self.masks(run, xb)
        s_val, s_clean, s_bd = (mask_l1(m).double().numpy() for m in (self.masks(run, x_val), m_clean, m_bd))
        fields: dict = {**cd_summary(s_val, s_clean, s_bd), "calibration": run.calibration_source,
                        "n_calib_used": len(s_val), "calib_median": float(np.median(s_val)),
                        "mask_size": int(x.shape[-2] * x.shape[-1])}
        reason = inapplicable_reason(run, s_val, s_clean, s_bd)
        fields.update({"applicable": reason is None, **({"reason": reason} if reason else {}), "trigger": run.trigger_kind,
                       # unrounded, so that the thresholds can be re-applied to them exactly
                       "mask_norm_clean": s_clean.tolist(), "mask_norm_backdoor": s_bd.tolist(), "mask_norm_val": s_val.tolist()})
        title = f"Cognitive Distillation on {run.cfg.label()}: AUROC {fields['auroc']:.3f}" + ("" if reason is None else " (n/a)")
        band = fields["thresholds"]["5pct_two_sided"]
        hist = plot_scores(s_clean, s_bd, fields["thresholds"]["5pct"][0], out / "cd_mask_norms.png",
                           "L1 norm of the distilled mask (low = suspicious)", "one-sided rule, FRR 5% (validation)",
                           title, band=(band[0], band[1]), band_label="two-sided rule, FRR 5% (validation)")
        k = min(6, len(x))
        grid = plot_distilled_masks(x[:k].cpu().numpy(), m_clean[:k].numpy(), xb[:k].cpu().numpy(), m_bd[:k].numpy(),
                                    out / "cd_masks.png", title=title)
        return DefenseResult(self.name, fields, self.params, [hist, grid])
