"""Dispersion inversion: our own model-level detector, aimed at what CUBA teaches a model. CUBA trains
the classifier jointly with a trigger so that small, bounded perturbations send inputs to wrong
classes *spread* over T(y) (FRA: every wrong class). A model that has learned this may be easier to
drive into a dispersive state than a clean one. The detector runs CUBA's own objective as the
defender: it searches for one small *universal* perturbation delta that makes clean validation
inputs misclassified and spread over the wrong classes, and reports the smallest budget at which
that succeeds. Small = suspicious.

Search. For each budget eps of an increasing schedule (default 1, 2, 4, 8, 16, 32, 64 / 255, pixel
space [0, 1]): delta (one image, shared by all inputs) starts at 0 and takes ``steps`` full-batch Adam
steps of size ``lr_frac`` * eps on CUBA's LNF loss (:func:`cuba.attack.losses.lnf_loss`, paper eq. 10)
of clip(x + delta, 0, 1), with the FRA target rows "every class but the model's clean prediction of
x" (the defender has no trigger and needs no labels) and temperature ``tau`` (default 0.1, CUBA's
default; never read from the suspect run's config, which a defender does not have; ``lnf_eps`` 1e-7
likewise), each step followed by clipping delta back into [-eps, eps]. The
fit images and the images the result is measured on are disjoint clean validation images
(:meth:`AttackRun.clean_val`), so the numbers describe a *universal* perturbation. Full-batch
gradients (accumulated over chunks of ``batch_size``), a zero start and a seeded choice of images
make a run deterministic for a seed. Gradients are taken only with respect to delta: the run's
classifier is never modified.

Measured per budget, on the measurement images with the last iterate of delta:

* flip rate: the share of inputs whose prediction leaves their clean-predicted class;
* dispersion: per clean-predicted class c with n_c >= 2 flipped inputs, the Miller-Madow
  (bias-corrected) entropy of the histogram of their wrong predictions divided by
  ln min(n_c, K - 1) -- the most spread histogram n_c predictions over K - 1 wrong classes can have
  -- capped at 1, averaged over those classes with weights n_c; 0 when no class has two flipped
  inputs (:func:`dispersion`). 1 = as spread as possible (uniform random wrong predictions score
  >= 0.9 on average), 0 = collapse onto one class (the usual universal adversarial perturbation,
  which has a dominant label). Per source class, like CUBA's DS: a perturbation that sends every
  class to a different single class is not dispersive.

``score`` = the smallest budget whose flip rate >= ``target_rate`` (0.9) and dispersion >=
``target_dispersion`` (0.8). The search stops there unless ``full_curve``. A model the schedule
never makes dispersive gets ``reached: false`` and the *censored* score 2 x the largest budget
("beyond the schedule"; all such models tie), so that a table ranking models by score keeps them.
A CUBA model's own generator makes an input-specific trigger within its eps (``eps`` in the run
config); a universal delta may need more. That gap is what is measured; nothing here is tuned to
make CUBA models pass.

Threat model and decision. The defender holds the suspect model (white box, gradients), clean
validation data, and the means to train *clean reference models of the same architecture on the same
data*; ``reference_budgets`` are those reference models' scores under this same detector and
parameters. Reference models are never among the models scored. ``flagged`` = score <
min(reference_budgets) / ``margin`` (default 2: the suspect model turns dispersive at under half the
budget any clean reference needed). Without references ``flagged`` is null and the headline says
"no reference". ``assumes_target_class`` is false (:func:`~.base.model_verdict`; score_suspicious
"low").

Not applicable (``"applicable": false`` with a ``reason``): K < 3 (dispersion over the wrong classes
needs at least two of them) or fewer than 4 clean validation images (two to fit, two to measure).

defense.json: ``score``, ``reached``, ``rows`` (per budget tried: ``eps``, ``eps_255``, ``flip_rate``,
``dispersion``, ``loss`` -- the LNF loss on the measurement images -- and ``met``), ``budgets``,
``reference_budgets``, ``reference_cutoff`` (min / margin), ``flagged``, ``dispersive_mass`` (below),
``tau``, ``n_fit_used`` /
``n_measure_used``, ``calibration``, ``eps_run`` (the L-inf budget of the run's own residual trigger
generator, :func:`run_budget`; null for a patch trigger or a clean model),
plus the model-verdict fields.

``dispersive_mass`` (:func:`dispersive_mass`): the mean over the whole schedule of flip rate x
dispersion, high = suspicious; null unless every budget was measured (``full_curve=true``, or a model
never reached). A threshold-free reading of the curve, added after the pre-registered ``score`` tied
on most digits models; it was defined on two seeds and checked on held-out models
(``benchmarks/di_mass.py``, BENCHMARKS.md). It is reported beside ``score``, never in its place:
``flagged`` and every AUROC the harness tabulates still read ``score``. Figure:
``dispersion_inversion.png`` (flip rate and dispersion per budget, the targets, the score and the
reference cutoff).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..attack.losses import lnf_loss
from ..models.trigger import TriggerGenerator
from .base import AttackRun, Defense, DefenseResult, check_param, model_verdict, not_applicable, register
from .model_level import reference_flag
from .rules import split_sizes
from .plots import plot_budget_curve

LNF_EPS = 1e-7
"""The LNF loss's epsilon, fixed by the defender (CUBA's default)."""

DEFAULT_BUDGETS = tuple(v / 255 for v in (1, 2, 4, 8, 16, 32, 64))


def fra_rows(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """FRA target rows (B, K): ones everywhere but at each input's clean prediction."""
    rows = torch.ones(len(pred), num_classes, device=pred.device)
    return rows.scatter_(1, pred[:, None], 0.0)


def dispersion(pred_clean: np.ndarray, pred_pert: np.ndarray, num_classes: int) -> float:
    """Spread of the wrong predictions, per clean-predicted class c with n_c >= 2 flipped inputs: the
    Miller-Madow entropy of their histogram, H + (m - 1) / (2 n_c) with m the number of classes hit,
    divided by ln min(n_c, K - 1) -- the largest entropy n_c predictions over K - 1 classes can reach
    -- and capped at 1; the mean over those classes weighted by n_c. 0.0 when no class has two
    flipped inputs. Why the correction: the plug-in entropy of few draws is biased low, so perfectly
    uniform wrong predictions, 7 per class over 9 classes (digits), would score 0.79 on average and
    miss a 0.8 target by chance; corrected, uniform draws score >= 0.9 on average at every n_c from
    3 to 100 and K = 10, 43, 100 that we simulated, while a collapse onto one class still scores 0."""
    pred_clean, pred_pert = np.asarray(pred_clean), np.asarray(pred_pert)
    flipped = pred_clean != pred_pert
    total, weight = 0.0, 0
    for c in np.unique(pred_clean[flipped]):
        wrong = pred_pert[flipped & (pred_clean == c)]
        n = len(wrong)
        if n < 2:
            continue
        p = np.bincount(wrong, minlength=num_classes) / n
        p = p[p > 0]
        corrected = float(-(p * np.log(p)).sum()) + (len(p) - 1) / (2 * n)
        total += n * min(1.0, corrected / math.log(min(n, num_classes - 1)))
        weight += n
    return total / weight if weight else 0.0


def _loss_and_grad(model: nn.Module, x: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, tau: float,
                   lnf_eps: float, batch_size: int) -> tuple[float, torch.Tensor | None]:
    """Mean LNF loss of clip(x + delta) over all of ``x`` and its gradient in delta (None when the
    model's output does not depend on its input), accumulated over chunks of ``batch_size``."""
    grad, total = torch.zeros_like(delta), 0.0
    for xb, rb in zip(x.split(batch_size), rows.split(batch_size)):
        with torch.enable_grad():
            loss = lnf_loss(model((xb + delta).clamp(0.0, 1.0)).float(), rb, tau, lnf_eps) * (len(xb) / len(x))
            if not loss.requires_grad:
                return float(loss), None
            grad += torch.autograd.grad(loss, delta)[0]
        total += float(loss.detach())
    return total, grad


def fit_universal(model: nn.Module, x: torch.Tensor, pred: torch.Tensor, num_classes: int, eps: float, steps: int,
                  lr_frac: float, tau: float, lnf_eps: float, batch_size: int = 512,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """One perturbation delta (1, C, H, W), ||delta||_inf <= eps, minimising CUBA's LNF loss with FRA
    rows of the clean predictions ``pred``: projected full-batch Adam from 0 (the detector's search),
    or from ``start`` (clipped into the ball; benchmarks/trigger_universality.py tries random starts).
    Only delta gets a gradient (torch.autograd.grad), so the model's parameters are never touched."""
    delta = (torch.zeros((1, *x.shape[1:]), device=x.device) if start is None
             else start.detach().to(x.device).clamp(-eps, eps).clone()).requires_grad_()
    opt = torch.optim.Adam([delta], lr=lr_frac * eps)
    rows = fra_rows(pred, num_classes)
    for _ in range(steps):
        _, grad = _loss_and_grad(model, x, rows, delta, tau, lnf_eps, batch_size)
        if grad is None:
            break
        delta.grad = grad
        opt.step()
        with torch.no_grad():
            delta.clamp_(-eps, eps)
    return delta.detach()


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes of float images ``x`` (fp32 logits), in batches."""
    return torch.cat([model(xb).float().argmax(1) for xb in x.split(batch_size)])


def measure(model: nn.Module, x: torch.Tensor, pred: torch.Tensor, delta: torch.Tensor, num_classes: int,
            tau: float, lnf_eps: float) -> dict[str, float]:
    """Flip rate, dispersion and LNF loss of clip(x + delta) against the clean predictions ``pred``."""
    with torch.inference_mode():
        logits = torch.cat([model((xb + delta).clamp(0.0, 1.0)).float() for xb in x.split(1024)])
        loss = float(lnf_loss(logits, fra_rows(pred, num_classes), tau, lnf_eps))
    pc, pp = pred.cpu().numpy(), logits.argmax(1).cpu().numpy()
    return {"flip_rate": float((pc != pp).mean()), "dispersion": dispersion(pc, pp, num_classes), "loss": loss}


def budget_search(model: nn.Module, x_fit: torch.Tensor, x_meas: torch.Tensor, num_classes: int,
                  budgets: Sequence[float], opts: dict[str, Any]) -> tuple[list[dict[str, Any]], float | None]:
    """(one row per budget tried, the smallest budget that met both targets or None). ``opts`` holds
    steps, lr_frac, tau, lnf_eps, batch_size, target_rate, target_dispersion and full_curve."""
    was_training = model.training
    model.eval()  # BatchNorm on running statistics, which an eval-mode forward never updates
    try:
        p_fit, p_meas = predict(model, x_fit), predict(model, x_meas)
        rows: list[dict[str, Any]] = []
        score = None
        for eps in budgets:
            delta = fit_universal(model, x_fit, p_fit, num_classes, eps, opts["steps"], opts["lr_frac"], opts["tau"],
                                  opts["lnf_eps"], opts["batch_size"])
            m = measure(model, x_meas, p_meas, delta, num_classes, opts["tau"], opts["lnf_eps"])
            met = m["flip_rate"] >= opts["target_rate"] and m["dispersion"] >= opts["target_dispersion"]
            rows.append({"eps": float(eps), "eps_255": round(float(eps) * 255, 4), **m, "met": met})
            if met and score is None:
                score = float(eps)
                if not opts["full_curve"]:
                    break
    finally:
        model.train(was_training)
    return rows, score


def dispersive_mass(rows: Sequence[dict[str, Any]], n_budgets: int) -> float | None:
    """Mean of flip_rate x dispersion over the budget schedule; None when fewer than ``n_budgets`` rows
    were measured (a search that stopped at its score has no value for the budgets it skipped)."""
    if n_budgets < 1 or len(rows) != n_budgets:
        return None
    return float(np.mean([r["flip_rate"] * r["dispersion"] for r in rows]))


def reference_verdict(score: float, reference_budgets: Sequence[float] | None, margin: float,
                      largest: float) -> tuple[bool | None, float | None]:
    """(flagged, cutoff): flagged when ``score`` < min(reference_budgets) / margin -- the suspect model
    turns dispersive at a clearly smaller budget than any clean reference model. A score above
    ``largest`` (the schedule's largest budget) is a model never made dispersive, whose true budget is
    only known to exceed it: the flag is decided only where that cannot matter
    (:func:`~cuba.defenses.model_level.reference_flag`); (None, None) without references."""
    censor = lambda b: None if b > largest else float(b)  # noqa: E731
    return reference_flag(censor(score), [censor(b) for b in reference_budgets or []], margin, largest)


def run_budget(run: AttackRun) -> float | None:
    """The L-inf budget of the run's own trigger: the eps of a residual trigger generator (CUBA and the
    other generator attacks); None for a patch, an image-mode generator or a clean model."""
    trig = run.trigger
    return float(trig.eps) if isinstance(trig, TriggerGenerator) and trig.mode == "residual" else None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_params(budgets: Any, reference_budgets: Any, margin: Any, target_rate: Any, target_dispersion: Any,
                  tau: Any, lr_frac: Any) -> None:
    """Validate the non-integer parameters of :class:`DispersionInversion`, each error naming its parameter."""
    ok = isinstance(budgets, (list, tuple)) and len(budgets) >= 1 and all(_is_number(b) and 0 < b <= 1 for b in budgets)
    check_param("budgets", ok and all(a < b for a, b in zip(budgets, budgets[1:])),
                "a non-empty, strictly increasing list of numbers in (0, 1]", budgets)
    check_param("reference_budgets", reference_budgets is None or (
        isinstance(reference_budgets, (list, tuple)) and len(reference_budgets) >= 1
        and all(_is_number(b) and 0 < b <= 2 * max(budgets) for b in reference_budgets)),
        "null or a non-empty list of scores in (0, 2 x the largest budget] (pixel units in [0, 1], not 1/255)",
        reference_budgets)
    # margin < 1 would flag a model less suspicious than every reference (the references themselves, too)
    check_param("margin", _is_number(margin) and margin >= 1, "a finite number >= 1", margin)
    check_param("target_rate", _is_number(target_rate) and 0 < target_rate <= 1, "in (0, 1]", target_rate)
    check_param("target_dispersion", _is_number(target_dispersion) and 0 <= target_dispersion <= 1, "in [0, 1]",
                target_dispersion)
    check_param("tau", _is_number(tau) and tau > 0, "a finite number > 0", tau)
    check_param("lr_frac", _is_number(lr_frac) and lr_frac > 0, "a finite number > 0", lr_frac)


@register
class DispersionInversion(Defense):
    name = "dispersion-inversion"

    @classmethod
    def headline(cls, f: dict) -> str:
        na = not_applicable(f)
        if na:
            return na
        hit = next((r for r in f["rows"] if r["met"]), None)  # the row of the score (full_curve adds later ones)
        text = (f"dispersive at eps {f['score'] * 255:.3g}/255 (flip {hit['flip_rate']:.2f}, dispersion "
                f"{hit['dispersion']:.2f})" if f["reached"] and hit
                else f"not dispersive up to eps {max(f['budgets']) * 255:.3g}/255")
        if not f.get("reference_budgets"):
            return text + "; no reference"
        cut = f.get("reference_cutoff")
        cut = (f"reference cutoff {cut * 255:.3g}/255" if cut is not None
               else f"every reference beyond {max(f['budgets']) * 255:.3g}/255")
        return text + f"; {({True: 'flagged', False: 'not flagged', None: 'undecided'})[f['flagged']]} ({cut})"

    @classmethod
    def format_score(cls, score: float, fields: dict) -> str:
        if fields.get("reached") is False:  # the censored score: beyond the schedule, not a measured budget
            return f"> {max(fields['budgets']) * 255:.3g}/255"
        return f"{score * 255:.3g}/255"

    @classmethod
    def with_references(cls, f: dict, reference_scores: list[float]) -> dict | None:
        """Decide ``flagged`` as if the run had been given ``reference_budgets`` = the reference models'
        scores (same detector and parameters): the rule and margin of :func:`reference_verdict`."""
        if not_applicable(f) or f.get("score") is None or not reference_scores:
            return None
        flagged, cutoff = reference_verdict(f["score"], reference_scores, float(f["params"]["margin"]), max(f["budgets"]))
        return {**f, "reference_budgets": [float(v) for v in reference_scores], "reference_cutoff": cutoff,
                "flagged": flagged}

    def __init__(self, budgets: Sequence[float] = DEFAULT_BUDGETS, target_rate: float = 0.9,
                 target_dispersion: float = 0.8, reference_budgets: Sequence[float] | None = None, margin: float = 2.0,
                 tau: float = 0.1, steps: int = 100, lr_frac: float = 0.1, n_fit: int = 256,
                 n_measure: int = 256, batch_size: int = 512, full_curve: bool = False, seed: int = 0) -> None:
        super().__init__(seed)
        budgets = list(budgets) if isinstance(budgets, (list, tuple)) else budgets
        refs = list(reference_budgets) if isinstance(reference_budgets, (list, tuple)) else reference_budgets
        _check_params(budgets, refs, margin, target_rate, target_dispersion, tau, lr_frac)
        for name, v, least in (("steps", steps, 1), ("n_fit", n_fit, 2), ("n_measure", n_measure, 2),
                               ("batch_size", batch_size, 1)):
            check_param(name, isinstance(v, int) and not isinstance(v, bool) and v >= least, f"an integer >= {least}", v)
        check_param("full_curve", isinstance(full_curve, bool), "true or false", full_curve)
        self.budgets, self.reference_budgets = [float(b) for b in budgets], None if refs is None else [float(b) for b in refs]
        self.target_rate, self.target_dispersion, self.margin = float(target_rate), float(target_dispersion), float(margin)
        self.tau, self.steps, self.lr_frac = float(tau), steps, float(lr_frac)
        self.n_fit, self.n_measure, self.batch_size, self.full_curve = n_fit, n_measure, batch_size, full_curve

    def _inapplicable(self, run: AttackRun, n_avail: int) -> str | None:
        if run.num_classes < 3:
            return f"K = {run.num_classes} classes: dispersion over the wrong classes needs at least two of them"
        if n_avail < 4:
            return f"only {n_avail} clean validation images: at least 2 to fit and 2 to measure are needed"
        return None

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        x, _ = run.clean_val(self.n_fit + self.n_measure, seed=self.seed)
        tau = self.tau
        base = {"budgets": self.budgets, "reference_budgets": self.reference_budgets, "tau": tau,
                "calibration": run.calibration_source, "eps_run": run_budget(run)}
        reason = self._inapplicable(run, len(x))
        if reason is not None:
            return DefenseResult(self.name, {**base, **model_verdict(None, "low", None, False), "applicable": False,
                                             "reason": reason, "reached": False, "rows": []}, self.params)
        n_fit, _ = split_sizes(len(x), self.n_fit, self.n_measure)
        opts = {"steps": self.steps, "lr_frac": self.lr_frac, "tau": tau, "lnf_eps": LNF_EPS,
                "batch_size": self.batch_size, "target_rate": self.target_rate,
                "target_dispersion": self.target_dispersion, "full_curve": self.full_curve}
        rows, found = budget_search(run.classifier, x[:n_fit], x[n_fit:], run.num_classes, self.budgets, opts)
        score = found if found is not None else 2.0 * max(self.budgets)
        flagged, cutoff = reference_verdict(score, self.reference_budgets, self.margin, max(self.budgets))
        fields = {**base, **model_verdict(score, "low", flagged, False), "reached": found is not None, "rows": rows,
                  "dispersive_mass": dispersive_mass(rows, len(self.budgets)), "reference_cutoff": cutoff,
                  "n_fit_used": n_fit, "n_measure_used": len(x) - n_fit, "applicable": True}
        verdict = "no reference" if flagged is None else ("flagged" if flagged else "not flagged")
        title = (f"Dispersion inversion on {run.cfg.label()}: "
                 + (f"eps {score * 255:.3g}/255" if found is not None else "not reached") + f", {verdict}")
        fig = plot_budget_curve(rows, self.target_rate, self.target_dispersion, found, cutoff,
                                out / "dispersion_inversion.png", title)
        return DefenseResult(self.name, fields, self.params, [fig])
