"""``cuba compare``: one table of many runs, seeds of the same setting folded into mean ± std.

Runs are grouped by their whole resolved config minus the fields that do not change what is
trained (seed, output paths, progress bars, device, evaluation batch size). A group's name is
the run label (``cuba-fra``, ``badnets-t0``, ...) plus every other field that differs between
the groups being compared (``tau=0.04``), so a table never silently merges two settings.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import RUN_ONLY_FIELDS, ConfigError, make_config
from .metrics import at_chance
from .runs import RunFolder, is_finished
from .formatting import fmt_value, mean_pm_std, mean_std

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
# a degenerate model: CA at chance (cuba.metrics.at_chance), or more than CLEAN_GAP under the clean reference
CLEAN_GAP = 0.10
REASON_CHANCE = "CA at chance"
REASON_CLEAN_GAP = "CA far below clean reference"


def columns(val: bool = False) -> tuple[tuple[str, str, float], ...]:
    """The table's columns; with ``val`` each validation column follows its test twin."""
    if not val:
        return COLUMNS
    out: list[tuple[str, str, float]] = []
    for col in COLUMNS:
        out.append(col)
        out.extend(v for v in VAL_COLUMNS if v[0] == f"val.{col[0]}")
    return tuple(out)


def metric_value(metrics: Mapping[str, Any], key: str) -> float:
    """A number from metrics.json, ``a.b`` reading a nested block; NaN where absent, null or not a number
    (old runs lack the newer keys, and a clean model has no ASR)."""
    v: Any = metrics
    for part in key.split("."):
        v = v.get(part) if isinstance(v, Mapping) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _rate(name: str, v: Any) -> float | None:
    """A CA-like rate in [0, 1]; None when not known (absent, null, NaN). A percentage (97.0) is an
    error rather than a silent "never degenerate"."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"degenerate_reason: {name} must be a number, got {type(v).__name__}")
    if math.isnan(v):
        return None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"degenerate_reason: {name} must be a rate in [0, 1], got {v:g}")
    return float(v)


def degenerate_reason(metrics: Mapping[str, Any], clean_ca: float | None = None,
                      num_classes: int | None = None) -> str | None:
    """Why a model's backdoor numbers mean nothing, or None when they do.

    The rule lives here, once, for compare, table2, report.html and the sweep ranking:

    * a run's own verdict wins when metrics.json has one (``degenerate`` true: its
      ``degenerate_reason``, or "CA at chance"; false: the chance rule is not re-applied);
    * otherwise (runs made before that key) CA < 2/K, K from ``num_classes`` or
      ``metrics["num_classes"]`` (no K known: the chance rule is skipped);
    * with ``clean_ca`` (the clean model's CA on the same data set and model, a rate): CA more than
      10 points below it -- an attack that wrecked the classifier is not a stealthy backdoor.

    ``metrics`` may be a whole metrics.json, its ``val`` block, or a dict of group means.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"degenerate_reason: metrics must be a mapping (a metrics.json dict), got {type(metrics).__name__}")
    ca = _rate("ca", metrics.get("ca"))
    ref = _rate("clean_ca", clean_ca)
    stored = metrics.get("degenerate")
    if stored is True:
        return str(metrics.get("degenerate_reason") or REASON_CHANCE)
    if stored is None:
        k = num_classes if num_classes is not None else metrics.get("num_classes")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 2:
                raise ValueError(f"degenerate_reason: num_classes must be a whole number >= 2, got {k!r}")
            if at_chance(ca, k):
                return REASON_CHANCE
    if ref is not None and ca is not None and ref - ca > CLEAN_GAP:
        return REASON_CLEAN_GAP
    return None


def short_reason(reason: str) -> str:
    """The few words a table name can carry: a run's own long verdict ("CA 9.80% is at chance
    level (< 2/K = 20.0%): ...") reads "CA at chance"; the full text stays in the CSV."""
    return REASON_CHANCE if "chance" in reason.lower() else reason


def flagged(name: str, reason: str | None) -> str:
    """``name (degenerate: reason)``; a reason that already says "degenerate" is not doubled."""
    if not reason:
        return name
    short = short_reason(reason)
    return f"{name} ({short})" if short.lower().startswith("degenerate") else f"{name} (degenerate: {short})"


# config fields that do not change the trained model (or only its file names)
NOT_A_SETTING = RUN_ONLY_FIELDS | {"seed"}  # seeds of one setting are folded together
# fields already spelled out by TrainConfig.label()
IN_LABEL = {"attack", "variant", "k", "target_class"}


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    label: str

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))


@dataclass
class Group:
    name: str
    runs: list[Run] = field(default_factory=list)

    def values(self, key: str, runs: list[Run] | None = None) -> list[float]:
        """One value per run (``runs``: a subset, e.g. its non-degenerate seeds); NaN where missing."""
        return [metric_value(r.metrics, key) for r in (self.runs if runs is None else runs)]

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config


@dataclass
class Degeneracy:
    """Which of a group's runs may speak for its backdoor numbers.

    ``reason``: the whole group is degenerate (all its seeds, or its mean CA against the clean
    reference) and its backdoor cells read n/a. ``dropped``: degenerate seeds of a group that is
    otherwise healthy; they are left out of the backdoor means (a collapsed seed would pull the
    DS towards a constant predictor's value) while CA keeps every seed.
    """
    reason: str | None = None
    kept: list[Run] = field(default_factory=list)
    dropped: list[tuple[Run, str]] = field(default_factory=list)

    def suffix(self, name: str) -> str:
        if self.reason:
            return flagged(name, self.reason)
        if self.dropped:
            why = "; ".join(dict.fromkeys(short_reason(r) for _, r in self.dropped))
            n = len(self.dropped) + len(self.kept)
            return f"{name} ({len(self.dropped)}/{n} seeds degenerate: {why}; left out of ASR/DS)"
        return name


def mean_ca(runs: list[Run]) -> float | None:
    vals = [v for v in (metric_value(r.metrics, "ca") for r in runs) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def group_degeneracy(runs: list[Run], clean_ca: float | None = None, attacked: bool = True) -> Degeneracy:
    """Apply :func:`degenerate_reason` to every run, and to the group's mean CA against ``clean_ca``."""
    out = Degeneracy()
    for r in runs:
        why = degenerate_reason(r.metrics)
        if why is None:
            out.kept.append(r)
        else:
            out.dropped.append((r, why))
    if runs and not out.kept:
        out.reason = out.dropped[0][1]
        return out
    ca = mean_ca(runs)
    if attacked and clean_ca is not None and ca is not None:
        out.reason = degenerate_reason({"ca": ca}, clean_ca=clean_ca)  # no K: only the clean-gap rule
    return out


def _is_run(p: Path) -> bool:
    return RunFolder(p).is_run() and is_finished(p)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Each path is a run folder, or a folder whose sub-folders (any depth) hold finished runs."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a folder")
        if _is_run(p):
            found.append(p)
            continue
        inner = sorted(c.parent for c in p.rglob("metrics.json") if _is_run(c.parent))
        if not inner:
            raise FileNotFoundError(f"{p} holds no finished run (config.yaml + metrics.json, status finished)")
        found.extend(inner)
    return list(dict.fromkeys(found))  # drop duplicates, keep order


def load_run(path: Path) -> Run:
    run = RunFolder(path)
    cfg = run.config()
    # the resolved config: a field added after a run was made reads as its default, not as a difference
    return Run(path, cfg.to_dict(), run.metrics(), cfg.label())


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs by setting, name each group, keep the order in which settings first appear."""
    keys = [tuple(sorted((k, repr(v)) for k, v in r.config.items() if k not in NOT_A_SETTING)) for r in runs]
    distinct = list(dict.fromkeys(keys))
    # the fields whose value differs between settings, beyond what the label already says
    varying = sorted({
        k for k in {k for key in distinct for k, _ in key} - IN_LABEL
        if len({dict(key).get(k) for key in distinct}) > 1
    })
    groups: dict[tuple, Group] = {}
    for run, key in zip(runs, keys):
        if key not in groups:
            extra = ", ".join(f"{k}={fmt_value(run.config.get(k))}" for k in varying)
            groups[key] = Group(f"{run.label} ({extra})" if extra else run.label)
        groups[key].runs.append(run)
    return list(groups.values())


def summarize(group: Group, key: str, scale: float, runs: list[Run] | None = None) -> tuple[float, float]:
    """(mean, sample std) of one metric over a group's runs (or ``runs``), NaNs ignored; std NaN for one value."""
    mean, std, _ = mean_std(v * scale for v in group.values(key, runs))
    return mean, std


def clean_reference(group: Group, groups: list[Group]) -> Group | None:
    """The clean group (attack none) on the same data set and model that differs from ``group`` in
    the fewest settings -- the CA an attacked model should keep. None when there is none."""
    cfg = group.config
    clean = [g for g in groups if g.config.get("attack") == "none" and g is not group
             and g.config.get("dataset") == cfg.get("dataset") and g.config.get("model") == cfg.get("model")]
    if not clean:
        return None
    differ = lambda g: sum(g.config.get(k) != v for k, v in cfg.items() if k not in NOT_A_SETTING)  # noqa: E731
    return min(clean, key=differ)


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


def load_groups(paths: list[str | Path]) -> list[Group]:
    return group_runs([load_run(p) for p in find_runs(paths)])


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
    written: list[Path] = []
    if out is not None:
        from .runs import write_text

        for suffix, text in (("md", md + "\n"), ("csv", to_csv(rows, by))):
            write_text(out / f"{name}.{suffix}", text)
            written.append(out / f"{name}.{suffix}")
        if by is not None:
            from .figures import plot_sweep

            written.append(plot_sweep(rows, by, out / f"{name}.png"))
        if source_class is not None:
            written.append(_source_figure(groups, source_class, out / f"{name}-source{source_class}.png"))
    return md, written


def _source_figure(groups: list[Group], source: int, path: Path) -> Path:
    """Fig. 8 for the lowest-seed run of every attacked group."""
    from .figures import plot_source_class_comparison

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
    return plot_source_class_comparison(entries, source, path)
