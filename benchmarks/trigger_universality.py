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
  at or above the run's eps).

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


def universality(run_dir: Path, data_dir: str | None, budget: float | None = None) -> dict:
    run = load_attack_run(run_dir, device="cpu", data_dir=data_dir)
    eps_run = run_budget(run)
    if eps_run is None:
        raise SystemExit(f"{run_dir}: no residual trigger generator (a clean model or a patch) to measure")
    di = DispersionInversion()
    x, _ = run.clean_val(di.n_fit + di.n_measure, seed=di.seed)
    n_fit, _ = split_sizes(len(x), di.n_fit, di.n_measure)
    xf, xm = x[:n_fit], x[n_fit:]
    model = run.classifier.eval()
    pf, pm = predict(model, xf), predict(model, xm)
    delta = run.backdoor(xm) - xm
    budget = budget if budget is not None else min((b for b in DEFAULT_BUDGETS if b >= eps_run - 1e-9), default=max(DEFAULT_BUDGETS))
    perturbations = {
        "own": delta, "other": torch.roll(delta, 1, 0),
        "mean": (run.backdoor(xf) - xf).mean(0, keepdim=True),
        "search": fit_universal(model, xf, pf, run.num_classes, budget, di.steps, di.lr_frac, di.tau, LNF_EPS),
    }
    rows = {name: {**{k: round(v, 4) for k, v in measure(model, xm, pm, d, run.num_classes, di.tau, LNF_EPS).items()},
                   "linf_255": round(float(d.abs().amax()) * 255, 2)} for name, d in perturbations.items()}
    return {"run": run_dir.name, "setting": run.cfg.label(), "eps_255": round(eps_run * 255, 2),
            "search_budget_255": round(budget * 255, 2), "n_fit": len(xf), "n_measure": len(xm), **rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--budget", type=float, default=None, help="DI search budget in 1/255 (default: see above)")
    a = ap.parse_args()
    if a.budget is not None and not 0 < a.budget <= 255:
        ap.error(f"--budget must be in (0, 255] (1/255 units), got {a.budget}")
    print(json.dumps([universality(r, a.data_dir, a.budget / 255 if a.budget is not None else None) for r in a.runs], indent=1))


if __name__ == "__main__":
    main()
