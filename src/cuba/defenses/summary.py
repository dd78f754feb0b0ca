"""The detector matrix at a glance: one row per detector, one column per kind of model, the seeds
folded into each cell.

The per-run table of ``cuba defense-table`` has a column per model: 41 of them for the MNIST matrix
(issue 18), too wide to read a detector's record from. Here the runs are grouped by their name less
the seed suffix (``mnist-simplecnn-cuba-fra-s1`` -> ``cuba-fra``; the data set / model prefix all
runs share is dropped), and each cell says how the detector's **own rule**
(:func:`cuba.defenses.verdict.verdict`) judged the models of that group:

* ``caught — 3/3`` (or ``missed``, ``clear``, ``false alarm``) when every model got that verdict,
  ``mixed — caught 2/3`` otherwise, ``mixed — caught 1/3, no verdict 2`` when some models got none
  (a flag left undecided by censored budgets; never read as a win); report.html colours the first
  two by who won, mixed in amber;
* input-level detectors add the mean AUROC and the mean of their rule's number over the group
  (e.g. FAR at FRR 1% on clean validation inputs), so a near miss shows as one;
* ``n/a`` when the detector did not apply to any model of the group (an input-level detector on a
  clean model has no backdoor inputs to score; IBD-PSC on a model without BatchNorm); ``no verdict``
  when it ran but its rule could not decide (:data:`NO_VERDICT`), its numbers still shown.

Fine-pruning and NAD repair rather than detect: no rule, so no row (their curves are the removal
tables).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .base import not_applicable
from .verdict import AUDIT_VERDICTS, DEFENDER_WINS, VERDICT_SEP, verdict

MIXED = "mixed"
"""The word of a cell whose models got different verdicts (report.html: amber)."""
NO_VERDICT = "no verdict"
"""A cell the detector ran on without judging: a model-level flag with no reference models to decide
it, or an input-level rule finer than its calibration set (``unresolved_rules``)."""


def group_names(runs: list[Path]) -> list[str]:
    """Each run's group: its folder name less a trailing ``-s<seed>`` and less the prefix every run
    shares up to a dash (``mnist-simplecnn-``), kept whole when that would leave a name empty."""
    names = _seedless(runs)
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("-") + 1]
    if prefix and all(len(n) > len(prefix) for n in names):
        names = [n[len(prefix):] for n in names]
    return names


def _seedless(runs: list[Path]) -> list[str]:
    return [re.sub(r"-s\d+$", "", Path(r).name) for r in runs]


def rule_label(key: str) -> str:
    """"far_at_frr_1pct_two_sided" -> "FAR@FRR 1% two-sided": a rule's defense.json key as a reader says it."""
    m = re.fullmatch(r"(\w+?)_at_(\w+?)_(\d+)pct(_two_sided)?", key)
    if m is None:
        return key
    return f"{m[1].upper()}@{m[2].upper()} {m[3]}%" + (" two-sided" if m[4] else "")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summary_cell(defense: type | None, fields: list[dict[str, Any]]) -> str:
    """One cell: the verdicts of ``fields`` (one defense.json per model of a group) and their means."""
    if not fields:
        return "–"
    judged = [v for v in (verdict(defense, f) for f in fields) if v is not None]
    applicable = [f for f in fields if not not_applicable(f)]
    model_level = any(f.get("level") == "model" for f in applicable)
    if not applicable or (not judged and not model_level and all(f.get("setting") == "clean" for f in applicable)):
        return "n/a"  # an input-level detector on a clean model has nothing to catch
    counts = {v: judged.count(v) for v in dict.fromkeys(judged)}
    undecided = len(applicable) - len(judged)
    na = f", n/a {len(fields) - len(applicable)}" if len(applicable) < len(fields) else ""  # said, not hidden in k/n
    if not judged:  # a model-level flag with no reference to decide it, or a rule finer than its calibration
        head = NO_VERDICT
    elif len(counts) == 1 and not undecided:
        head = f"{judged[0]}{VERDICT_SEP}{len(judged)}/{len(fields)}{na}"
    else:  # verdicts disagree, or some models got none: not a win for either side
        best = next((v for v in counts if v in DEFENDER_WINS), judged[0])  # the defender's count first
        head = (f"{MIXED}{VERDICT_SEP}{best} {counts[best]}/{len(fields)}"
                + (f", {NO_VERDICT} {undecided}" if undecided else "") + na)
    auroc, value = group_means(defense, applicable)
    parts = [head]
    if auroc is not None:
        parts.append(f"AUROC {auroc:.3f}")
    if value is not None:
        parts.append(f"{rule_label(defense.rule[0])} {value:.3f}")
    return "; ".join(parts)


def group_means(defense: type | None, fields: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(mean AUROC, mean of the rule's number) over the applicable ``fields`` of a group; None where no
    model has it. Only a detector with a rule reports an AUROC here: Fine-pruning and NAD have neither."""
    rule = getattr(defense, "rule", None)
    if rule is None:
        return None, None
    applicable = [f for f in fields if not not_applicable(f)]
    aurocs = [float(f["auroc"]) for f in applicable if f.get("auroc") is not None]
    values = [float(f[rule[0]]) for f in applicable if f.get(rule[0]) is not None]
    return (_mean(aurocs) if aurocs else None), (_mean(values) if values else None)


def summary_table(res: list[tuple[Path, dict[str, dict[str, Any]]]], order: list[str],
                  defenses: dict[str, type]) -> list[str]:
    """Markdown lines of the folded matrix (detectors with a rule as rows, groups of runs as
    columns: clean first, then in the order the runs come); [] when no detector judged any run."""
    groups = group_names([r for r, _ in res])
    cols = sorted(dict.fromkeys(groups), key=lambda c: c != "clean")  # the clean reference point first
    rows = []
    for name in _judging(res, order, defenses):
        cells = [summary_cell(defenses.get(name), [d[name] for (_, d), g in zip(res, groups) if g == col and name in d])
                 for col in cols]
        # a detector that ran stays, undecided or n/a on every group (a reader must see that it ran
        # and why it says nothing: IBD-PSC on a model without BatchNorm)
        if any(c != "–" for c in cells):
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    counts = [groups.count(c) for c in cols]
    head = [f"{c} ({n})" for c, n in zip(cols, counts)]
    return ["", "Across seeds: each detector's own rule on every group of models (models in the group in brackets); "
            "input-level cells add the group's mean AUROC and the mean of the rule's number", "",
            "| detector | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols), *rows]


def win_shares(res: list[tuple[Path, dict[str, dict[str, Any]]]], order: list[str],
               defenses: dict[str, type]) -> tuple[list[str], list[str], list[list[float | None]], list[list[str]]]:
    """The folded matrix as numbers for a heatmap: (detectors, groups, share, text), rows and columns
    as in :func:`summary_table`; each cell from :func:`heat_cell`."""
    groups = group_names([r for r, _ in res])
    cols = sorted(dict.fromkeys(groups), key=lambda c: c != "clean")
    rows, shares, texts = [], [], []
    for name in _judging(res, order, defenses):
        cells = [heat_cell(defenses.get(name), [d[name] for (_, d), g in zip(res, groups) if g == col and name in d])
                 for col in cols]
        if any(t != "–" for _, t in cells):  # as in summary_table: an undecided or n/a detector stays
            rows.append(name)
            shares.append([c[0] for c in cells])
            texts.append([c[1] for c in cells])
    return rows, cols, shares, texts


def heat_cell(defense: type | None, fields: list[dict[str, Any]]) -> tuple[float | None, str]:
    """(share, text) of one heatmap cell. ``share``: of the group's models the rule decided, the
    fraction on which it won for the defender (caught a backdoor, cleared a clean model); None -- grey
    -- when it decided none, or on imported models, where nobody knows which verdict is a win.
    ``text``: "won k/n" over the group's n models, "no verdict u" when u were left undecided (the
    table's "mixed"), "n/a m" when the detector did not apply to m of them, and the mean AUROC for an input-level detector; "–", "n/a" or "no verdict" as
    the table's cell when there is nothing to count."""
    verdicts = [verdict(defense, f) for f in fields]
    decided = [v for v in verdicts if v is not None]
    if not decided:
        cell = summary_cell(defense, fields)
        return None, cell if cell in ("–", "n/a") else NO_VERDICT
    undecided = sum(not not_applicable(f) for f in fields) - len(decided)
    auroc, _ = group_means(defense, fields)
    audit = [v for v in decided if v in AUDIT_VERDICTS]
    lines = ([f"{AUDIT_VERDICTS[0]} {audit.count(AUDIT_VERDICTS[0])}/{len(fields)}"] if audit
             else [f"won {sum(v in DEFENDER_WINS for v in decided)}/{len(fields)}"])
    n_na = sum(bool(not_applicable(f)) for f in fields)
    lines += [f"{NO_VERDICT} {undecided}"] * bool(undecided) + [f"n/a {n_na}"] * bool(n_na)
    lines += [] if auroc is None else [f"AUROC {auroc:.2f}"]
    share = None if audit else sum(v in DEFENDER_WINS for v in decided) / len(decided)
    return share, "\n".join(lines)


def _caught(defense: type | None, fields: list[dict[str, Any]]) -> str:
    """"k/n": caught k of the group's n models, with how many got no verdict; "n/a" when the detector
    applied to none of them, "no verdict" when it decided none."""
    judged = [v for v in (verdict(defense, f) for f in fields) if v is not None]
    if not judged:
        return "n/a" if all(not_applicable(f) for f in fields) else NO_VERDICT
    undecided = sum(not not_applicable(f) for f in fields) - len(judged)
    return f"{judged.count('caught')}/{len(fields)}" + (f" ({undecided} {NO_VERDICT})" if undecided else "")


def change_cell(defense: type | None, base: list[dict[str, Any]], other: list[dict[str, Any]]) -> str:
    """How a detector fares on ``other`` against ``base`` (two groups of defense.json): caught counts,
    mean AUROC and mean rule number, each as "base → other", the AUROC with its change."""
    if not base or not other:
        return "–"
    before, after = _caught(defense, base), _caught(defense, other)
    if before == after == "n/a":
        return "n/a"
    words = ("n/a", NO_VERDICT)  # "caught" is said once, before the first count
    parts = [f"caught {before} → {after}" if before not in words
             else f"{before} → {after if after in words else f'caught {after}'}"]
    (a0, v0), (a1, v1) = group_means(defense, base), group_means(defense, other)
    if a0 is not None and a1 is not None:
        parts.append(f"AUROC {a0:.3f} → {a1:.3f} ({a1 - a0:+.3f})")
    if v0 is not None and v1 is not None:
        parts.append(f"{rule_label(defense.rule[0])} {v0:.3f} → {v1:.3f}")
    return "; ".join(parts)


def change_table(res: list[tuple[Path, dict[str, dict[str, Any]]]], order: list[str], defenses: dict[str, type],
                 baseline: str, against: str = "", strict: bool = True) -> list[str]:
    """Markdown lines: every detector with a rule, on each group whose run names hold ``against`` from a
    dash on (every backdoored group by default), set against the ``baseline`` group (the runs whose
    names, less the seed, end in it) -- e.g. what each detector loses when CUBA FRA turns adaptive
    (issue 18, point 4). When ``baseline`` or ``against`` matches no group: a ConfigError naming the
    groups (a typo), or with ``strict=False`` (a grid still running) a line saying so."""
    runs = [r for r, _ in res]
    # matched on the whole name less the seed, at a dash: the shown groups lose whatever prefix all runs
    # share, which is "cuba-" itself when every run is a CUBA model
    full, shown = _seedless(runs), group_names(runs)
    known = list(dict.fromkeys(shown))
    hits = list(dict.fromkeys(f for f in full if f"-{f}".endswith(f"-{baseline}")))
    if len(hits) > 1 and not strict:  # a grid's report: a line, not a failure after every cell trained
        return ["", f"Against {baseline}: ambiguous, it ends {len(hits)} groups' names ({', '.join(hits)})"]
    if len(hits) > 1:  # e.g. "fra" (cuba-fra, push-away-fra, ...) or cuba-fra of two models: never merged
        raise ConfigError(f"defense-table: --baseline {baseline!r} matches {len(hits)} groups ({', '.join(hits)}); "
                          "name one of them whole")
    groups = [baseline if f in hits else g for f, g in zip(full, shown)]
    cols = list(dict.fromkeys(g for f, g in zip(full, groups)
                              if g != baseline and not f"-{f}".endswith("-clean") and f"-{against}" in f"-{f}"))
    if baseline not in groups or not cols:
        missing = f"no group {baseline!r}" if baseline not in groups else f"no group matches {against!r}"
        if strict:
            raise ConfigError(f"defense-table: {missing}; the groups are {', '.join(known)}")
        return ["", f"Against {baseline}: not yet ({missing} among the finished runs)"]
    of = lambda name, g: [d[name] for (_, d), gg in zip(res, groups) if gg == g and name in d]  # noqa: E731
    rows = [f"| {name} | " + " | ".join(change_cell(defenses[name], of(name, baseline), of(name, c)) for c in cols) + " |"
            for name in _judging(res, order, defenses)]
    runs_of = lambda g: [r for r, gg in zip(runs, groups) if gg == g]  # noqa: E731
    cost = "| the attack itself: CA / ASR / DS %, effective classes | " + " | ".join(
        f"{attack_numbers(runs_of(baseline))} → {attack_numbers(runs_of(c))}" for c in cols) + " |"
    return ["", f"Against {baseline}: each detector's own rule (models caught), mean AUROC and mean rule number, "
            f"{baseline} → the group; first, what the group costs the attack (means over its models' metrics.json)", "",
            "| detector | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols), cost, *rows]


def attack_numbers(runs: list[Path]) -> str:
    """"CA / ASR / DS, effective classes" (means over ``runs``' metrics.json, test split; % but the
    last) -- the attacker's side of an adaptive trade: a counter-term that evades a detector may cost
    the attack its dispersion (DS down to its floor, one effective class); "–" where none has them."""
    from ..runs import read_json  # a broken file raises an error that names it

    ms = [read_json(r / "metrics.json") for r in runs if (r / "metrics.json").is_file()]
    mean = lambda k: (sum(float(m[k]) for m in ms if m.get(k) is not None) / n  # noqa: E731
                      if (n := sum(m.get(k) is not None for m in ms)) else None)
    vals = [mean(k) for k in ("ca", "asr", "ds", "effective_classes")]
    if all(v is None for v in vals):
        return "–"
    fmt = lambda v, scale: "–" if v is None else f"{v * scale:.{1 if scale == 100 else 2}f}"  # noqa: E731
    return " / ".join(fmt(v, 100) for v in vals[:3]) + f", {fmt(vals[3], 1)}"


def _judging(res: list[tuple[Path, dict[str, dict[str, Any]]]], order: list[str], defenses: dict[str, type]) -> list[str]:
    """The detectors of ``order`` with a yes/no rule: an input-level ``rule``, or a model-level flag in
    any run. Fine-pruning and NAD repair rather than detect: not among them."""
    return [n for n in order if getattr(defenses.get(n), "rule", None) is not None
            or any(d[n].get("level") == "model" for _, d in res if n in d)]
