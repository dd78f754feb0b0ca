"""The paper's Table II from a grid's finished runs: ASR, DS, CA (mean ± std over seeds) per data
set, model and variant, the clean baseline's CA, and the paper's value with our difference.

Written as ``table2.md`` (read), ``table2.csv`` (compute) and ``table2.tex`` (paste into a paper).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..compare import Run, load_run
from ..runs import write_text
from .runner import trained

# METHOD.md §2 (the paper's Table II): (data set, label) -> (ASR, DS, CA); clean baselines separately
PAPER_TABLE2: dict[tuple[str, str], tuple[float, float, float]] = {
    ("mnist", "cuba-fra"): (99.99, 90.74, 99.45), ("mnist", "cuba-nra5"): (99.98, 91.59, 99.54),
    ("mnist", "cuba-nra2"): (99.96, 93.43, 99.53),
    ("gtsrb", "cuba-fra"): (99.94, 98.52, 98.36), ("gtsrb", "cuba-nra5"): (99.86, 98.97, 98.41),
    ("gtsrb", "cuba-nra2"): (99.89, 99.13, 98.43),
    ("cifar10", "cuba-fra"): (99.79, 92.70, 93.49), ("cifar10", "cuba-nra5"): (99.77, 95.81, 93.66),
    ("cifar10", "cuba-nra2"): (99.71, 98.39, 93.87),
    ("cifar100", "cuba-fra"): (98.84, 97.06, 74.60), ("cifar100", "cuba-nra5"): (98.71, 97.59, 74.67),
    ("cifar100", "cuba-nra2"): (97.68, 97.61, 74.64),
}
PAPER_CLEAN = {"mnist": 99.58, "gtsrb": 98.69, "cifar10": 93.91, "cifar100": 74.98}
# the model behind each of the paper's rows: another model's numbers are not set beside them
PAPER_MODELS = {"mnist": "simplecnn", "gtsrb": "preactresnet18", "cifar10": "resnet18", "cifar100": "resnet18"}


def finished_runs(out: Path) -> list[Run]:
    root = Path(out) / "runs"
    return [load_run(d) for d in sorted(root.iterdir()) if d.is_dir() and trained(d)] if root.is_dir() else []


def _stats(vals: list[float]) -> tuple[float, float, int]:
    v = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)


def _cell(m: float, s: float) -> str:
    return "–" if math.isnan(m) else (f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}")


def table2_rows(runs: list[Run]) -> list[dict]:
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(str(r.metrics.get("dataset") or r.config["dataset"]), r.config["model"], r.label)].append(r)
    rows = []
    for (ds, model, label), rs in sorted(groups.items()):
        if label == "clean":
            continue
        clean = groups.get((ds, model, "clean"), [])
        row = {"dataset": ds, "model": model, "setting": label, "n": len(rs)}
        for key in ("asr", "ds", "ca"):
            row[key] = _stats([100 * r.metrics[key] if r.metrics.get(key) is not None else None for r in rs])
        row["clean_ca"] = _stats([100 * r.metrics["ca"] for r in clean])
        same_setting = PAPER_MODELS.get(ds) == model
        row["paper"] = PAPER_TABLE2.get((ds, label)) if same_setting else None
        row["paper_clean"] = PAPER_CLEAN.get(ds) if same_setting else None
        rows.append(row)
    return rows


def table2_markdown(rows: list[dict]) -> str:
    lines = ["| data / model | setting | n | ASR | DS | CA | clean CA | paper ASR / DS / CA (clean) | Δ ASR / DS / CA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paper"]
        paper = f"{p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f} ({r['paper_clean']:.2f})" if p else "–"
        diff = " / ".join(f"{r[k][0] - p[i]:+.2f}" if not math.isnan(r[k][0]) else "–" for i, k in enumerate(("asr", "ds", "ca"))) if p else "–"
        lines.append(f"| {r['dataset']} / {r['model']} | {r['setting']} | {r['n']} | {_cell(*r['asr'][:2])} | {_cell(*r['ds'][:2])} | "
                     f"{_cell(*r['ca'][:2])} | {_cell(*r['clean_ca'][:2])} | {paper} | {diff} |")
    return "\n".join(lines)


def table2_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "model", "setting", "n", "asr_mean", "asr_std", "ds_mean", "ds_std", "ca_mean", "ca_std",
                "clean_ca_mean", "clean_ca_std", "paper_asr", "paper_ds", "paper_ca", "paper_clean_ca"])
    f = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"  # noqa: E731
    for r in rows:
        p = r["paper"] or (None, None, None)
        w.writerow([r["dataset"], r["model"], r["setting"], r["n"], *(f(v) for k in ("asr", "ds", "ca", "clean_ca") for v in r[k][:2]),
                    *(f(v) for v in p), f(r["paper_clean"])])
    return buf.getvalue()


def table2_latex(rows: list[dict]) -> str:
    body = [f"{r['dataset']} / {r['model']} & {r['setting']} & {_cell(*r['asr'][:2])} & {_cell(*r['ds'][:2])} & "
            f"{_cell(*r['ca'][:2])} & {_cell(*r['clean_ca'][:2])} \\\\".replace("±", "$\\pm$").replace("–", "--") for r in rows]
    return "\n".join(["\\begin{tabular}{llrrrr}", "\\toprule",
                      "Data / model & Setting & ASR (\\%) & DS (\\%) & CA (\\%) & Clean CA (\\%) \\\\", "\\midrule",
                      *body, "\\bottomrule", "\\end{tabular}"])


def write_table2(out: Path) -> list[Path]:
    rows = table2_rows(finished_runs(out))
    files = []
    for suffix, text in (("md", table2_markdown(rows)), ("csv", table2_csv(rows)), ("tex", table2_latex(rows))):
        write_text(Path(out) / f"table2.{suffix}", text if text.endswith("\n") else text + "\n")
        files.append(Path(out) / f"table2.{suffix}")
    return files
