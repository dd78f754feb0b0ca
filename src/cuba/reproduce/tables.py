"""The paper's Table II from a grid's finished runs: ASR, DS, CA (mean ± std over seeds) per data
set, model and variant, the clean baseline's CA, and the paper's value with our difference.

Each row also says its *protocol*: whether it ran with the paper's model and schedule, a reduced
schedule, a stand-in model, or a stand-in copy of the data -- so a SimpleCNN row on 6 epochs is
never read as the paper's ResNet18 at 100 -- and a grid's cells that could not run here (no local
copy of their data set) appear as rows marked "blocked (no local data)", with the reason below
the table, instead of being silently absent.

Written as ``table2.md`` (read), ``table2.csv`` (compute) and ``table2.tex`` (paste into a paper).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path


from ..compare import Run, load_run
from ..runs import write_text
from ..runs import is_finished
from ..formatting import mean_pm_std, mean_std

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
# the paper's training epochs (METHOD.md §3: 100 CIFAR-10, 50 GTSRB, about 10 for MNIST); the paper
# states none for CIFAR-100, which is read as CIFAR-10's (same model, same image size)
PAPER_EPOCHS = {"mnist": 10, "gtsrb": 50, "cifar10": 100, "cifar100": 100}
# copies of a paper data set that are not the data set itself: (the paper's row, what to call the copy)
DATA_COPIES = {"cifar10-jpeg": ("cifar10", "cifar10-jpeg, a lossy JPEG copy, not CIFAR-10")}
BLOCKED = "blocked (no local data)"


def paper_dataset(dataset: str) -> str | None:
    """The paper's data set a run's data stands for (itself, or the original of a known copy), or None."""
    return dataset if dataset in PAPER_MODELS else DATA_COPIES.get(dataset, (None,))[0]


def protocol(dataset: str, model: str, config: dict) -> str:
    """How one run relates to the paper's row of its data set, e.g. "paper model, paper schedule",
    "paper model, reduced schedule (6 of 50 epochs)", "stand-in model (simplecnn for resnet18),
    ...", with the data copy named when it is not the paper's data. Why: a reduced-budget or
    stand-in row sits in the same table as the paper's numbers and must not pass for them."""
    paper = paper_dataset(dataset)
    if paper is None:
        return "not a paper data set"
    want = PAPER_MODELS[paper]
    parts = ["paper model" if model == want else f"stand-in model ({model} for {want})"]
    epochs, full = config.get("epochs"), PAPER_EPOCHS[paper]
    if epochs is None:
        parts.append("schedule not recorded")
    else:
        parts.append("paper schedule" if epochs >= full else f"reduced schedule ({epochs:g} of {full} epochs)")
    if config.get("n_train"):
        parts[-1] += f" on {config['n_train']} training images"
    if dataset in DATA_COPIES:
        parts.append(f"data: {DATA_COPIES[dataset][1]}")
    return ", ".join(parts)


def blocked_settings(cells: list) -> list[dict]:
    """One entry per (data set, model, attacked setting) of a grid's blocked cells (seeds folded):
    what Table II shows in place of the rows that could not run, and why."""
    from ..config import make_config

    seen: dict[tuple[str, str, str], dict] = {}
    for c in cells:
        if not c.blocked:
            continue
        cfg = make_config(c.values)
        if cfg.is_attack:
            key = (Path(str(cfg.dataset)).stem, cfg.model, cfg.label())
            seen.setdefault(key, {"dataset": key[0], "model": key[1], "setting": key[2], "epochs": cfg.epochs,
                                  "reason": c.blocked})
    return list(seen.values())


def finished_runs(out: Path) -> list[Run]:
    root = Path(out) / "runs"
    return [load_run(d) for d in sorted(root.iterdir()) if d.is_dir() and is_finished(d)] if root.is_dir() else []


# (metrics.json key, scale) of every Table II number: the paper's three, then DS on its own scale
# (METHOD.md §2): the DS of a collapse, of a uniform attacker with the run's success counts, and
# the effective number of classes -- so DS reads the same on MNIST (K = 10) and CIFAR-100
TABLE2_KEYS = (("asr", 100.0), ("ds", 100.0), ("ca", 100.0), ("ds_floor", 100.0), ("ds_uniform", 100.0),
               ("effective_classes", 1.0))
TABLE2_NA = {"asr", "ds", "ds_floor", "ds_uniform", "effective_classes"}  # n/a on a degenerate model


def split_settings(groups: dict[tuple[str, str, str], list[Run]]) -> dict[tuple[str, str, str], list[Run]]:
    """Runs that share a label but not a setting (a grid's ``per_attack`` settings, e.g. the adaptive
    attacker at two weights) become separate rows, the label extended by the fields that tell them
    apart, e.g. ``cuba-adaptive-fra (adaptive_weight=1)``: folding them would average two attacks as
    if they were seeds of one. Clean runs are split the same way (``clean (epochs=1)``), and each
    attacked row takes the nearest as its reference (:func:`_nearest_clean`)."""
    from ..run_groups import setting_key, varying_fields
    from ..formatting import fmt_value

    out: dict[tuple[str, str, str], list[Run]] = {}
    for (ds, model, label), rs in groups.items():
        # only fields every run records: a run folder from before a field existed is not another setting
        shared = set.intersection(*(set(r.config) for r in rs))
        keys = [setting_key(r.config, shared) for r in rs]
        if len(set(keys)) == 1:
            out[(ds, model, label)] = rs
            continue
        varying = varying_fields(keys)
        for r in rs:
            extra = ", ".join(f"{k}={fmt_value(r.config.get(k))}" for k in varying)
            out.setdefault((ds, model, f"{label} ({extra})"), []).append(r)
    return out


def table2_rows(runs: list[Run], blocked: list[dict] = ()) -> list[dict]:
    """One row per (data set, model, attacked setting): mean ± std over seeds, and its protocol
    (:func:`protocol`; the distinct ones joined by "; " if the seeds differ). ``blocked``
    (:func:`blocked_settings`) adds a row per setting that could not run and has no run, its
    numbers empty, its protocol :data:`BLOCKED` and ``blocked`` the reason.

    A degenerate group (:func:`cuba.compare.group_degeneracy`: every seed at chance, or a mean CA
    more than 10 points under the clean CA of the same data set and model) gets ``degenerate`` set
    and NaN backdoor numbers; degenerate seeds of a healthy group are left out of its backdoor
    numbers (``n_degenerate`` counts them) while CA keeps every seed.
    """
    from ..compare import group_degeneracy, mean_ca, metric_value

    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(str(r.metrics.get("dataset") or r.config["dataset"]), r.config["model"], r.label)].append(r)
    groups = split_settings(groups)
    rows = []
    for (ds, model, label), rs in sorted(groups.items()):
        if _is_clean(label):
            continue
        clean = _nearest_clean(groups, ds, model, rs[0].config)
        deg = group_degeneracy(rs, mean_ca(clean))
        row = {"dataset": ds, "model": model, "setting": label, "n": len(rs), "degenerate": deg.reason,
               "n_degenerate": len(deg.dropped),
               "degenerate_reasons": list(dict.fromkeys(why for _, why in deg.dropped))}
        for key, scale in TABLE2_KEYS:
            if key in TABLE2_NA and deg.reason is not None:
                row[key] = (math.nan, math.nan, 0)
                continue
            use = deg.kept if key in TABLE2_NA else rs
            row[key] = mean_std([scale * v for v in (metric_value(r.metrics, key) for r in use)])
        row["clean_ca"] = mean_std([100 * metric_value(r.metrics, "ca") for r in clean])
        _paper_columns(row)
        row["protocol"] = "; ".join(dict.fromkeys(protocol(ds, model, r.config) for r in rs))
        row["epochs"] = "; ".join(dict.fromkeys(_epochs(r.config.get("epochs")) for r in rs))
        rows.append(row)
    for b in blocked:
        if (b["dataset"], b["model"], b["setting"]) in groups:
            continue  # trained elsewhere and copied in: the runs speak for themselves
        row = {"dataset": b["dataset"], "model": b["model"], "setting": b["setting"], "n": 0, "degenerate": None,
               "n_degenerate": 0, "degenerate_reasons": [], **{k: (math.nan, math.nan, 0) for k, _ in TABLE2_KEYS},
               "clean_ca": (math.nan, math.nan, 0), "protocol": BLOCKED, "blocked": b["reason"],
               "epochs": _epochs(b.get("epochs"))}
        rows.append(_paper_columns(row))
    return rows


def _is_clean(label: str) -> bool:
    """"clean", or "clean (epochs=1)" when clean runs of one data set and model differ in a setting."""
    return label.split(" (")[0] == "clean"


def _nearest_clean(groups: dict[tuple[str, str, str], list[Run]], ds: str, model: str, config: dict) -> list[Run]:
    """The clean runs an attacked setting is held against: of the clean groups on its data set and
    model, the one whose config differs from ``config`` in the fewest settings (as ``cuba compare``
    chooses), so clean runs of another schedule are not folded into its reference; [] when none."""
    from ..run_groups import setting_distance

    cleans = [rs for (d, m, label), rs in groups.items() if d == ds and m == model and _is_clean(label)]
    return min(cleans, key=lambda rs: setting_distance(rs[0].config, config)) if cleans else []


def _epochs(e: float | None) -> str:
    return "" if e is None else f"{e:g}"


def _paper_columns(row: dict) -> dict:
    """The paper's values beside a row, only when it used the paper's model on (a copy of) the
    paper's data set; the protocol column says which copy and schedule."""
    paper = paper_dataset(row["dataset"])
    same_setting = paper is not None and PAPER_MODELS[paper] == row["model"]
    row["paper"] = PAPER_TABLE2.get((paper, row["setting"])) if same_setting else None
    row["paper_clean"] = PAPER_CLEAN.get(paper) if same_setting else None
    row["paper_epochs"] = PAPER_EPOCHS.get(paper) if paper else None
    return row


def blocked_notes(rows: list[dict]) -> list[str]:
    """One line per reason a row is blocked (say, "blocked: no local copy of cifar100 (...)")."""
    return [f"blocked: {why}" for why in dict.fromkeys(r["blocked"] for r in rows if r.get("blocked"))]


# read beside Table II: what the protocol column says
PROTOCOL_NOTE = ("protocol: whether a row ran with the paper's model and schedule (METHOD.md §3: 50 epochs GTSRB, "
                 "100 CIFAR-10, about 10 MNIST; 100 taken for CIFAR-100) or a reduced schedule, a stand-in model "
                 "or a stand-in copy of the data; the paper's values are set beside a row only when it used the "
                 "paper's model. " + BLOCKED + ": the grid's cell could not run on this machine (reason below).")


def _t2_name(r: dict) -> str:
    from ..compare import flagged, short_reason

    if r.get("degenerate"):
        return flagged(r["setting"], r["degenerate"])
    if r.get("n_degenerate"):
        why = "; ".join(dict.fromkeys(short_reason(w) for w in r.get("degenerate_reasons", [])))
        return f"{r['setting']} ({r['n_degenerate']}/{r['n']} seeds degenerate: {why}; left out of ASR/DS)"
    return r["setting"]


def _t2_cell(r: dict, key: str, digits: int = 2) -> str:
    from ..compare import NA

    if key in TABLE2_NA and r.get("degenerate"):
        return NA
    m, s = r[key][:2]
    return mean_pm_std(m, s, digits)


def table2_markdown(rows: list[dict]) -> str:
    """The paper's columns, then DS floor / DS uniform (the DS of a collapse and of a uniform
    attacker, read against DS) and the effective number of classes."""
    lines = ["| data / model | setting | protocol | n | ASR | DS | CA | clean CA | DS floor | DS uniform | eff. classes "
             "| paper ASR / DS / CA (clean) | Δ ASR / DS / CA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paper"]
        paper = f"{p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f} ({r['paper_clean']:.2f})" if p else "–"
        diff = " / ".join(
            "n/a" if k in TABLE2_NA and r.get("degenerate") else (f"{r[k][0] - p[i]:+.2f}" if not math.isnan(r[k][0]) else "–")
            for i, k in enumerate(("asr", "ds", "ca"))) if p else "–"
        lines.append(f"| {r['dataset']} / {r['model']} | {_t2_name(r)} | {r.get('protocol', '–')} | {r['n']} | {_t2_cell(r, 'asr')} | {_t2_cell(r, 'ds')} | "
                     f"{_t2_cell(r, 'ca')} | {mean_pm_std(*r['clean_ca'][:2])} | {_t2_cell(r, 'ds_floor')} | {_t2_cell(r, 'ds_uniform')} | "
                     f"{_t2_cell(r, 'effective_classes')} | {paper} | {diff} |")
    return "\n".join(lines)


def table2_csv(rows: list[dict]) -> str:
    """Every number of the Markdown table; a degenerate group's backdoor cells are empty and its
    ``degenerate`` column says why (empty for a healthy group). Old runs lacking the newer keys
    leave those cells empty too."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "model", "setting", "n", "degenerate", "n_degenerate", "asr_mean", "asr_std", "ds_mean", "ds_std",
                "ca_mean", "ca_std", "clean_ca_mean", "clean_ca_std", "ds_floor_mean", "ds_floor_std", "ds_uniform_mean",
                "ds_uniform_std", "effective_classes_mean", "effective_classes_std",
                "paper_asr", "paper_ds", "paper_ca", "paper_clean_ca", "protocol", "epochs", "paper_epochs", "blocked"])
    f = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"  # noqa: E731
    for r in rows:
        p = r["paper"] or (None, None, None)
        keys = ("asr", "ds", "ca", "clean_ca", "ds_floor", "ds_uniform", "effective_classes")
        w.writerow([r["dataset"], r["model"], r["setting"], r["n"], r.get("degenerate") or "", r.get("n_degenerate", 0),
                    *(f(v) for k in keys for v in r[k][:2]), *(f(v) for v in p), f(r["paper_clean"]),
                    r.get("protocol", ""), r.get("epochs", ""), r.get("paper_epochs") or "", r.get("blocked") or ""])
    return buf.getvalue()


def table2_latex(rows: list[dict]) -> str:
    body = []
    for r in rows:
        cells = [f"{r['dataset']} / {r['model']}", _t2_name(r), r.get("protocol", "–"),
                 *(_t2_cell(r, k) for k in ("asr", "ds", "ca")), mean_pm_std(*r["clean_ca"][:2]),
                 *(_t2_cell(r, k) for k in ("ds_floor", "ds_uniform", "effective_classes"))]
        body.append((" & ".join(cells) + " \\\\").replace("±", "$\\pm$").replace("–", "--").replace("%", "\\%").replace("_", "\\_"))
    return "\n".join(["\\begin{tabular}{lllrrrrrrr}", "\\toprule",
                      "Data / model & Setting & Protocol & ASR (\\%) & DS (\\%) & CA (\\%) & Clean CA (\\%) & DS floor (\\%) "
                      "& DS uniform (\\%) & Eff.\\ classes \\\\", "\\midrule",
                      *body, "\\bottomrule", "\\end{tabular}"])


def write_table2(out: Path, blocked: list[dict] = ()) -> list[Path]:
    """table2.{md,csv,tex} of the finished runs under ``out``, plus the ``blocked`` settings
    (:func:`blocked_settings`); the Markdown ends with the protocol note and why rows are blocked."""
    rows = table2_rows(finished_runs(out), blocked)
    md = "\n\n".join([table2_markdown(rows), PROTOCOL_NOTE, *blocked_notes(rows)])
    files = []
    for suffix, text in (("md", md), ("csv", table2_csv(rows)), ("tex", table2_latex(rows))):
        write_text(Path(out) / f"table2.{suffix}", text if text.endswith("\n") else text + "\n")
        files.append(Path(out) / f"table2.{suffix}")
    return files
