"""How universal a CUBA model's trigger is, and whether dispersion inversion's search finds it (issue 18).

Dispersion inversion (DI) searches for ONE perturbation, shared by all inputs, that makes clean
inputs misclassified and spread over the wrong classes (CUBA's LNF loss, projected Adam from 0).
CUBA's generator makes an input-specific trigger delta(x) = G(x) - x within its eps. For each run
given, on DI's own images (the run's clean validation split, DI's seed and fit / measure split;
never test images), this reports flip rate, dispersion (DI's own
:func:`~cuba.defenses.dispersion_inversion.dispersion`) and LNF loss on the measurement images of

* ``own``: clip(x + delta(x)), each input with its own trigger (the backdoor as trained);
* ``other``: clip(x + delta(x')), each input with another input's trigger;
* ``mean``: clip(x + mean delta), the fit images' average trigger: a universal perturbation that
  exists within the run's eps (the defender cannot know it; it shows what the search could reach);
* ``search``: DI's own search (its defaults) at ``--budget`` (default: the smallest of DI's budgets
  at or above the run's eps);
* ``restarts`` (with ``--restarts R``): the same search from R random starts, uniform in the
  budget's ball (seeded), keeping the one with the lowest LNF loss on the *fit* images -- what a
  defender could run: it sees neither the trigger nor the measurement images' result.

``mean`` flipping and dispersing while ``search`` does not, at a higher loss, is a search that
stopped in a worse optimum; both short of DI's targets (flip 0.9, dispersion 0.8) is a backdoor a
universal perturbation reaches less dispersively than the trigger itself.

    python benchmarks/trigger_universality.py --data-dir ../shared/data RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cuba.defenses.base import load_attack_run
from cuba.defenses.dispersion_inversion import (DEFAULT_BUDGETS, LNF_EPS, DispersionInversion, fit_universal,
                                                measure, predict, run_budget)
from cuba.defenses.rules import split_sizes


def restarted_search(model: torch.nn.Module, x: torch.Tensor, pred: torch.Tensor, num_classes: int, eps: float,
                     restarts: int, di: DispersionInversion, seed: int = 0) -> torch.Tensor:
    """DI's search from ``restarts`` random starts in the eps ball; the lowest fit loss wins."""
    g = torch.Generator().manual_seed(seed)
    best, best_loss = None, float("inf")
    for _ in range(restarts):
        start = (torch.rand((1, *x.shape[1:]), generator=g) * 2 - 1) * eps
        d = fit_universal(model, x, pred, num_classes, eps, di.steps, di.lr_frac, di.tau, LNF_EPS, start=start)
        loss = measure(model, x, pred, d, num_classes, di.tau, LNF_EPS)["loss"]
        if loss < best_loss:
            best, best_loss = d, loss
    return best


def universality(run_dir: Path, data_dir: str | None, budget: float | None = None, restarts: int = 0) -> dict:
    run = load_attack_run(run_dir, device="cpu", data_dir=data_dir)
    eps_run = run_budget(run)
    if eps_run is None:
        if not restarts:
            raise SystemExit(f"{run_dir}: no residual trigger generator (a clean model or a patch) to measure")
        if budget is None:
            raise SystemExit(f"{run_dir}: a model without a residual trigger needs --budget")
        eps_run = 0.0  # a clean (or patch) model: only the searches run, as the controls of --restarts
    di = DispersionInversion()
    x, _ = run.clean_val(di.n_fit + di.n_measure, seed=di.seed)
    n_fit, _ = split_sizes(len(x), di.n_fit, di.n_measure)
    xf, xm = x[:n_fit], x[n_fit:]
    model = run.classifier.eval()
    pf, pm = predict(model, xf), predict(model, xm)
    budget = budget if budget is not None else min((b for b in DEFAULT_BUDGETS if b >= eps_run - 1e-9), default=max(DEFAULT_BUDGETS))
    perturbations = {}
    if eps_run:
        delta = run.backdoor(xm) - xm
        perturbations.update(own=delta, other=torch.roll(delta, 1, 0), mean=(run.backdoor(xf) - xf).mean(0, keepdim=True))
    perturbations["search"] = fit_universal(model, xf, pf, run.num_classes, budget, di.steps, di.lr_frac, di.tau, LNF_EPS)
    if restarts:
        perturbations["restarts"] = restarted_search(model, xf, pf, run.num_classes, budget, restarts, di)
    rows = {name: {**{k: round(v, 4) for k, v in measure(model, xm, pm, d, run.num_classes, di.tau, LNF_EPS).items()},
                   "linf_255": round(float(d.abs().amax()) * 255, 2)} for name, d in perturbations.items()}
    return {"run": run_dir.name, "setting": run.cfg.label(), "eps_255": round(eps_run * 255, 2),
            "search_budget_255": round(budget * 255, 2), "n_fit": len(xf), "n_measure": len(xm), **rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--budget", type=float, default=None, help="DI search budget in 1/255 (default: see above)")
    ap.add_argument("--restarts", type=int, default=0, help="also search from this many random starts (clean runs allowed)")
    a = ap.parse_args()
    if a.budget is not None and not 0 < a.budget <= 255:
        ap.error(f"--budget must be in (0, 255] (1/255 units), got {a.budget}")
    if a.restarts < 0:
        ap.error(f"--restarts must be >= 0, got {a.restarts}")
    budget = a.budget / 255 if a.budget is not None else None
    print(json.dumps([universality(r, a.data_dir, budget, a.restarts) for r in a.runs], indent=1))


if __name__ == "__main__":
    main()
