"""``cuba sweep``: train one config field over several values and seeds, then tabulate and plot.

Every cell (value x seed) is its own run folder ``OUT/FIELD=VALUE-sSEED``; a cell whose folder
already holds metrics.json is skipped, so an interrupted sweep continues where it stopped.
All cells are validated before the first one trains, so a typo fails in a second, not after an
hour. The summary is :func:`cuba.compare.compare` grouped by the swept field:
``OUT/sweep-FIELD.{md,csv,png}``.

The choice is made on the validation split only (METHOD.md §2: "everything chosen from data is
chosen on it; the test set is read once, for the reported metrics"). Below the table -- which keeps
the test columns for reporting, beside the validation ones -- the settings are ranked by val DS;
a setting whose validation CA is degenerate (:func:`cuba.compare.degenerate_reason`), whose val
ASR is under :data:`MIN_VAL_ASR` (a widely spread backdoor that rarely fires is not a better
attack), or that has no validation numbers, is ranked last with the reason. The last line names
the winner: ``best on validation: FIELD=VALUE``.

``within`` (``cuba sweep --within POINTS``) is the rule for a field that trades the attack against
something DS does not see -- eps, the trigger's L-inf budget, buys DS with stealth: the winner is
then the *first value as listed* among the eligible ones whose val DS is within POINTS percentage
points of the best (list eps smallest first and the stealthiest good-enough budget wins), the
"one-standard-error" habit of model selection. Without it the top val DS wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import yaml

from .config import FIELDS, ConfigError, TrainConfig, make_config
from .formatting import fmt_value, pct

if TYPE_CHECKING:
    from .compare import Group

# a setting must fire on at least this share of validation backdoor images to compete on DS
MIN_VAL_ASR = 0.9


def parse_value(raw: str) -> Any:
    """A sweep value as YAML reads it: '0.1' -> 0.1, '5' -> 5, 'residual' -> 'residual'."""
    return yaml.safe_load(raw)


def plan_cells(base: dict[str, Any], field: str, values: list[Any], seeds: list[int], out: Path) -> list[TrainConfig]:
    """One validated config per (value, seed), each with its own ``out`` folder."""
    if field not in FIELDS:
        raise ConfigError(f"sweep: unknown config field {field!r}")
    if field == "seed":
        raise ConfigError("sweep: seeds are given with --seeds, not swept as a field")
    if not values or not seeds:
        raise ConfigError("sweep: needs at least one value and one seed")
    cells = []
    for v in values:
        for s in seeds:
            cells.append(make_config({**base, field: v, "seed": s, "out": str(out / f"{field}={v}-s{s}")}))
    return cells


def run_sweep(
    base: dict[str, Any], field: str, values: list[Any], seeds: list[int], out: Path,
    runner: Callable[[TrainConfig], Any] | None = None, log: Callable[[str], None] = print,
    within: float | None = None,
) -> tuple[str, list[Path]]:
    """Train every missing cell, then write the grouped table and plot; return (markdown, files)."""
    from .compare import compare
    from .runs import is_finished

    if runner is None:
        from .pipeline import run_training as runner
    if within is not None and not within >= 0:
        raise ConfigError(f"sweep: --within must be >= 0 percentage points, got {within}")
    cells = plan_cells(base, field, values, seeds, out)
    for i, cfg in enumerate(cells, 1):
        done = is_finished(cfg.out)
        log(f"[{i}/{len(cells)}] {field}={getattr(cfg, field)} seed {cfg.seed}: {'done, skipped' if done else 'training'}")
        if not done:
            runner(cfg)
    md, files = compare([c.out for c in cells], out=out, name=f"sweep-{field}", by=field, val=True,
                        appendix=lambda groups: ranking_markdown(rank_by_validation(groups, field), field,
                                                                 within=within, order=values))
    return md, files


def _val_mean(runs: list, key: str) -> float:
    from .compare import metric_value

    vals = [v for v in (metric_value(r.metrics, f"val.{key}") for r in runs) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def rank_by_validation(groups: list[Group], field: str) -> list[dict[str, Any]]:
    """The settings best first by mean val DS; ineligible ones (see the module doc) last, each with
    its ``why``. Only the ``val`` block of metrics.json is read: the test set never decides."""
    from .compare import degenerate_reason, short_reason

    ranked = []
    for g in groups:
        entry: dict[str, Any] = {"value": g.config.get(field), "setting": g.name, "why": None,
                                 **{k: _val_mean(g.runs, k) for k in ("ds", "asr", "ca")}}
        missing = [r.seed for r in g.runs if not isinstance(r.metrics.get("val"), Mapping)]
        deg = []
        for r in g.runs:
            k = r.metrics.get("num_classes")
            block = r.metrics.get("val")
            why = degenerate_reason(block, num_classes=k if isinstance(k, int) else None) if isinstance(block, Mapping) else None
            if why:
                deg.append(f"{short_reason(why)} (seed {r.seed})")
        if missing:
            entry["why"] = "no validation metrics (seed " + ", ".join(map(str, missing)) + "): run made without a val split"
        elif deg:
            entry["why"] = "degenerate on validation: " + "; ".join(deg)
        elif math.isnan(entry["asr"]) or entry["asr"] < MIN_VAL_ASR:
            asr = "–" if math.isnan(entry["asr"]) else f"{100 * entry['asr']:.2f}%"
            entry["why"] = f"val ASR {asr} < {100 * MIN_VAL_ASR:.0f}%"
        elif math.isnan(entry["ds"]):
            entry["why"] = "no val DS"
        ranked.append(entry)
    # eligible first; then by val DS (higher first, missing last), val ASR breaking ties; stable otherwise
    key = lambda e: (e["why"] is not None, -e["ds"] if not math.isnan(e["ds"]) else math.inf,  # noqa: E731
                     -e["asr"] if not math.isnan(e["asr"]) else math.inf)
    return sorted(ranked, key=key)


def pick(ranked: list[dict[str, Any]], within: float | None = None, order: list[Any] | None = None) -> dict[str, Any] | None:
    """The winning entry of :func:`rank_by_validation`'s list, or None when none is eligible.

    With ``within`` (percentage points) the winner is the first of ``order`` (the values as listed)
    among the eligible entries whose val DS is at least best - within/100."""
    eligible = [e for e in ranked if e["why"] is None]
    if not eligible:
        return None
    if within is None:
        return eligible[0]
    close = [e for e in eligible if e["ds"] >= eligible[0]["ds"] - within / 100]
    listed = list(order) if order is not None else [e["value"] for e in ranked]
    return min(close, key=lambda e: listed.index(e["value"]) if e["value"] in listed else len(listed))


def best_on_validation(ranked: list[dict[str, Any]], field: str, within: float | None = None,
                       order: list[Any] | None = None) -> str:
    """``best on validation: FIELD=VALUE``, or why there is none."""
    winner = pick(ranked, within, order)
    if winner is None:
        return ("best on validation: none (every setting is degenerate, under the val ASR bar of "
                f"{100 * MIN_VAL_ASR:.0f}%, or lacks validation metrics)")
    rule = "" if within is None else f" (first as listed within {within:g} points of the top val DS)"
    return f"best on validation: {field}={fmt_value(winner['value'])}{rule}"


def ranking_markdown(ranked: list[dict[str, Any]], field: str, within: float | None = None,
                     order: list[Any] | None = None) -> str:
    lines = [f"Ranking by validation DS (the test columns above are reported, never used to choose; "
             f"val ASR must reach {100 * MIN_VAL_ASR:.0f}%):", "",
             f"| rank | {field} | setting | val DS % | val ASR % | val CA % | note |", "|---|---|---|---|---|---|---|"]
    for i, e in enumerate(ranked, 1):
        note = f"ranked last: {e['why']}" if e["why"] else ""
        lines.append(f"| {i} | {fmt_value(e['value'])} | {e['setting']} | {pct(e['ds'])} | {pct(e['asr'])} | {pct(e['ca'])} | {note} |")
    return "\n".join([*lines, "", best_on_validation(ranked, field, within, order)])
