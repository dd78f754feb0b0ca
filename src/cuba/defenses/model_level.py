"""The model-level half of ``cuba defense-table``: how well each model-level detector's ``score``
separates backdoored models from clean ones, and how many models its own rule flagged.

Model-level detectors (defense.json ``level: model``, :func:`cuba.defenses.base.model_verdict`)
write one number per model. Over the runs given, the AUROC of that score separates CUBA models
(settings ``cuba-*``) from clean ones, and any backdoored model from clean ones, in the direction
the detector declares (``score_suspicious``). An AUROC needs at least one model of each kind; a
detector that was not applicable to a model leaves that model out, while a model an inversion
detector never moved within its schedule (``reached: false``, score null) is kept as the least
suspicious of all -- dropping it would drop exactly the models that resisted hardest.

Scores are only comparable between models of one data set and architecture (a budget on MNIST
says nothing about one on CIFAR-10), so runs are grouped by (data set, model) from their
config.yaml, with one AUROC row per group and detector.

``references``: clean models the defender trained itself (issue 18's threat model for the
inversion detectors). A detector with a reference rule (``Defense.with_references``: trigger
inversion, dispersion inversion) that ran without one gets its ``flagged`` decided from the scores
of the references of the *same group*, which must have run with the same parameters (seed aside);
the references are not among the scored runs, so none calibrates its own verdict or enters an AUROC.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config import ConfigError
from .base import IMPORTED, not_applicable

Results = list[tuple[Path, dict[str, dict[str, Any]]]]
"""[(run folder, {defense name: defense.json})], as :func:`cuba.defenses.table.load_results` reads them."""

# parameters that may differ between a reference and the model it calibrates
_FREE_PARAMS = frozenset({"seed", "reference_budgets", "reference_budget"})


def _kind(setting: str) -> str:
    """clean / cuba / other backdoor; "unknown" for an imported model or one of no known setting, which
    no AUROC can label."""
    if setting in (IMPORTED, "?"):
        return "unknown"
    return "clean" if setting == "clean" else "cuba" if setting.startswith("cuba") else "other"


def _setting(run_dir: Path, f: dict[str, Any]) -> str:
    """The setting a defense.json names, else (a hand-made or foreign file) its run's config label,
    else "?" -- never the folder name, which would read as a backdoor whatever the model is."""
    if f.get("setting"):
        return str(f["setting"])
    from ..runs import RunFolder

    try:
        return RunFolder(run_dir).config().label() if (Path(run_dir) / "config.yaml").is_file() else "?"
    except Exception:  # noqa: BLE001 - an unreadable config leaves the model unlabelled, not the table unwritten
        return "?"


def model_group(run_dir: Path) -> str:
    """"<data set>/<model>" from the run's config.yaml ("?" when it has none): the models whose
    scores may be ranked together."""
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.is_file():
        return "?"
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    data, model = cfg.get("data", cfg), cfg.get("model", cfg)
    return f"{Path(str(data.get('dataset', '?'))).stem}/{model.get('model', '?')}"


def _ranked_score(f: dict[str, Any]) -> float | None:
    """The score in "higher is more suspicious" orientation; -inf for a model the detector never moved
    (``reached: false`` without a score); None when the model is left out."""
    if not_applicable(f):
        return None
    sign = -1.0 if f.get("score_suspicious") == "low" else 1.0
    score = f.get("score")
    if score is None:
        return -math.inf if f.get("reached") is False else None
    return sign * float(score) if math.isfinite(float(score)) else None


def reference_flag(score: float | None, references: Sequence[float | None], margin: float,
                   largest: float) -> tuple[bool | None, float | None]:
    """(flagged, cut): the inversion detectors' reference rule. A suspect is flagged when its budget
    ``score`` is under the smallest clean reference's budget divided by ``margin``. A budget the search
    never reached is None -- censored, known only to exceed ``largest`` -- and the flag is decided only
    where it holds whatever the censored budgets are (None otherwise, and without references): a
    censored reference exceeds every measured one, so it never lowers the cut; when every reference is
    censored the cut lies somewhere beyond largest / margin. ``cut`` is None then, and without references."""
    if not references:
        return None, None
    measured = [float(r) for r in references if r is not None]
    if not measured:
        return (True if score is not None and score <= largest / margin else None), None
    cut = min(measured) / margin
    if score is None:
        return (False if cut <= largest else None), cut
    return bool(score < cut), cut


def model_auroc(entries: list[tuple[str, dict[str, Any]]], positive: tuple[str, ...]) -> tuple[float | None, int, int]:
    """(AUROC of score, n positive, n clean) over (setting, defense.json) pairs; positives are the
    runs whose kind (clean / cuba / other) is in ``positive``. None without both kinds."""
    from sklearn.metrics import roc_auc_score

    pairs = [(_kind(s), v) for s, f in entries if (v := _ranked_score(f)) is not None]
    pos = [v for k, v in pairs if k in positive]
    neg = [v for k, v in pairs if k == "clean"]
    if not pos or not neg:
        return None, len(pos), len(neg)
    finite = [v for v in pos + neg if math.isfinite(v)]
    floor = (min(finite) if finite else 0.0) - 1.0  # sklearn refuses inf; any value below every score ranks the same
    y = [1] * len(pos) + [0] * len(neg)
    return float(roc_auc_score(y, [v if math.isfinite(v) else floor for v in pos + neg])), len(pos), len(neg)


def _groups(res: Results) -> dict[str, Results]:
    out: dict[str, Results] = {}
    for r, d in res:
        out.setdefault(model_group(r), []).append((r, d))
    return out


def flag_count(fields: list[dict[str, Any]]) -> str:
    """"k/n" models flagged of the ``n`` scored, with how many the rule left undecided (``flagged``
    null: no reference, or a budget beyond the schedule) -- never a count over the decided ones only,
    which would read 1/1 for one flag among twelve models; "–" with no model."""
    if not fields:
        return "–"
    undecided = sum(f.get("flagged") is None for f in fields)
    text = f"{sum(bool(f.get('flagged')) for f in fields)}/{len(fields)}"
    return text + (f" ({undecided} undecided)" if undecided else "")


def model_level_table(res: Results) -> list[str]:
    """Markdown lines of the model-level table; [] when no model-level detector ran."""
    # models of known kind only: an imported model's label is what its audit asks, so it ranks nothing
    names = sorted({n for r, d in res for n, f in d.items()
                    if f.get("level") == "model" and _kind(_setting(r, f)) != "unknown"})
    if not names:
        return []
    groups, notes = _groups(res), []
    lines = ["", "Model-level detectors over these runs: AUROC of the score (direction as the detector declares), "
             "and how many models its own rule flagged" + (", per data set / model" if len(groups) > 1 else ""), "",
             "| detector | suspicious score | AUROC CUBA vs clean (n) | AUROC any backdoor vs clean (n) | flagged: CUBA | "
             "flagged: other backdoors | flagged: clean |", "|---|---|---|---|---|---|---|"]
    for name in names:
        for group, members in groups.items():
            entries = [(_setting(r, d[name]), d[name]) for r, d in members if name in d]
            if not entries:
                continue
            cells = []
            for positive in (("cuba",), ("cuba", "other")):
                auc, n_pos, n_neg = model_auroc(entries, positive)
                cells.append(f"{'–' if auc is None else f'{auc:.3f}'} ({n_pos} vs {n_neg})")
            for kind in ("cuba", "other", "clean"):
                cells.append(flag_count([f for s, f in entries if _kind(s) == kind and not not_applicable(f)]))
            label = f"{name} ({group})" if len(groups) > 1 else name
            lines.append(f"| {label} | {entries[0][1].get('score_suspicious', '?')} | " + " | ".join(cells) + " |")
            mixed = _mixed_params([f for _, f in entries])
            if mixed:
                notes.append(f"{label}: the scored runs ran it with different parameters ({', '.join(mixed)}); its AUROC "
                             "pools scores that are not on one scale")
    return lines + (["", *notes] if notes else [])


def _mixed_params(fields: list[dict[str, Any]]) -> list[str]:
    """The parameters (seed and reference budgets aside) on which these runs of one detector differ; []
    when they agree. A model-level AUROC ranks scores against each other: they must come from one
    setting (e.g. Neural Cleanse's early stop changed a verdict, BENCHMARKS.md)."""
    params = [_effective_params(f) for f in fields]
    keys = sorted({k for p in params for k in p})
    mixed = [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]
    # what a detector resolved where it ran ("auto" precision -> bf16 or fp32), among the files that say so
    ran = [f["resolved"] for f in fields if isinstance(f.get("resolved"), dict)]
    return mixed + [f"{k} as run" for k in sorted({k for r in ran for k in r}) if len({repr(r.get(k)) for r in ran}) > 1]


def _check_reference(ref: Path, f: dict[str, Any], target: dict[str, Any], name: str, run: Path) -> None:
    """A reference must have run the detector with the scored run's parameters (seed aside)."""
    mine, theirs = _effective_params(f), _effective_params(target)
    shared = set(f.get("resolved") or {}) & set(target.get("resolved") or {})  # older files lack "resolved"
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    diff += sorted(f"{k} as run" for k in shared if f["resolved"][k] != target["resolved"][k])
    if diff:
        raise ConfigError(f"--reference {ref}: {name} ran with other parameters than on {run} ({', '.join(diff)}); "
                          "a reference must be scored by the same detector settings")


def _effective_params(f: dict[str, Any]) -> dict[str, Any]:
    """The detector's parameters that must match between a reference and a scored run: those of
    ``params`` less the free ones, a null one (resolved when the detector ran) replaced by the value
    it recorded under the same name -- dispersion inversion before 2026-11-30 wrote ``tau: null`` in
    ``params`` and the temperature it used, 0.1, as ``tau``; the same run today writes 0.1 in both."""
    params = f.get("params") or {}
    return {k: (f.get(k) if v is None and k in f else v) for k, v in params.items() if k not in _FREE_PARAMS}


def load_references(paths: Sequence[Path], name: str, group: str, suspect: Path,
                    params: dict[str, Any]) -> Results:
    """The clean reference runs' ``name`` results for ``cuba defend NAME RUN --reference REF...``,
    checked before the suspect is scored (minutes of search must not end in "wrong reference"):
    each must hold REF/defenses/NAME/defense.json of a clean model of the suspect's ``group``, not
    be the suspect itself, have applied, and have run with the suspect's ``params`` (those fixed
    before the run; a null one, resolved by the run, is compared after it)."""
    import json

    from ..pack import is_pack
    from ..runs import read_json

    out: Results = []
    for p in map(Path, paths):
        if is_pack(p):
            raise ConfigError(f"--reference {p}: a pack holds no defense results; give a run folder scored with "
                              f"cuba defend {name} REF (a reference is a model you trained yourself)")
        if p.resolve() == Path(suspect).resolve():
            raise ConfigError(f"--reference {p}: the suspect cannot be its own reference")
        f = p / "defenses" / name / "defense.json"
        if not f.is_file():
            raise ConfigError(f"--reference {p}: no {name} result in it ({f} is missing); score the reference "
                              f"first with: cuba defend {name} {p}")
        d = read_json(f)
        if d.get("setting") != "clean":
            raise ConfigError(f"--reference {p}: a reference model must be clean, this one is {d.get('setting')!r}")
        if model_group(p) != group:
            raise ConfigError(f"--reference {p}: its model is {model_group(p)}, the suspect's {group}; a budget "
                              "is only compared between models of one data set and architecture")
        if not_applicable(d):
            raise ConfigError(f"--reference {p}: {name} did not apply to it ({d.get('reason', 'n/a')}); it has no score")
        mine = {k: v for k, v in json.loads(json.dumps(params)).items() if v is not None and k not in _FREE_PARAMS}
        theirs = _effective_params(d)
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        if diff:
            raise ConfigError(f"--reference {p}: {name} ran there with other parameters ({', '.join(diff)}); score the "
                              "suspect with the reference's settings, or the reference with the suspect's")
        out.append((p, {name: d}))
    return out


def apply_references(res: Results, refs: Results, defenses: dict[str, type]) -> list[str]:
    """Decide ``flagged`` of each reference-calibrated detector in ``res`` (in place) from the scores
    of the reference runs of the same (data set, model) group; the note lines that say so under the
    table ([] without references)."""
    for r, d in refs:
        setting = str(next(iter(d.values())).get("setting", "?"))
        if setting != "clean":
            raise ConfigError(f"--reference {r}: a reference model must be clean, this one is {setting!r}")
    ref_groups, groups = _groups(refs), _groups(res)  # each run's config.yaml read once
    notes = []
    for name, cls in defenses.items():
        for group, members in groups.items():
            mine = [(r, d[name]) for r, d in ref_groups.get(group, []) if name in d and not not_applicable(d[name])]
            changed = 0
            for run, d in members:
                f = d.get(name)
                if f is None or f.get("flagged") is not None or not mine:
                    continue
                for ref, rf in mine:
                    _check_reference(ref, rf, f, name, run)
                new = cls.with_references(f, [rf.get("score") for _, rf in mine])
                if new is not None:
                    d[name], changed = new, changed + 1
            if changed:
                scores = ", ".join("not reached" if rf.get("score") is None else cls.format_score(rf["score"], rf)
                                   for _, rf in mine)
                notes.append(f"{name} ({group}): flagged decided on {len(mine)} clean reference model(s) the defender "
                             f"trained (scores {scores}); they are not among the runs above.")
    return ["", *notes] if notes else []
