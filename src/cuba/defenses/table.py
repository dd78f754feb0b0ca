"""``cuba defense-table``: the defenses' verdicts on several runs, read back from their defense.json.

Two Markdown tables: (1) defenses as rows, runs as columns, each cell the detector's verdict by its
own rule (caught / missed / false alarm / clear, :mod:`cuba.defenses.verdict`), the headline
numbers (or "n/a (reason)" for a defense.json that says ``"applicable": false``) and the wall time;
(2) the removal curves of Fine-pruning and NAD (paper Table III), one row per prune ratio /
epoch, CA and the *headline* ASR per run: ASR-C for untargeted attacks (a repaired model's clean
mistakes count as successes there, so plain ASR >= 1 - CA says nothing about the backdoor), plain
ASR for the targeted controls. Each run's column title says which it shows; a defense.json
written before ASR-C was recorded shows plain ASR, marked † and explained under the table.
(3) For the model-level detectors (defense.json ``level: model``, see
:func:`cuba.defenses.base.model_verdict`): over the runs given, the AUROC of the detector's
``score`` separating CUBA models (settings ``cuba-*``) from clean ones, and any backdoored model
from clean ones, in the direction the detector declares (``score_suspicious``), with how many of
each its own rule flagged. An AUROC needs at least one model of each kind; a detector that was
not applicable to a model leaves that model out.

``references``: clean models the defender trained itself (issue 18's threat model for the
inversion detectors). A model-level detector with a reference rule (``Defense.with_references``:
trigger inversion, dispersion inversion) that ran without one gets its ``flagged`` decided from the
references' scores under the same detector; the reference runs are dropped from the scored runs, so
no model calibrates its own verdict and none enters an AUROC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..runs import read_json
from .base import ASR_NAMES, headline_asr_key_of, headline_value, not_applicable, pct
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


def _kind(setting: str) -> str:
    return "clean" if setting == "clean" else "cuba" if setting.startswith("cuba") else "other"


def model_auroc(entries: list[tuple[str, dict[str, Any]]], positive: tuple[str, ...]) -> tuple[float | None, int, int]:
    """(AUROC of score, n positive, n clean) over (setting, defense.json) pairs; positives are the
    runs whose kind (clean / cuba / other) is in ``positive``. None without both kinds."""
    from sklearn.metrics import roc_auc_score

    pairs = [(_kind(s), f) for s, f in entries if f.get("score") is not None and not not_applicable(f)]
    pos = [f["score"] for k, f in pairs if k in positive]
    neg = [f["score"] for k, f in pairs if k == "clean"]
    if not pos or not neg:
        return None, len(pos), len(neg)
    sign = -1.0 if entries[0][1].get("score_suspicious") == "low" else 1.0
    y = [1] * len(pos) + [0] * len(neg)
    return float(roc_auc_score(y, [sign * v for v in pos + neg])), len(pos), len(neg)


def model_level_table(res: list[tuple[Path, dict[str, dict[str, Any]]]]) -> list[str]:
    """Markdown lines of table (3); [] when no model-level detector ran."""
    names = sorted({n for _, d in res for n, f in d.items() if f.get("level") == "model"})
    if not names:
        return []
    lines = ["", "Model-level detectors over these runs: AUROC of the score (direction as the detector declares), "
             "and how many models its own rule flagged", "",
             "| detector | suspicious score | AUROC CUBA vs clean (n) | AUROC any backdoor vs clean (n) | flagged: CUBA | "
             "flagged: other backdoors | flagged: clean |", "|---|---|---|---|---|---|---|"]
    for name in names:
        entries = [(str(d[name].get("setting", r.name)), d[name]) for r, d in res if name in d]
        cells = []
        for positive in (("cuba",), ("cuba", "other")):
            auc, n_pos, n_neg = model_auroc(entries, positive)
            cells.append(f"{'–' if auc is None else f'{auc:.3f}'} ({n_pos} vs {n_neg})")
        for kind in ("cuba", "other", "clean"):
            mine = [f for s, f in entries if _kind(s) == kind and f.get("flagged") is not None]
            cells.append(f"{sum(bool(f['flagged']) for f in mine)}/{len(mine)}" if mine else "–")
        lines.append(f"| {name} | {entries[0][1].get('score_suspicious', '?')} | " + " | ".join(cells) + " |")
    return lines


def apply_references(res: list[tuple[Path, dict[str, dict[str, Any]]]],
                     refs: list[tuple[Path, dict[str, dict[str, Any]]]], defenses: dict[str, type]) -> list[str]:
    """Decide ``flagged`` of each reference-calibrated detector in ``res`` (in place) from the
    reference runs' scores; the note lines that say so under the table ([] without references)."""
    for r, d in refs:
        setting = str(next(iter(d.values())).get("setting", "?"))
        if setting != "clean":
            raise ConfigError(f"--reference {r}: a reference model must be clean, this one is {setting!r}")
    notes = []
    for name, cls in defenses.items():
        scores = [d[name].get("score") for _, d in refs if name in d and not not_applicable(d[name])]
        changed = 0
        for _, d in res:
            f = d.get(name)
            if f is None or f.get("flagged") is not None:
                continue
            new = cls.with_references(f, scores)
            if new is not None:
                d[name], changed = new, changed + 1
        if changed:
            notes.append(f"{name}: flagged decided on {len(scores)} clean reference model(s) the defender trained "
                         f"(scores {', '.join(f'{v:g}' for v in scores if v is not None)}); they are not among the runs above.")
    return ["", *notes] if notes else []


def defense_tables(run_dirs: list[Path], names: list[str] | None = None,
                   references: list[Path] | None = None) -> str:
    from . import DEFENSES  # here: the package imports this module's siblings

    ref_set = {Path(p).resolve() for p in references or []}
    kept = [(i, r) for i, r in enumerate(run_dirs) if Path(r).resolve() not in ref_set]
    if names:
        names = [names[i] for i, _ in kept]
    res = load_results([r for _, r in kept])
    notes = apply_references(res, load_results(list(references or [])), DEFENSES)
    cols = names or [str(next(iter(d.values())).get("setting", r.name)) for r, d in res]
    lines = ["| defense | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    # the defenses that ran on at least one of the runs (a row of dashes says nothing), registered
    # ones in registration order, then any other defense.json found (e.g. a removed defense)
    ran = {n for _, d in res for n in d}
    found = [n for n in DEFENSES if n in ran] + sorted(ran - set(DEFENSES))
    for name in found:
        cells = []
        for _, d in res:
            f = d.get(name)
            if f is None:
                cells.append("–")
                continue
            line = not_applicable(f) or (DEFENSES[name].headline(f) if name in DEFENSES else "see defense.json")
            v = verdict(DEFENSES.get(name), f)
            cells.append(f"{'' if v is None else v + VERDICT_SEP}{line} ({f['seconds']:.0f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, key in (("fine-pruning", "prune_ratio"), ("nad", "epoch")):
        lines += removal_table(name, key, cols, [d.get(name) for _, d in res])
    return "\n".join(lines + model_level_table(res) + notes)
