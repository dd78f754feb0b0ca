"""``cuba compare``: one table of many runs, seeds of the same setting folded into mean ± std.

Runs are grouped by their whole resolved config minus the fields that do not change what is
trained (seed, output paths, progress bars, device, evaluation batch size). A group's name is
the run label (``cuba-fra``, ``badnets-t0``, ...) plus every other field that differs between
the groups being compared (``tau=0.04``), so a table never silently merges two settings.

This module makes the table (columns, Markdown, CSV, figures). Reading run folders, grouping them
and the degenerate rule are :mod:`cuba.run_groups`, shared with Table II and the sweep ranking;
its names are re-exported here, so ``from cuba.compare import Group, degenerate_reason`` still works.

Numbers are read from each run's metrics.json (written by ``cuba train`` / ``cuba evaluate
--write``); the spread is the sample standard deviation over seeds (n - 1 in the denominator),
left empty for a single seed. Rates are in %, D_p in nats, PSNR in dB.

DS is shown on its own scale (METHOD.md §2): ``DS floor`` (total collapse onto one class) and
``DS unif.`` (an attacker drawing uniformly from T(y), given the run's success counts) beside
it, and ``eff. classes`` (e^entropy of the successful predictions per source class). A run made
before these keys existed shows "–". ``--val`` adds the validation split's CA / ASR / DS (the
``val`` block of metrics.json) beside the test ones; the CSV always carries them.

A model that stopped classifying has no backdoor to measure: its ASR counts where a near-constant
predictor happens to point (a constant predictor scores (K-1)/K under FRA). Such runs are flagged
by :func:`degenerate_reason` and their backdoor cells read "n/a (degenerate)": a run is degenerate
when its metrics.json says so (``degenerate`` / ``degenerate_reason``) or, for older runs, when its
CA is under twice chance (2/K); a whole attacked group is also flagged when its mean CA is more
than 10 points under the clean group of the same data set and model. Degenerate seeds of an
otherwise healthy group are left out of its ASR / DS means, and the name says how many.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import ConfigError, make_config
from .formatting import fmt_value, mean_pm_std, mean_std
from .run_groups import (CLEAN_GAP, IN_LABEL, NOT_A_SETTING, REASON_CHANCE, REASON_CLEAN_GAP, Degeneracy, Group, Run,
                         clean_reference, degenerate_reason, find_runs, flagged, group_degeneracy, group_runs,
                         load_groups, load_run, mean_ca, metric_value, short_reason)
from .runs import RunFolder

# the names callers have always imported from here; the run-reading half lives in cuba.run_groups
__all__ = [
    "BACKDOOR_KEYS", "CLEAN_GAP", "COLUMNS", "IN_LABEL", "NA", "NOT_A_SETTING", "REASON_CHANCE", "REASON_CLEAN_GAP",
    "VAL_COLUMNS", "Degeneracy", "Group", "Run", "clean_reference", "columns", "compare", "degenerate_reason",
    "find_runs", "flagged", "group_degeneracy", "group_runs", "load_groups", "load_run", "mean_ca", "metric_value",
    "short_reason", "summarize", "table_rows", "to_csv", "to_markdown",
]

# (metrics.json key, column title, scale): the columns, DS on its own scale, stealth and time
COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("ca", "CA %", 100.0), ("asr", "ASR %", 100.0), ("asr_c", "ASR-C %", 100.0), ("ds", "DS %", 100.0),
    ("ds_min", "DS-min %", 100.0), ("ds_floor", "DS floor %", 100.0), ("ds_uniform", "DS unif. %", 100.0),
    ("effective_classes", "eff. classes", 1.0), ("d_p", "D_p", 1.0), ("psnr", "PSNR dB", 1.0),
    ("train_seconds", "train s", 1.0),
)
# the validation split's numbers (metrics.json "val" block), each shown right after its test twin
VAL_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("val.ca", "val CA %", 100.0), ("val.asr", "val ASR %", 100.0), ("val.ds", "val DS %", 100.0),
)
# the numbers that describe a backdoor: meaningless (n/a) on a model that stopped classifying
BACKDOOR_KEYS = frozenset({"asr", "asr_c", "ds", "ds_min", "ds_floor", "ds_uniform", "effective_classes", "d_p",
                           "val.asr", "val.asr_c", "val.ds", "val.ds_min"})
NA = "n/a (degenerate)"


def columns(val: bool = False) -> tuple[tuple[str, str, float], ...]:
    """The table's columns; with ``val`` each validation column follows its test twin."""
    if not val:
        return COLUMNS
    out: list[tuple[str, str, float]] = []
    for col in COLUMNS:
        out.append(col)
        out.extend(v for v in VAL_COLUMNS if v[0] == f"val.{col[0]}")
    return tuple(out)


def summarize(group: Group, key: str, scale: float, runs: list[Run] | None = None) -> tuple[float, float]:
    """(mean, sample std) of one metric over a group's runs (or ``runs``), NaNs ignored; std NaN for one value."""
    mean, std, _ = mean_std(v * scale for v in group.values(key, runs))
    return mean, std


def _val_kept(runs: list[Run]) -> list[Run]:
    """Runs whose validation block is not itself degenerate (K from the run's metrics)."""
    out = []
    for r in runs:
        block = r.metrics.get("val")
        k = r.metrics.get("num_classes")
        if isinstance(block, Mapping) and degenerate_reason(block, num_classes=k if isinstance(k, int) else None) is None:
            out.append(r)
    return out


def table_rows(groups: list[Group], by: str | None = None) -> list[dict[str, Any]]:
    """One dict per group: name, n, seeds, optional ``by`` value, and (mean, std) per column.

    Every column (validation ones included) is computed; the Markdown shows the ``val`` ones on
    request. ``degenerate`` holds the group's reason (its backdoor cells, listed in ``na``, are
    NaN and print as n/a); degenerate seeds of a healthy group are left out of the backdoor keys.
    """
    rows = []
    for g in groups:
        ref = clean_reference(g, groups)
        attacked = g.config.get("attack") != "none"
        deg = group_degeneracy(g.runs, mean_ca(ref.runs) if ref is not None else None, attacked)
        val_runs = _val_kept(deg.kept)
        # every validation block there is says the model stopped classifying on validation
        val_degenerate = not val_runs and any(isinstance(r.metrics.get("val"), Mapping) for r in deg.kept)
        row: dict[str, Any] = {"setting": deg.suffix(g.name), "n": len(g.runs), "seeds": sorted(r.seed for r in g.runs),
                               "degenerate": deg.reason, "na": set()}
        if by is not None:
            row[by] = g.config.get(by)
        for key, _, scale in (*COLUMNS, *VAL_COLUMNS):
            runs = None
            if key in BACKDOOR_KEYS:
                if attacked and (deg.reason is not None or (val_degenerate and key.startswith("val."))):
                    row["na"].add(key)
                    row[key], row[f"{key}_values"] = (math.nan, math.nan), []
                    continue
                runs = val_runs if key.startswith("val.") else deg.kept
            row[key] = summarize(g, key, scale, runs)
            row[f"{key}_values"] = [v * scale for v in g.values(key, runs)]  # per seed: plots show them all
        rows.append(row)
    if by is not None:
        rows.sort(key=lambda r: (r[by] is None, r[by] if isinstance(r[by], (int, float)) else str(r[by])))
    return rows


def _show(row: dict[str, Any], key: str) -> str:
    if key in row.get("na", ()):
        return NA
    return mean_pm_std(*row[key], digits=0 if key == "train_seconds" else 2)


def to_markdown(rows: list[dict[str, Any]], by: str | None = None, val: bool = False) -> str:
    cols = columns(val)
    head = ["setting", *([by] if by else []), "n", *(title for _, title, _ in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], *([fmt_value(r[by])] if by else []), str(r["n"])]
        cells += [_show(r, key) for key, _, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]], by: str | None = None) -> str:
    """Machine-readable twin of the table: ``<key>_mean`` and ``<key>_std`` per metric, same units,
    validation columns as ``val_<key>_*`` (always there; empty for runs without a val block);
    ``degenerate`` holds the reason, and a degenerate group's backdoor cells are empty."""
    cols = columns(True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["setting", *([by] if by else []), "n", "seeds", "degenerate",
                *(f"{k.replace('.', '_')}_{s}" for k, _, _ in cols for s in ("mean", "std"))])
    for r in rows:
        stats = [("" if math.isnan(x) else f"{x:.6g}") for k, _, _ in cols for x in r[k]]
        w.writerow([r["setting"], *([r[by]] if by else []), r["n"], " ".join(map(str, r["seeds"])), r.get("degenerate") or "", *stats])
    return buf.getvalue()


def compare(paths: list[str | Path], out: Path | None = None, name: str = "compare", by: str | None = None,
            source_class: int | None = None, val: bool = False,
            appendix: Callable[[list[Group]], str] | None = None) -> tuple[str, list[Path]]:
    """Build the table for ``paths``; write NAME.md / NAME.csv (and figures) into ``out``; return (markdown, files).

    ``val`` shows the validation columns; ``appendix`` adds Markdown made from the groups below the
    table (``cuba sweep`` puts its validation ranking there).
    """
    from .config import FIELDS

    if by is not None and by not in FIELDS:
        raise ConfigError(f"--by: unknown config field {by!r}")
    groups = load_groups(paths)
    rows = table_rows(groups, by)
    md = to_markdown(rows, by, val)
    if appendix is not None:
        md += "\n\n" + appendix(groups)
    # read and checked before anything is written: a refused --source-class leaves no files
    source_entries = _source_entries(groups, source_class) if source_class is not None and out is not None else None
    written: list[Path] = []
    if out is not None:
        from .runs import write_text

        for suffix, text in (("md", md + "\n"), ("csv", to_csv(rows, by))):
            write_text(out / f"{name}.{suffix}", text)
            written.append(out / f"{name}.{suffix}")
        if by is not None:
            from .figures import plot_sweep

            written.append(plot_sweep(rows, by, out / f"{name}.png"))
        if source_entries is not None:
            from .figures import plot_source_class_comparison

            path = out / f"{name}-source{source_class}.png"
            written.append(plot_source_class_comparison(source_entries, source_class, path))
    return md, written


def _source_entries(groups: list[Group], source: int) -> list[tuple]:
    """What Fig. 8 plots for the lowest-seed run of every attacked group (figures.plot_source_class_comparison)."""
    entries = []
    for g in groups:
        run = min(g.runs, key=lambda r: r.seed)
        if run.config.get("attack") == "none" or not (run.path / "predictions.npz").is_file():
            continue
        pred, targets = RunFolder(run.path).predictions()
        if pred.y_pred_backdoor is None or targets is None:
            continue
        if not 0 <= source < targets.shape[0]:
            raise ConfigError(f"--source-class: must lie in [0, {targets.shape[0]}), got {source}")
        full_range = make_config(run.config).full_range
        entries.append((f"{g.name} (seed {run.seed})", pred.y_true, pred.y_pred_backdoor, targets, full_range))
    if not entries:
        raise ConfigError("--source-class: none of the runs is an attack (no backdoor predictions)")
    return entries
