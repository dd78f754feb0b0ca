"""A reproduction grid: data sets x models x attacks/variants x seeds, plus the defenses per model.

A grid file (YAML) names the axes; :func:`expand` turns it into one :class:`Cell` per run,
each a complete, validated training config -- every cell is checked before the first trains.

    name: cpu
    datasets: [mnist]                    # names or paths
    models: {mnist: simplecnn}           # or a list: every data set with every model
    presets: {mnist: mnist}              # config preset (packaged name or YAML path) per data set
    attacks: [none, cuba]                # none = the clean baseline; also the baselines' names
    variants: [fra, nra-5, nra-2]        # for attacks whose target rule comes from the variant
    seeds: [0, 1, 2]                     # or {data set: [seeds]}
    per_attack:                          # other seeds / variants for some attacks (e.g. a control)
      push-away: {seeds: [0], variants: [fra]}
      cuba-adaptive: {settings: {w1: {adaptive_weight: 1}, w5: {adaptive_weight: 5}}}  # a cell per setting
    epochs: null                         # a number, {data set: number}, or null (the preset's)
    defenses: [strip, neural-cleanse, sentinet, fine-pruning, nad]
    defense_seeds: [0]                   # which seeds' models the defenses inspect (or per data set)
    reference_seeds: []                  # clean seeds the defender trains as references (or per data set): they
                                         # run the defenses that need references (all of them if in defense_seeds)
    compare: {baseline: cuba-fra, against: cuba-adaptive}  # defenses.md: each detector on these groups against
                                         # the baseline group (groups: run names less -s<seed> and the shared prefix)
    data_dir: ../shared/data             # named sets, and relative paths not found as given
    fallback: {cifar10: cifar10-jpeg.zip}  # used for a named set that has no local copy
    set: {}                              # config fields for every cell
    overrides:                           # per-cell fields: every `match` key must equal the cell's
      - {match: {dataset: mnist, variant: nra-2}, set: {tau: 0.04}}
    also: [detectors-digits]             # companion grids the same command runs after this one, each into
                                         # OUT/<its name> with its own tables (a recipe of its own, e.g. other
                                         # data, seeds or defenses); a companion names none of its own

A *named* data set with no local copy (and no ``download: true``) does not stop the grid: its
cells are expanded and validated like the others but marked blocked (:attr:`Cell.blocked`), so
the runner skips them and the tables say why, while every other cell runs -- a GPU machine
without a network gets only the data that was carried to it. ``fallback`` names a stand-in copy
for such a set (the lossy cifar10-jpeg.zip for CIFAR-10); its cells are then named after, and
train on, the copy, so no result is mistaken for the original's. Keys given per data set
(models, presets, seeds, ...) are looked up under the grid's name for it, but an override's
``match: {dataset: ...}`` sees the data set that runs. A missing *path* stays an error: it is
a typo or a file the user has, not one a download could bring.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, flatten_values, load_config_file, make_config
from ..runs import safe_name

KEYS = ("name", "datasets", "models", "presets", "attacks", "variants", "seeds", "per_attack", "epochs", "defenses",
        "defense_seeds", "reference_seeds", "compare", "data_dir", "fallback", "set", "overrides", "also")


@dataclass
class Cell:
    """One training run of the grid, and the defenses to run on its model."""

    name: str
    values: dict[str, Any]
    defenses: list[str] = field(default_factory=list)
    blocked: str | None = None  # why it cannot run here (its data set has no local copy), or None
    # a clean model the defender trains as a reference (``reference_seeds``): the inversion detectors
    # decide their flag on it, and the defense table keeps it out of the scored models
    reference: bool = False


def _as_list(v: Any, name: str) -> list:
    if v is None:
        return []
    if isinstance(v, (str, int, float)):
        return [v]
    if not isinstance(v, list):
        raise ConfigError(f"grid: {name} must be a list, got {type(v).__name__}")
    return v


def _preset(spec: str) -> dict[str, Any]:
    """A packaged preset (``mnist``) or a YAML/TOML file."""
    path = resources.files("cuba") / "configs" / f"{spec}.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text()) or {}
    if Path(spec).is_file():
        return load_config_file(spec)
    raise ConfigError(f"grid: preset {spec!r} is neither a packaged preset nor a config file")


def _for(value: Any, dataset: str) -> Any:
    """``value`` itself, or its entry for ``dataset`` when it is a {data set: value} mapping."""
    return value.get(dataset) if isinstance(value, dict) else value


def shipped_grids() -> list[str]:
    """The names of the grids that ship with the package (``cuba reproduce NAME``)."""
    folder = resources.files("cuba") / "configs" / "grids"
    return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_grid(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        shipped = resources.files("cuba") / "configs" / "grids" / f"{path}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"grid: {path} is neither a file nor a shipped grid ({', '.join(shipped_grids())})")
        return yaml.safe_load(shipped.read_text())
    raw = yaml.safe_load(p.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"grid: {p} must hold a mapping of {', '.join(KEYS)}")
    return raw


RESERVED_FOLDERS = frozenset({"runs", "figures", "submitit"})
"""What a grid writes into its --out itself: no companion grid's folder may be named so."""


def companions(raw: dict[str, Any], grid: str | Path) -> list[str]:
    """The grids ``also`` names (run by the same command after ``grid``), checked before any loads: a
    relative path is taken from the folder of ``grid``'s file when it is there (else as given, or a
    shipped grid's name)."""
    also = raw.get("also")
    if also is None:
        return []
    if not (isinstance(also, list) and all(isinstance(a, str) and a for a in also)):
        raise ConfigError(f"grid: also must be a list of grid names or files (run by the same command), got {also!r}")
    base = Path(grid).parent if Path(grid).is_file() else None
    return [str(base / a) if base is not None and not Path(a).is_absolute() and (base / a).is_file() else a
            for a in also]


def _local_choice(ds: Any, fallback: str | None, values: dict[str, Any]) -> tuple[Any, str | None]:
    """(the data set the cells train on, why they are blocked or None): ``ds`` when it can be
    loaded here, else its ``fallback`` when that can, else ``ds`` marked blocked. Only named sets
    are checked; a path is left to the config check, which refuses a missing one."""
    from ..data import DATASET_NAMES
    from ..data.sources import missing_copy

    key = str(ds).strip().lower().replace("_", "-")
    if key not in DATASET_NAMES:
        return ds, None
    data_dir, download = values.get("data_dir"), values.get("download") is True
    why = missing_copy(str(ds), data_dir, download)
    if why is None:
        return ds, None
    if fallback is not None:
        if missing_copy(fallback, data_dir, download) is None:
            return fallback, None
        why = why.replace(f"put {key}.npz in", f"put {key}.npz or {fallback} in")
    return ds, why


def _check_grid(raw: dict[str, Any]) -> tuple[list[Any], list[Any], dict[str, str]]:
    """The grid's top-level keys, checked before any cell: (datasets, defenses, fallback)."""
    from ..defenses import DEFENSES

    unknown = sorted(set(raw) - set(KEYS), key=str)
    if unknown:
        raise ConfigError(f"grid: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(KEYS)}")
    compare = raw.get("compare")
    if compare is not None and not (isinstance(compare, dict) and isinstance(compare.get("baseline"), str)
                                    and set(compare) <= {"baseline", "against"}
                                    and isinstance(compare.get("against", ""), str)):
        raise ConfigError(f"grid: compare must be {{baseline: <group>, against: <name prefix>}}, got {compare!r}")
    companions(raw, "")  # the type of ``also``; its grids are loaded by the command that runs them
    datasets = _as_list(raw.get("datasets"), "datasets")
    if not datasets:
        raise ConfigError("grid: datasets must name at least one data set")
    per_attack = raw.get("per_attack") or {}
    named = {a for ds in datasets for a in _as_list(_for(raw.get("attacks", ["none", "cuba"]), ds), "attacks")}
    for a, opts in (per_attack.items() if isinstance(per_attack, dict) else [(None, None)]):
        if a not in named or not isinstance(opts, dict) or set(opts) - {"seeds", "variants", "settings"}:
            raise ConfigError(f"grid: per_attack must map attacks of the grid to {{seeds: [...], variants: [...], "
                              f"settings: {{name: {{field: value}}}}}}, got {a!r}: {opts!r}")
        settings = opts.get("settings", {})
        if not isinstance(settings, dict) or not all(
                isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9_.]+", k) and isinstance(v, dict) for k, v in settings.items()):
            raise ConfigError(f"grid: per_attack {a!r} settings must map short names (letters, digits, _ .) to "
                              f"{{field: value}}, got {settings!r}")
    defenses = _as_list(raw.get("defenses"), "defenses")
    bad = [d for d in defenses if d not in DEFENSES]
    if bad:
        raise ConfigError(f"grid: unknown defense(s) {', '.join(bad)}; choose from {', '.join(DEFENSES)}")
    for o in _as_list(raw.get("overrides"), "overrides"):
        if not isinstance(o, dict) or not isinstance(o.get("match"), dict) or not isinstance(o.get("set"), dict):
            raise ConfigError("grid: each override needs a `match` mapping and a `set` mapping")
    fallback = raw.get("fallback") or {}
    if not isinstance(fallback, dict) or not all(isinstance(v, str) and v for v in fallback.values()):
        raise ConfigError(f"grid: fallback must map data sets to another data set (a name or path), got {fallback!r}")
    stray = [k for k in fallback if k not in datasets]
    if stray:
        raise ConfigError(f"grid: fallback names data set(s) not in datasets: {', '.join(map(str, stray))}")
    return datasets, defenses, fallback


def _cell_values(raw: dict[str, Any], base: dict[str, Any], ds: Any, run_ds: Any, model: str, attack: str,
                 variant: str, seed: int) -> dict[str, Any]:
    """One cell's config values: preset, the grid's ``set``, the cell's axes, epochs, overrides."""
    values = {**flatten_values(base), **flatten_values(raw.get("set") or {}), "dataset": run_ds, "model": model, "attack": attack,
              "variant": variant, "seed": seed, "progress": False}
    if raw.get("data_dir"):
        values["data_dir"] = raw["data_dir"]
    ep = _for(raw.get("epochs"), ds)
    if ep is not None:
        values["epochs"] = ep
    for o in _as_list(raw.get("overrides"), "overrides"):
        if all(str(values.get(k)) == str(v) for k, v in o["match"].items()):
            values.update(o["set"])
    return values




def expand(raw: dict[str, Any]) -> list[Cell]:
    """Every cell of the grid, validated; raises ConfigError naming the first bad key or cell."""
    from ..attack import FIXED_RULE
    from ..defenses import DEFENSES

    datasets, defenses, fallback = _check_grid(raw)
    models, presets = raw.get("models") or {}, raw.get("presets") or {}
    per_attack = raw.get("per_attack") or {}
    cells: list[Cell] = []
    for ds in datasets:
        ds_models = _as_list(models.get(ds) if isinstance(models, dict) else models, "models") or ["simplecnn"]
        base = _preset(presets[ds]) if ds in presets else {}
        run_ds, blocked = _local_choice(ds, fallback.get(ds), {**base, **(raw.get("set") or {}), **(
            {"data_dir": raw["data_dir"]} if raw.get("data_dir") else {})})
        seeds = _as_list(_for(raw.get("seeds", [0]), ds), "seeds")
        if not seeds:
            raise ConfigError(f"grid: no seeds for data set {ds!r}")
        d_seeds = raw.get("defense_seeds")
        defense_seeds = seeds[:1] if d_seeds is None else _as_list(_for(d_seeds, ds), "defense_seeds")
        ref_seeds = _as_list(_for(raw.get("reference_seeds"), ds), "reference_seeds")
        # attacks and variants may be {data set: list}, like models (e.g. baselines on MNIST only)
        attacks = _as_list(_for(raw.get("attacks", ["none", "cuba"]), ds), "attacks")
        variants = _as_list(_for(raw.get("variants", ["fra"]), ds), "variants")
        pairs = [(a, s) for a in attacks for s in _as_list(per_attack.get(a, {}).get("seeds", seeds), "seeds")]
        for model, (attack, seed) in itertools.product(ds_models, pairs):
            own = _as_list(per_attack.get(attack, {}).get("variants", variants), "variants")
            # named settings of one attack (e.g. two adaptive_weight values) become cells of their own
            settings = per_attack.get(attack, {}).get("settings") or {"": {}}
            for variant, (tag, extra) in itertools.product(["fra"] if attack == "none" or attack in FIXED_RULE else own,
                                                           settings.items()):
                values = {**_cell_values(raw, base, ds, run_ds, model, attack, variant, seed), **flatten_values(extra)}
                try:
                    cfg = make_config(values)
                except ConfigError as e:
                    raise ConfigError(f"grid cell {ds}/{model}/{attack}/{variant}/seed {seed}: {e}") from None
                label = f"{cfg.label()}-{tag}" if tag else cfg.label()
                name = f"{Path(str(run_ds)).stem}-{safe_name(model)}-{label}-s{seed}"
                ref = attack == "none" and seed in ref_seeds
                mine = defenses if seed in defense_seeds else [d for d in defenses if DEFENSES[d].has_reference_rule()] if ref else []
                cells.append(Cell(name, values, mine, blocked, ref))
        clean_seeds = {c.values["seed"] for c in cells if c.values["attack"] == "none" and c.values["dataset"] == run_ds}
        missing = [s for s in ref_seeds if s not in clean_seeds]
        if missing:
            raise ConfigError(f"grid: reference_seeds {missing} of {ds} are not seeds of its clean cells "
                              f"({sorted(clean_seeds)}); a reference model is a clean cell")
    names = [c.name for c in cells]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"grid: cells repeat ({', '.join(dup[:3])}); remove duplicate attacks, variants or seeds")
    return cells
