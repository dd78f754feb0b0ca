"""``cuba compare``: one table of many runs, seeds of the same setting folded into mean ± std.

Runs are grouped by their whole resolved config minus the fields that do not change what is
trained (seed, output paths, progress bars, device, evaluation batch size). A group's name is
the run label (``cuba-fra``, ``badnets-t0``, ...) plus every other field that differs between
the groups being compared (``tau=0.04``), so a table never silently merges two settings.

Numbers are read from each run's metrics.json (written by ``cuba train`` / ``cuba evaluate
--write``); the spread is the sample standard deviation over seeds (n - 1 in the denominator),
left empty for a single seed. Rates are in %, D_p in nats, PSNR in dB.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import RUN_ONLY_FIELDS, ConfigError, make_config
from .runs import read_json

# (metrics.json key, column title, scale): the columns plus stealth and time
COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("ca", "CA %", 100.0), ("asr", "ASR %", 100.0), ("asr_c", "ASR-C %", 100.0), ("ds", "DS %", 100.0),
    ("ds_min", "DS-min %", 100.0), ("d_p", "D_p", 1.0), ("psnr", "PSNR dB", 1.0), ("train_seconds", "train s", 1.0),
)
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

    def values(self, key: str) -> list[float]:
        out = []
        for r in self.runs:
            v = r.metrics.get(key)
            out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
        return out


def _is_run(p: Path) -> bool:
    return (p / "config.yaml").is_file() and (p / "metrics.json").is_file()


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
            raise FileNotFoundError(f"{p} holds no finished run (no config.yaml + metrics.json)")
        found.extend(inner)
    return list(dict.fromkeys(found))  # drop duplicates, keep order


def load_run(path: Path) -> Run:
    import yaml

    cfg = make_config(yaml.safe_load((path / "config.yaml").read_text()))
    # the resolved config: a field added after a run was made reads as its default, not as a difference
    return Run(path, cfg.to_dict(), read_json(path / "metrics.json"), cfg.label())


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


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
            extra = ", ".join(f"{k}={_fmt_value(run.config.get(k))}" for k in varying)
            groups[key] = Group(f"{run.label} ({extra})" if extra else run.label)
        groups[key].runs.append(run)
    return list(groups.values())


def summarize(group: Group, key: str, scale: float) -> tuple[float, float]:
    """(mean, sample std) of one metric over a group's runs, NaNs ignored; std NaN for one value."""
    vals = np.array([v * scale for v in group.values(key) if not math.isnan(v)])
    if len(vals) == 0:
        return math.nan, math.nan
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan


def _cell(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(groups: list[Group], by: str | None = None) -> list[dict[str, Any]]:
    """One dict per group: name, n, seeds, optional ``by`` value, and (mean, std) per column."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {"setting": g.name, "n": len(g.runs), "seeds": sorted(r.seed for r in g.runs)}
        if by is not None:
            row[by] = g.runs[0].config.get(by)
        for key, _, scale in COLUMNS:
            row[key] = summarize(g, key, scale)
            row[f"{key}_values"] = [v * scale for v in g.values(key)]  # per seed: plots show them all
        rows.append(row)
    if by is not None:
        rows.sort(key=lambda r: (r[by] is None, r[by] if isinstance(r[by], (int, float)) else str(r[by])))
    return rows


def to_markdown(rows: list[dict[str, Any]], by: str | None = None) -> str:
    head = ["setting", *([by] if by else []), "n", *(title for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], *([_fmt_value(r[by])] if by else []), str(r["n"])]
        cells += [_cell(*r[key], digits=0 if key == "train_seconds" else 2) for key, _, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]], by: str | None = None) -> str:
    """Machine-readable twin of the table: ``<key>_mean`` and ``<key>_std`` per metric, same units."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["setting", *([by] if by else []), "n", "seeds", *(f"{k}_{s}" for k, _, _ in COLUMNS for s in ("mean", "std"))])
    for r in rows:
        stats = [("" if math.isnan(x) else f"{x:.6g}") for k, _, _ in COLUMNS for x in r[k]]
        w.writerow([r["setting"], *([r[by]] if by else []), r["n"], " ".join(map(str, r["seeds"])), *stats])
    return buf.getvalue()


def compare(paths: list[str | Path], out: Path | None = None, name: str = "compare", by: str | None = None,
            source_class: int | None = None) -> tuple[str, list[Path]]:
    """Build the table for ``paths``; write NAME.md / NAME.csv (and figures) into ``out``; return (markdown, files)."""
    from .config import FIELDS

    if by is not None and by not in FIELDS:
        raise ConfigError(f"--by: unknown config field {by!r}")
    groups = group_runs([load_run(p) for p in find_runs(paths)])
    rows = table_rows(groups, by)
    md = to_markdown(rows, by)
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
    from .runs import load_predictions

    entries = []
    for g in groups:
        run = min(g.runs, key=lambda r: r.seed)
        if run.config.get("attack") == "none" or not (run.path / "predictions.npz").is_file():
            continue
        pred, targets = load_predictions(run.path)
        if pred.y_pred_backdoor is None or targets is None:
            continue
        if not 0 <= source < targets.shape[0]:
            raise ConfigError(f"--source-class: must lie in [0, {targets.shape[0]}), got {source}")
        full_range = make_config(run.config).full_range
        entries.append((f"{g.name} (seed {run.seed})", pred.y_true, pred.y_pred_backdoor, targets, full_range))
    if not entries:
        raise ConfigError("--source-class: none of the runs is an attack (no backdoor predictions)")
    return plot_source_class_comparison(entries, source, path)
