"""Untargeted trigger inversion: a model-level detector in the spirit of BTI-DBF(U) (Xu et al., ICLR
2024) and UNICORN (Wang et al., ICLR 2023), reduced to its core question -- how small a bounded,
input-agnostic change of the input suffices to move clean inputs *out of* their class? A backdoor
is exactly such a change (CUBA's trigger: an L-inf residual of at most ``eps``, 0.1 = 25.5/255 by
default), so a backdoored model should need a smaller budget than a clean one of the same
architecture. Untargeted on purpose: the inversion never names a target class, so it is not
blind to FRA/NRA backdoors, which spread triggered inputs over the wrong classes
(``assumes_target_class: false``). This is not a reproduction of either paper: both train a
generator of input-specific triggers (BTI-DBF also decouples benign features first); a universal
additive perturbation is the simplest member of that family and is deterministic.

Search. Clean validation images (:meth:`AttackRun.clean_val`) are split into a *fit* part and a
*held-out* part; each image's label is the model's own clean prediction y(x). For each L-inf budget
eps of the schedule ``budgets`` (in units of 1/255, increasing), one universal perturbation delta,
||delta||_inf <= eps, applied as clip(x + delta, 0, 1), minimises over the fit images

    mean_x max(f_y(x + delta) - max_{k != y} f_k(x + delta), -KAPPA)

(the logit margin of the clean-predicted class, floored at -KAPPA = -1 so an input already moved
out of its class stops pulling delta and the rest get the gradient), by projected signed-gradient
descent: ``steps`` steps of size 2.5 eps / steps (the step rule of Madry et al.'s PGD), each
followed by projection onto the eps-ball. The search at a budget starts from the perturbation found
at the budget before (feasible there, so a larger budget never starts worse); at each budget the
iterate with the highest fit flip rate is kept (ties: the lower loss). Its *flip rate* -- the
share of images whose prediction on clip(x + delta) differs from y(x) -- is reported on the fit
images and on the held-out ones; the held-out rate, which the perturbation was not fitted on,
decides.

Score. ``score`` = the smallest budget (in 1/255) whose held-out flip rate reaches ``target``
(0.8), null when no budget of the schedule does (the model needs more than the largest).
*Low is suspicious.* The resolution is the schedule's (powers of two by default). Why 0.8 and not
0.9: an all-to-one trigger moves every image out of its class except those of the target class,
at most 1 - 1/K of them (0.9 for K = 10), so a target at 0.9 would be out of reach of the very
backdoors the positive controls plant; keep ``target`` below 1 - 1/K. With ``stop_at_target`` the
schedule stops at the score budget (later budgets report null flip rates).

Decision. Whether a budget is *small* depends on the architecture and the data, so a threshold
needs clean reference models, which the defender trains (the project's threat model). Give
``reference_budget`` = the score this detector, with the same schedule, steps and target, gives a
clean model of the same architecture and data set: the model is flagged when score <
reference_budget / ``margin`` (2). Without a reference ``flagged`` is null and the headline says
"no reference". A model that never reaches the target is not flagged when reference_budget /
margin is within the schedule (its budget exceeds the largest one), else it cannot be decided.

Cost: up to len(budgets) * (steps + 1) forward and backward passes over the fit images, plus one
forward pass over the held-out images per budget; with the defaults (8 budgets, 50 steps, 256 fit
images) about 105,000 image passes: minutes for the MNIST SimpleCNN on one CPU core, seconds on a
GPU, less with ``stop_at_target`` (the default) on a model that reaches the target early.

Not applicable (``"applicable": false`` with a ``reason``) when the classifier's output does not
depend on its input (no gradient reaches the perturbation): no budget can move anything.

defense.json: ``budgets`` (1/255), ``flip_rate_fit`` / ``flip_rate_holdout`` per budget (null = not
run), ``target``, ``score`` (1/255, or null), ``score_unit``, ``reached``, ``reference_budget``,
``margin``, ``flagged`` (null without a reference), ``level`` / ``score_suspicious`` ("low") /
``assumes_target_class`` (false) (:func:`~cuba.defenses.base.model_verdict`), ``n_fit_used`` /
``n_holdout_used`` / ``calibration``, ``trigger_linf`` (median L-inf size of the run's own trigger
on the held-out images, in 1/255, for comparison with the score; null for a clean model),
``applicable`` (+ ``reason``). Figure: ``trigger_inversion.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .base import AttackRun, Defense, DefenseResult, check_param, model_verdict, not_applicable, register
from .mm_bd import class_margins
from .model_level import reference_flag
from .plots import plot_trigger_inversion

KAPPA = 1.0  # margin floor: an input moved out of its class by this many logits stops pulling delta
DEFAULT_BUDGETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def perturbed(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """clip(x + delta, 0, 1): the perturbed images stay valid images."""
    return (x + delta).clamp(0.0, 1.0)


@torch.no_grad()
def flip_rate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, batch_size: int = 1024) -> float:
    """Share of ``x`` whose prediction on clip(x + delta) is not ``labels`` (their clean prediction)."""
    if len(x) == 0:
        return float("nan")
    moved = sum(int((model(perturbed(xb, delta)).float().argmax(1) != yb).sum())
                for xb, yb in zip(x.split(batch_size), labels.split(batch_size)))
    return moved / len(x)


def _loss_and_grad(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor,
                   batch_size: int) -> tuple[float, float, torch.Tensor | None]:
    """(mean floored margin, flip rate, gradient of the mean w.r.t. delta or None when no gradient
    reaches delta) at ``delta``, accumulated over batches of the fit images."""
    d = delta.detach().clone().requires_grad_(True)
    total, moved, has_grad = 0.0, 0, False
    for xb, yb in zip(x.split(batch_size), labels.split(batch_size)):
        with torch.enable_grad():
            logits = model(perturbed(xb, d)).float()
            loss = class_margins(logits, yb).clamp_min(-KAPPA).sum() / len(x)
        moved += int((logits.argmax(1) != yb).sum())
        total += float(loss.detach())
        if loss.requires_grad:
            loss.backward()
            has_grad = True
    return total, moved / len(x), (d.grad if has_grad and d.grad is not None else None)


def universal_perturbation(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
                           init: torch.Tensor | None = None, batch_size: int = 1024) -> tuple[torch.Tensor, float, bool]:
    """(best delta in the eps-ball, its flip rate on ``x``, whether any gradient reached delta).

    Projected signed-gradient descent on the floored margin, from ``init`` (projected) or zero;
    the kept iterate has the highest flip rate on ``x``, ties broken by the lower loss."""
    delta = torch.zeros_like(x[0]) if init is None else init.detach().clamp(-eps, eps)
    step = 2.5 * eps / steps
    best, best_key, any_grad = delta.clone(), (-1.0, -math.inf), False
    for i in range(steps + 1):
        loss, rate, grad = _loss_and_grad(model, x, labels, delta, batch_size)
        if (rate, -loss) > best_key:
            best, best_key = delta.clone(), (rate, -loss)
        if i == steps or grad is None:
            break
        any_grad = True
        delta = (delta - step * grad.sign()).clamp(-eps, eps)
    return best, best_key[0], any_grad


def budget_search(model: nn.Module, x_fit: torch.Tensor, y_fit: torch.Tensor, x_hold: torch.Tensor, y_hold: torch.Tensor,
                  budgets: tuple[float, ...], steps: int, target: float, stop_at_target: bool = True,
                  batch_size: int = 1024) -> dict:
    """Flip rates per budget (pixel units, increasing), warm-starting each from the last; stops after
    the first budget whose held-out rate reaches ``target`` when ``stop_at_target``."""
    was_training = model.training
    model.eval()
    rate_fit: list[float | None] = [None] * len(budgets)
    rate_hold: list[float | None] = [None] * len(budgets)
    delta, deltas, any_grad = None, [None] * len(budgets), False
    for i, eps in enumerate(budgets):
        delta, rate_fit[i], grad_seen = universal_perturbation(model, x_fit, y_fit, eps, steps, delta, batch_size)
        any_grad |= grad_seen
        rate_hold[i] = flip_rate(model, x_hold, y_hold, delta, batch_size)
        deltas[i] = delta.cpu()
        if stop_at_target and rate_hold[i] >= target:
            break
    model.train(was_training)
    idx = smallest_budget_index(rate_hold, target)
    return {"flip_rate_fit": rate_fit, "flip_rate_holdout": rate_hold, "score_index": idx,
            "delta": None if idx is None else deltas[idx], "input_dependent": any_grad}


def smallest_budget_index(rates: list[float | None], target: float) -> int | None:
    """Index of the first budget whose flip rate reaches ``target`` (None: none of them does)."""
    return next((i for i, r in enumerate(rates) if r is not None and r >= target), None)


def decide(score: float | None, reference_budget: float | None, margin: float, largest: float) -> bool | None:
    """The flag: score < reference_budget / margin (:func:`~cuba.defenses.model_level.reference_flag`).
    None without a reference, and for a model that never reached the target (score None, i.e. >
    ``largest``) when the cut lies beyond ``largest``."""
    return reference_flag(score, [] if reference_budget is None else [reference_budget], margin, largest)[0]


def _split(x: torch.Tensor, n_fit: int, n_holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first images for fitting, the rest held out; shares kept when fewer images exist."""
    k = len(x) if len(x) >= n_fit + n_holdout else max(1, round(len(x) * n_fit / (n_fit + n_holdout)))
    return x[:min(k, n_fit)], x[min(k, n_fit):]


@torch.no_grad()
def trigger_linf(run: AttackRun, x: torch.Tensor) -> float | None:
    """Median L-inf size (1/255) of the run's own trigger on ``x``; None for a clean model."""
    if run.trigger is None or len(x) == 0:
        return None
    return float((run.backdoor(x) - x).abs().flatten(1).amax(1).median()) * 255.0


@register
class TriggerInversion(Defense):
    name = "trigger-inversion"

    @classmethod
    def headline(cls, f: dict) -> str:
        na = not_applicable(f)
        if na:
            return na
        found = (f"budget {f['score']:g}/255 moves >= {100 * f['target']:g}% of held-out clean inputs out of their class"
                 if f["score"] is not None else f"{100 * f['target']:g}% not reached within {max(f['budgets']):g}/255")
        if f.get("reference_budget") is not None:
            rule = f"reference {f['reference_budget']:g}/255, margin {f['margin']:g}"
        elif f.get("reference_scores"):  # references given, none reached the target: beyond the schedule
            rule = f"every reference beyond {max(f['budgets']):g}/255, margin {f['margin']:g}"
        else:
            return f"{found}; no reference (flagged n/a)"
        verdict = {True: "flagged", False: "not flagged", None: "undecided"}[f["flagged"]]
        return f"{found}; {verdict} ({rule})"

    @classmethod
    def format_score(cls, score: float, fields: dict) -> str:
        return f"{score:g}/255"

    @classmethod
    def with_references(cls, f: dict, reference_scores: list[float]) -> dict | None:
        """Decide ``flagged`` with ``reference_budget`` = the smallest reference score (the most easily
        moved clean model, as conservative as :class:`DispersionInversion`'s min). A reference that
        never reached the target (score null) needs more than the largest budget: when every reference
        is such, a suspect is flagged if its score is under largest / margin (certain whatever the
        references' true budgets) and left undecided otherwise."""
        if not_applicable(f) or not reference_scores:
            return None
        flagged, cut = reference_flag(f["score"], reference_scores, float(f["margin"]), max(f["budgets"]))
        return {**f, "flagged": flagged, "reference_scores": [None if r is None else float(r) for r in reference_scores],
                **({} if cut is None else {"reference_budget": cut * float(f["margin"])})}

    def __init__(self, budgets: tuple[float, ...] = DEFAULT_BUDGETS, steps: int = 50, target: float = 0.8,
                 n_fit: int = 256, n_holdout: int = 256, reference_budget: float | None = None, margin: float = 2.0,
                 stop_at_target: bool = True, batch_size: int = 1024, seed: int = 0) -> None:
        super().__init__(seed)
        budgets = tuple(budgets) if isinstance(budgets, (list, tuple)) else (budgets,)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        check_param("budgets", len(budgets) >= 1 and all(number(b) and 0 < b <= 255 for b in budgets)
                    and all(a < b for a, b in zip(budgets, budgets[1:])),
                    "an increasing list of L-inf budgets in (0, 255] (units of 1/255)", budgets)
        for name, v, least in (("steps", steps, 1), ("n_fit", n_fit, 1), ("n_holdout", n_holdout, 1),
                               ("batch_size", batch_size, 1)):
            check_param(name, isinstance(v, int) and not isinstance(v, bool) and v >= least, f"an integer >= {least}", v)
        check_param("target", number(target) and 0 < target <= 1, "in (0, 1]", target)
        check_param("reference_budget", reference_budget is None or (number(reference_budget) and reference_budget > 0),
                    "null or a budget > 0 (units of 1/255)", reference_budget)
        check_param("margin", number(margin) and margin >= 1, "a finite number >= 1", margin)
        check_param("stop_at_target", isinstance(stop_at_target, bool), "true or false", stop_at_target)
        self.budgets, self.steps, self.target = tuple(float(b) for b in budgets), steps, float(target)
        self.n_fit, self.n_holdout, self.margin, self.stop_at_target = n_fit, n_holdout, float(margin), stop_at_target
        self.reference_budget = None if reference_budget is None else float(reference_budget)
        self.batch_size = batch_size

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        x, _ = run.clean_val(self.n_fit + self.n_holdout, seed=self.seed)
        x_fit, x_hold = _split(x, self.n_fit, self.n_holdout)
        y_fit, y_hold = run.logits(x_fit).argmax(1), run.logits(x_hold).argmax(1)
        res = budget_search(run.classifier, x_fit, y_fit, x_hold, y_hold, tuple(b / 255.0 for b in self.budgets),
                            self.steps, self.target, self.stop_at_target, self.batch_size)
        idx = res["score_index"]
        score = None if idx is None else self.budgets[idx]
        reason = None if res["input_dependent"] else (
            "the classifier's output does not depend on its input (no gradient reaches the perturbation): "
            "no budget can move an input out of its class")
        flagged = decide(score, self.reference_budget, self.margin, self.budgets[-1]) if reason is None else None
        fields: dict = {
            "budgets": list(self.budgets), "flip_rate_fit": res["flip_rate_fit"], "flip_rate_holdout": res["flip_rate_holdout"],
            "target": self.target, **model_verdict(score, "low", flagged, assumes_target_class=False),
            "score_unit": "1/255 (L-inf, pixels in [0, 1])", "reached": score is not None,
            "reference_budget": self.reference_budget, "margin": self.margin,
            "n_fit_used": len(x_fit), "n_holdout_used": len(x_hold), "calibration": run.calibration_source,
            "trigger_linf": trigger_linf(run, x_hold), "applicable": reason is None, **({"reason": reason} if reason else {}),
        }
        delta = None if res["delta"] is None else res["delta"].numpy()
        fig = plot_trigger_inversion(self.budgets, res["flip_rate_fit"], res["flip_rate_holdout"], self.target, score, delta,
                                     out / "trigger_inversion.png",
                                     title=f"Untargeted trigger inversion on {run.cfg.label()}: score "
                                     + ("not reached" if score is None else f"{score:g}/255"))
        return DefenseResult(self.name, fields, self.params, [fig])
