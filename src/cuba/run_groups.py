"""Finished run folders read, grouped by setting, and judged degenerate or not.

Why a module of its own: ``cuba compare`` (:mod:`cuba.compare`), Table II and report.html
(:mod:`cuba.reproduce`) and the sweep ranking (:mod:`cuba.sweep`) all read the same run folders,
fold the seeds of a setting the same way and must flag the same models as degenerate; the tables
each of them draws from these groups live with their own formatting.

Runs are grouped by their whole resolved config minus the fields that do not change what is
trained (seed, output paths, progress bars, device, evaluation batch size). A group's name is
the run label (``cuba-fra``, ``badnets-t0``, ...) plus every other field that differs between
the groups being compared (``tau=0.04``), so a table never silently merges two settings.

A model that stopped classifying has no backdoor to measure (:func:`degenerate_reason`): a run is
degenerate when its metrics.json says so or, for older runs, when its CA is under twice chance
(2/K), or (an attacked run) when its CA is more than 10 points under the clean group of the same
data set and model; such seeds leave the group's ASR/DS, and a whole attacked group is degenerate
when all its seeds are or its mean CA is that far under (:func:`clean_reference`, :func:`group_degeneracy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import RUN_ONLY_FIELDS
from .formatting import fmt_value
from .metrics import at_chance
from .runs import RunFolder, is_finished

# a degenerate model: CA at chance (cuba.metrics.at_chance), or more than CLEAN_GAP under the clean reference
CLEAN_GAP = 0.10
REASON_CHANCE = "CA at chance"
REASON_CLEAN_GAP = "CA far below clean reference"


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


UNTAKEN_ASR = 0.5
"""Below this ASR a backdoor attack did not take: a detector has no backdoor to find in the model."""


def untaken_backdoor(run_dir: Path, setting: str) -> str | None:
    """Why a backdoored model's detector verdicts mean nothing -- its attack never implanted the
    backdoor (test ASR under :data:`UNTAKEN_ASR`: on MNIST, an adaptive attacker's counter-term at
    weight 5 held one seed's ASR at 3.4%) -- or None. Counting such a model would charge the
    detectors with a miss (or credit them with a catch) on a model with nothing to catch, so the
    defense tables set it aside with this reason. A clean or imported model, or a run without an ASR
    in metrics.json, is never set aside."""
    from .defenses.base import IMPORTED

    f = Path(run_dir) / "metrics.json"
    if setting in ("clean", IMPORTED) or not f.is_file():
        return None
    from .runs import read_json

    asr = read_json(f).get("asr")
    if not isinstance(asr, (int, float)) or isinstance(asr, bool) or asr >= UNTAKEN_ASR:
        return None
    return f"its backdoor did not take (test ASR {100 * asr:.1f}% < {100 * UNTAKEN_ASR:.0f}%)"


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
    """Apply :func:`degenerate_reason` to every run -- each seed against ``clean_ca`` too, so a seed far
    under it is dropped even when the group's mean is not (seeds at 99 / 99 / 75 against a clean 99:
    mean 91) -- and to the group's mean CA against ``clean_ca``."""
    out = Degeneracy()
    for r in runs:
        why = degenerate_reason(r.metrics, clean_ca=clean_ca if attacked else None)
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


def setting_key(config: dict[str, Any], fields: Any = None) -> tuple:
    """What makes a run's setting: its config fields (all, or only ``fields``) minus the run-only
    ones and the seed, as a hashable, order-free key."""
    return tuple(sorted((k, repr(v)) for k, v in config.items()
                        if k not in NOT_A_SETTING and (fields is None or k in fields)))


def varying_fields(keys: list[tuple], exclude: set[str] = frozenset()) -> list[str]:
    """The fields (sorted) whose value differs between the settings ``keys`` (of :func:`setting_key`)."""
    distinct = list(dict.fromkeys(keys))
    return sorted({k for k in {k for key in distinct for k, _ in key} - exclude
                   if len({dict(key).get(k) for key in distinct}) > 1})


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs by setting, name each group, keep the order in which settings first appear."""
    keys = [setting_key(r.config) for r in runs]
    # the fields whose value differs between settings, beyond what the label already says
    varying = varying_fields(keys, IN_LABEL)
    groups: dict[tuple, Group] = {}
    for run, key in zip(runs, keys):
        if key not in groups:
            extra = ", ".join(f"{k}={fmt_value(run.config.get(k))}" for k in varying)
            groups[key] = Group(f"{run.label} ({extra})" if extra else run.label)
        groups[key].runs.append(run)
    return list(groups.values())


def load_groups(paths: list[str | Path]) -> list[Group]:
    return group_runs([load_run(p) for p in find_runs(paths)])


def clean_reference(group: Group, groups: list[Group]) -> Group | None:
    """The clean group (attack none) on the same data set and model that differs from ``group`` in
    the fewest settings -- the CA an attacked model should keep. None when there is none."""
    cfg = group.config
    clean = [g for g in groups if g.config.get("attack") == "none" and g is not group
             and g.config.get("dataset") == cfg.get("dataset") and g.config.get("model") == cfg.get("model")]
    if not clean:
        return None
    return min(clean, key=lambda g: setting_distance(g.config, cfg))


def setting_distance(a: dict[str, Any], b: dict[str, Any]) -> int:
    """How many settings of config ``b`` config ``a`` differs in (seeds and run-only fields aside): the
    clean runs nearest an attacked setting are its reference."""
    return sum(a.get(k) != v for k, v in b.items() if k not in NOT_A_SETTING)
