"""``cuba defense-table``: the defenses' verdicts on several runs, read back from their defense.json.

Two Markdown tables: (1) defenses as rows, runs as columns, each cell the detector's verdict by its
own rule (caught / missed / false alarm / clear, :mod:`cuba.defenses.verdict`), the headline
numbers (or "n/a (reason)" for a defense.json that says ``"applicable": false``) and the wall time;
(2) the removal curves of Fine-pruning and NAD (paper Table III), one row per prune ratio /
epoch, CA and the *headline* ASR per run: ASR-C for untargeted attacks (a repaired model's clean
mistakes count as successes there, so plain ASR >= 1 - CA says nothing about the backdoor), plain
ASR for the targeted controls. Each run's column title says which it shows; a defense.json
written before ASR-C was recorded shows plain ASR, marked † and explained under the table.
(3) The same verdicts folded over seeds, a column per kind of model (:mod:`cuba.defenses.summary`).
(4) For the model-level detectors: their AUROC over the runs given and how many models each one's
rule flagged, with clean reference models deciding the inversion detectors' flag
(:mod:`cuba.defenses.model_level`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..runs import read_json
from .base import ASR_NAMES, IMPORTED, headline_asr_key_of, headline_value, not_applicable, pct
from .model_level import Results, apply_references, model_level_table
from .summary import NO_VERDICT, change_table, summary_table, win_shares
from .verdict import VERDICT_SEP, verdict

FALLBACK_NOTE = ("† ASR-C not recorded (defense.json written before it): plain ASR shown, which for an "
                 "untargeted attack also counts the repaired model's clean mistakes as successes.")


def load_results(run_dirs: list[Path], root: str = "defenses") -> list[tuple[Path, dict[str, dict[str, Any]]]]:
    """[(run, {defense: defense.json})] for every defense.json found under RUN/defenses/*/, in order."""
    out: list[tuple[Path, dict[str, dict[str, Any]]]] = []
    for r in run_dirs:
        found = {p.parent.name: read_json(p) for p in sorted((Path(r) / root).glob("*/defense.json"))}
        if not found:
            raise FileNotFoundError(f"{r} has no {root}/<defense>/defense.json (run `cuba defend all {r}` first)")
        out.append((Path(r), found))
    return out


def removal_table(name: str, key: str, cols: list[str], per_run: list[dict[str, Any] | None]) -> list[str]:
    """Markdown lines of one removal curve (Fine-pruning or NAD): a row per step, "CA / headline ASR"
    per run, the column title naming the headline ASR of that run; [] when no run has rows."""
    rows_of = [(f or {}).get("rows", []) for f in per_run]
    steps = sorted({r[key] for rows in rows_of for r in rows})
    if not steps:
        return []
    heads, fallback = [], False
    for col, f, rows in zip(cols, per_run, rows_of):
        akey = headline_asr_key_of(f) if f else "asr"
        missing = bool(rows) and akey == "asr_c" and any("asr_c" not in r for r in rows)
        fallback |= missing
        heads.append(f"{col} (CA / {'ASR†' if missing else ASR_NAMES[akey]})")
    lines = ["", f"{name}: CA / headline ASR (%) per run -- ASR-C (over test images the repaired model classifies "
             "correctly when clean) for untargeted attacks, ASR for the targeted controls", "",
             f"| {key} | " + " | ".join(heads) + " |", "|---|" + "---|" * len(cols)]
    for s in steps:
        cells = []
        for f, rows in zip(per_run, rows_of):
            row = next((r for r in rows if r[key] == s), None)
            if row is None:
                cells.append("–")
                continue
            value, _ = headline_value(row, headline_asr_key_of(f) if f else "asr")
            cells.append(f"{pct(row['ca'])} / {pct(value)}")
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return lines + (["", FALLBACK_NOTE] if fallback else [])


def _column(run: Path, found: dict[str, dict[str, Any]]) -> str:
    """A run's column title: its setting, or "<folder> (imported)" for a model under audit."""
    setting = str(next(iter(found.values())).get("setting", run.name))
    return f"{run.name} (imported)" if setting == IMPORTED else setting


def cost_table(res: list[tuple[Path, dict[str, dict[str, Any]]]], order: list[str]) -> list[str]:
    """Markdown lines: each defense's wall seconds over the runs it ran on (median, max, total), so a
    reader can plan a matrix before running it; [] when no defense.json records its seconds."""
    import statistics

    rows = []
    for name in order:
        secs = [float(d[name]["seconds"]) for _, d in res if name in d and d[name].get("seconds") is not None]
        if secs:
            rows.append(f"| {name} | {len(secs)} | {statistics.median(secs):.0f} | {max(secs):.0f} | {sum(secs):.0f} |")
    if not rows:
        return []
    return ["", "Wall seconds per defense over these runs (as recorded in defense.json; on a shared machine an upper "
            "bound)", "", "| defense | runs | median s | max s | total s |", "|---|---|---|---|---|", *rows]


def _scored(run_dirs: list[Path], references: list[Path] | None,
            names: list[str] | None = None) -> tuple[Results, list[str], list[str] | None]:
    """(results of the runs less the references and the models whose backdoor did not take
    (:func:`cuba.run_groups.untaken_backdoor`), the notes that say so, their names): the references
    decide the inversion detectors' flags in place (:func:`cuba.defenses.model_level.apply_references`)."""
    from . import DEFENSES

    from ..run_groups import untaken_backdoor

    ref_set = {Path(p).resolve() for p in references or []}
    kept = [(i, r) for i, r in enumerate(run_dirs) if Path(r).resolve() not in ref_set]
    loaded = load_results([r for _, r in kept])
    # a backdoored model whose attack did not take has nothing to catch: set aside, and said so
    why = [untaken_backdoor(r, str(next(iter(d.values())).get("setting", "?"))) for r, d in loaded]
    aside = [f"left out: {r.name}, {w}; no detector is judged on it." for (r, _), w in zip(loaded, why) if w]
    res = [x for x, w in zip(loaded, why) if not w]
    if loaded and not res:
        raise ConfigError(f"defense-table: every run given is left out ({'; '.join(a[len('left out: '):] for a in aside)}); "
                          "its defense.json files are under RUN/defenses/")
    if names:
        names = [names[i] for (i, _), w in zip(kept, why) if not w]
    notes = apply_references(res, load_results(list(references or [])), DEFENSES)
    return res, (notes or [""]) + aside if aside else notes, names


def _found(res: Results) -> list[str]:
    """The defenses that ran on at least one of the runs (a row of dashes says nothing): registered
    ones in registration order, then any other defense.json found (e.g. a removed defense)."""
    from . import DEFENSES

    ran = {n for _, d in res for n in d}
    return [n for n in DEFENSES if n in ran] + sorted(ran - set(DEFENSES))


def matrix_figure(run_dirs: list[Path], path: Path, references: list[Path] | None = None) -> Path | None:
    """The folded matrix as a heatmap (:func:`cuba.defenses.plots.plot_detector_matrix`) at ``path``;
    None when no detector's rule judged any of the runs."""
    from . import DEFENSES
    from .plots import plot_detector_matrix

    res, _, _ = _scored(run_dirs, references)
    rows, cols, share, text = win_shares(res, _found(res), DEFENSES)
    return plot_detector_matrix(rows, cols, share, text, Path(path)) if rows else None


def defense_tables(run_dirs: list[Path], names: list[str] | None = None,
                   references: list[Path] | None = None, compare: dict[str, str] | None = None,
                   strict: bool = True) -> str:
    """Every table above as one Markdown text; ``compare`` ({baseline: group, against: name prefix})
    adds :func:`cuba.defenses.summary.change_table`, ``strict`` as there."""
    from . import DEFENSES  # here: the package imports this module's siblings

    res, notes, names = _scored(run_dirs, references, names)
    cols = names or [_column(r, d) for r, d in res]
    lines = ["| defense | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    found = _found(res)
    for name in found:
        cells = []
        for _, d in res:
            f = d.get(name)
            if f is None:
                cells.append("–")
                continue
            line = not_applicable(f) or (DEFENSES[name].headline(f) if name in DEFENSES else "see defense.json")
            v = verdict(DEFENSES.get(name), f)
            if v is None and not not_applicable(f) and (f.get("level") == "model" or (
                    getattr(DEFENSES.get(name), "rule", None) and f.get("setting") not in ("clean", IMPORTED, None))):
                # a rule that ran on a model with something to judge and could not decide (a flag without
                # references, censored budgets, a rule finer than its calibration set); an input-level
                # rule on a clean model scores a probe patch and has nothing to catch: no word
                v = NO_VERDICT
            cells.append(f"{'' if v is None else v + VERDICT_SEP}{line} ({f['seconds']:.0f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, key in (("fine-pruning", "prune_ratio"), ("nad", "epoch")):
        lines += removal_table(name, key, cols, [d.get(name) for _, d in res])
    lines += summary_table(res, found, DEFENSES)
    if compare:
        lines += change_table(res, found, DEFENSES, compare["baseline"], compare.get("against", ""), strict)
    return "\n".join(lines + model_level_table(res) + notes + cost_table(res, found))
