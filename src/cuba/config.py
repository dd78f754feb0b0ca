"""The training configuration: one dataclass, loaded from YAML/TOML and CLI flags, validated.

The fields fall into six sections (:data:`SECTIONS`): data, model, attack, optimisation, runtime,
output. Code reads them flat (``cfg.tau``: a field name is unique across sections); a config file
or a run folder's config.yaml may hold them flat or by section (``attack: {tau: 0.1}``), and
``--set`` takes ``tau=0.1`` or ``attack.tau=0.1`` alike, so files written before the sections
still load. config.yaml is written by section, for the reader.

The checks that need only the config run here (:func:`validate`); the few that need its data set
(K, image size) run once in :func:`cuba.train.check_against_data`. Either fails the same way: a
one-line :class:`ConfigError` naming the field and the allowed values (the CLI: exit code 2).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .formatting import first_line

MSE_REDUCTIONS = ("mean", "sum")
TARGET_REDUCTIONS = ("sum", "mean")  # the backdoor objective over T(y): METHOD.md sums; mean divides by |T(y)|
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = "auto, cpu, cuda, cuda:N or mps"  # what --device accepts (checked here and by the engine)


class ConfigError(ValueError):
    """A configuration field has a wrong type or value; the message names the field."""


@dataclass
class TrainConfig:
    """Every knob of one training run (clean or attacked). Defaults: the MNIST recipe of METHOD.md §3."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    n_train: int | None = None  # random training subset, for small CPU budgets
    n_test: int | None = None
    # share of the full training set held out, stratified, as the validation split (cuba.data.split):
    # per-epoch logs, sweeps and defense calibration read it; the test set only gives the final metrics
    val_fraction: float = 0.1
    augment: str = "auto"  # auto (per data set), none, crop, crop+flip
    # model
    model: str = "simplecnn"
    # attack
    attack: str = "cuba"
    variant: str = "fra"  # fra | nra
    k: int = 2  # NRA target-set size
    vicinity: str = "index"  # index | similar | explicit
    targets: Any = None  # explicit target sets: {class: [classes]} or one global [classes]
    generator_mode: str = "residual"  # residual | image
    generator_width: int = 16
    generator_scale: int = 1  # >1: the U-Net runs at 1/scale resolution (cheaper, smoother trigger)
    target_class: int = 0  # all-to-one controls (targeted, badnets)
    poison_rate: float = 0.1  # poisoning baselines (badnets, ubw-p): share of eligible training images
    patch_size: int = 3  # side of the square patch trigger of badnets / ubw-p, in pixels
    eps: float = 0.05  # final L-inf bound of the residual trigger
    eps_start: float = 0.3  # residual bound at the start, annealed down to eps
    eps_anneal: float = 0.5  # fraction of training over which eps_start -> eps (cosine)
    tau: float = 0.1
    lnf_eps: float = 1e-7
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 5.0
    mse_reduction: str = "mean"
    # sum (METHOD.md) or mean over T(y): with sum, NRA-2's backdoor term weighs |T(y)| = 2 terms
    # against FRA's K-1, so at equal gamma the two variants are not pushed equally hard
    target_reduction: str = "sum"
    adaptive_weight: float = 1.0  # cuba-adaptive(-set): weight of the confident-prediction (low-entropy) term
    backdoor_ratio: float = 1.0
    warmup_epochs: float = 0.0  # clean-only classifier epochs before the joint training
    gamma_ramp_epochs: float = 0.0  # linear ramp of gamma from 0 after the warm-up
    # optimisation
    epochs: float = 10.0
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    generator_lr: float = 1e-3
    grad_clip: float = 5.0  # max gradient L2 norm, per model
    seed: int = 0
    checkpoint_every: float = 1.0  # epochs between training checkpoints (fractions: mid-epoch; 0: none)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume on CPU
    # engine
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile the training forward passes (first steps pay the compile time)
    eval_batch_size: int = 1024
    # output
    out: str | None = None
    name: str | None = None
    progress: bool = True
    eval_each_epoch: bool = True  # validation metrics after every epoch (history.json); the bench turns it off

    @property
    def is_attack(self) -> bool:
        return self.attack != "none"

    @property
    def full_range(self) -> bool:
        """True when DS spreads over all K classes (H_c = K): FRA, and the fixed-rule baselines.

        For the all-to-one controls this makes DS measure how concentrated the backdoor
        predictions are (all on one class gives the minimum, 0.70 for K = 10), comparable
        with the untargeted attacks' values.
        """
        return self.variant == "fra" or self.attack in ("targeted", "badnets", "ubw-p")

    def label(self) -> str:
        """A short human-readable name of the setting, e.g. ``cuba-nra2`` or ``badnets-t0``."""
        if not self.is_attack:
            return "clean"
        if self.attack in ("targeted", "badnets"):
            return f"{self.attack}-t{self.target_class}"
        if self.attack == "ubw-p":
            return self.attack
        return f"{self.attack}-{self.variant}{self.k if self.variant == 'nra' else ''}"

    def to_dict(self) -> dict[str, Any]:
        """Flat: field -> value."""
        return dataclasses.asdict(self)

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """By section (:data:`SECTIONS`), the form config.yaml is written in."""
        flat = self.to_dict()
        return {sec: {name: flat[name] for name in names} for sec, names in SECTIONS.items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# every field in exactly one section (tests/test_config.py checks the cover)
SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "data_dir", "download", "n_train", "n_test", "val_fraction", "augment"),
    "model": ("model", "generator_mode", "generator_width", "generator_scale"),
    "attack": ("attack", "variant", "k", "vicinity", "targets", "target_class", "poison_rate", "patch_size", "eps",
               "eps_start", "eps_anneal", "tau", "lnf_eps", "alpha", "beta", "gamma", "mse_reduction",
               "target_reduction", "adaptive_weight", "backdoor_ratio", "warmup_epochs", "gamma_ramp_epochs"),
    "optimisation": ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "generator_lr",
                     "grad_clip", "seed"),
    "runtime": ("checkpoint_every", "deterministic", "device", "precision", "channels_last", "compile",
                "eval_batch_size", "eval_each_epoch"),
    "output": ("out", "name", "progress"),
}
SECTION_OF = {name: sec for sec, names in SECTIONS.items() for name in names}


def flatten_values(values: dict[str, Any]) -> dict[str, Any]:
    """Config values as written by a user or a run folder -> flat field names.

    Accepts flat names (``tau``), dotted ones (``attack.tau``) and section mappings
    (``{"attack": {"tau": 0.1}}``). A field under the wrong section is an error naming the right
    one; ``extra: {eval_each_epoch: false}`` (the free-form dict of configs written before the
    sections) maps to its field."""
    flat: dict[str, Any] = {}

    def put(name: str, value: Any, section: str | None) -> None:
        if section is not None and name in SECTION_OF and SECTION_OF[name] != section:
            raise ConfigError(f"{section}.{name}: {name!r} is in section {SECTION_OF[name]!r}, not {section!r}")
        if name in flat and flat[name] != value:
            raise ConfigError(f"{name}: given twice with different values ({flat[name]!r}, {value!r})")
        flat[name] = value

    for key, value in values.items():
        key = str(key)
        if key == "extra" and isinstance(value, dict):  # configs written before the sections
            for name, v in value.items():
                put(str(name), v, None)
        elif key in SECTIONS and isinstance(value, dict):  # `model` and `attack` are fields too, never mappings
            for name, v in value.items():
                put(str(name), v, key)
        elif "." in key and key.split(".", 1)[0] in SECTIONS:
            section, name = key.split(".", 1)
            put(name, value, section)
        else:
            put(key, value, None)
    return flat
# fields that change where and how a run is shown or stored, never the model it trains
RUN_ONLY_FIELDS = frozenset({"out", "name", "progress", "device", "data_dir", "download", "eval_batch_size", "checkpoint_every"})


def setting_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """The fields (outside RUN_ONLY_FIELDS) where two configs would train different models, as
    ``name: a-value != b-value``; empty when they train the same model. Two dataset specs are the
    same when they name the same local file (``mnist`` under data_dir vs a path to mnist.npz)."""
    da, db = a.to_dict(), b.to_dict()
    diff = [k for k in da if k not in RUN_ONLY_FIELDS and da[k] != db[k]]
    if "dataset" in diff:
        from .data.sources import dataset_file

        file_a, file_b = dataset_file(a.dataset, a.data_dir), dataset_file(b.dataset, b.data_dir)
        if file_a is not None and file_a == file_b:
            diff.remove("dataset")
    return [f"{k}: {da[k]!r} != {db[k]!r}" for k in diff]


def shipped_config(path: str | Path) -> Any:
    """The shipped preset that ``path`` names -- ``demo``, ``demo.yaml`` or ``src/cuba/configs/demo.yaml``
    typed from another folder -- or None: a preset is found from any working folder, and after a
    non-editable install, where src/ does not exist."""
    from importlib import resources

    p = Path(path)
    if p.suffix not in ("", ".yaml") or not (len(p.parts) == 1 or p.parts[-3:-1] == ("cuba", "configs")):
        return None
    shipped = resources.files("cuba") / "configs" / f"{p.stem}.yaml"
    return shipped if shipped.is_file() else None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a dict of config fields; a path that does
    not exist but names a shipped preset (:func:`shipped_config`) reads that preset."""
    p = Path(path)
    source: Any = p if p.is_file() else shipped_config(p)
    if source is None:
        raise ConfigError(f"config file not found: {p}")
    try:
        text = source.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {first_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of fields, got {type(data).__name__}")
    return data


# Fields whose default changed after run folders were written: a config.yaml without the field
# was trained with the old value, so it is read with that value (never as the new default).
LEGACY_DEFAULTS: dict[str, Any] = {"val_fraction": 0.0}


def config_from_run(values: dict[str, Any]) -> TrainConfig:
    """A run folder's stored config.yaml (as a dict) -> TrainConfig, older folders included.

    The data set path is not required to exist: a stored ``../shared/data/mnist.npz`` is relative
    to wherever the run was started, and reading a run's numbers (compare, tables) needs no data.
    Whatever loads the data still fails clearly when it is missing."""
    return make_config({**LEGACY_DEFAULTS, **flatten_values(values)}, check_paths=False)


def parse_variant(value: str) -> tuple[str, int | None]:
    """'fra' -> ('fra', None); 'nra' -> ('nra', None); 'nra-5' / 'nra5' -> ('nra', 5)."""
    m = re.fullmatch(r"(fra|nra)(?:-?(\d+))?", str(value).strip().lower())
    if not m:
        raise ConfigError(f"variant: expected fra, nra or nra-K (e.g. nra-5), got {value!r}")
    return m.group(1), int(m.group(2)) if m.group(2) else None


def make_config(values: dict[str, Any], check_paths: bool = True) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a dict (unknown keys are an error);
    ``check_paths=False`` skips the check that a data set path exists (stored run configs)."""
    values = flatten_values(values)
    unknown = sorted(set(values) - set(FIELDS), key=str)
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(map(repr, unknown))}; known fields: {', '.join(FIELDS)}")
    values = dict(values)
    if "variant" in values and values["variant"] is not None:
        variant, k = parse_variant(values["variant"])
        values["variant"] = variant
        if k is not None:
            values["k"] = k
    cfg = TrainConfig(**{k: v for k, v in values.items() if v is not None or k in ("targets", "out", "name", "n_train", "n_test", "data_dir")})
    validate(cfg, check_paths)
    return cfg


def _type_ok(value: Any, kind: type) -> bool:
    if kind is float:  # finite: an inf epoch count or lr would only fail later, mid-run
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def validate(cfg: TrainConfig, check_paths: bool = True) -> None:
    """Check types and ranges; raise ConfigError naming the first bad field."""
    from .data import DATASET_NAMES  # local: avoid import cycles
    from .data.sources import find_path
    from .models import CLASSIFIERS, GENERATOR_MODES, check_name, is_external
    from .attack import ATTACKS, FIXED_RULE, VICINITIES

    numeric = {
        "epochs": (float, lambda v: v > 0, "> 0"), "batch_size": (int, lambda v: v >= 2, ">= 2"),
        "lr": (float, lambda v: v > 0, "> 0"), "generator_lr": (float, lambda v: v > 0, "> 0"), "grad_clip": (float, lambda v: v > 0, "> 0"),
        "momentum": (float, lambda v: 0 <= v < 1, "in [0, 1)"), "weight_decay": (float, lambda v: v >= 0, ">= 0"),
        "tau": (float, lambda v: v > 0, "> 0"), "lnf_eps": (float, lambda v: v > 0, "> 0"),
        "alpha": (float, lambda v: v >= 0, ">= 0"), "beta": (float, lambda v: v >= 0, ">= 0"),
        "gamma": (float, lambda v: v >= 0, ">= 0"), "adaptive_weight": (float, lambda v: v >= 0, ">= 0"), "eps": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
        "eps_start": (float, lambda v: 0 < v <= 1, "in (0, 1]"), "eps_anneal": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
        "backdoor_ratio": (float, lambda v: 0 < v <= 1, "in (0, 1]"), "warmup_epochs": (float, lambda v: v >= 0, ">= 0"), "gamma_ramp_epochs": (float, lambda v: v >= 0, ">= 0"),
        "k": (int, lambda v: v >= 1, ">= 1"), "seed": (int, lambda v: v >= 0, ">= 0"),
        "checkpoint_every": (float, lambda v: v >= 0, ">= 0"),
        "generator_width": (int, lambda v: v >= 4, ">= 4"), "generator_scale": (int, lambda v: v >= 1, ">= 1"), "target_class": (int, lambda v: v >= 0, ">= 0"),
        "poison_rate": (float, lambda v: 0 < v <= 1, "in (0, 1]"), "patch_size": (int, lambda v: v >= 1, ">= 1"),
        "eval_batch_size": (int, lambda v: v >= 1, ">= 1"),
        "val_fraction": (float, lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
    }
    for name, (kind, ok, allowed) in numeric.items():
        v = getattr(cfg, name)
        if not _type_ok(v, kind) or not ok(v):
            raise ConfigError(f"{name}: must be {'an integer' if kind is int else 'a number'} {allowed}, got {v!r}")
    for name in ("n_train", "n_test"):
        v = getattr(cfg, name)
        if v is not None and (not _type_ok(v, int) or v < 1):
            raise ConfigError(f"{name}: must be a positive integer or unset, got {v!r}")
    choices = {
        "attack": ATTACKS, "vicinity": VICINITIES, "generator_mode": GENERATOR_MODES,
        "mse_reduction": MSE_REDUCTIONS, "target_reduction": TARGET_REDUCTIONS, "precision": PRECISIONS, "optimizer": ("sgd", "adam"),
        "augment": ("auto", "none", "crop", "crop+flip"), "variant": ("fra", "nra"),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.model, str) or (cfg.model not in CLASSIFIERS and not is_external(cfg.model)):
        raise ConfigError(f"model: must be one of {', '.join(CLASSIFIERS)}, torchvision:NAME, timm:NAME or "
                          f"package.module:factory, got {cfg.model!r}")
    if is_external(cfg.model) and check_name(cfg.model):
        raise ConfigError(f"model: {check_name(cfg.model)}")
    if not isinstance(cfg.dataset, str) or not cfg.dataset:
        raise ConfigError(f"dataset: must be one of {', '.join(DATASET_NAMES)} or a path to a .npz/.zip/folder, got {cfg.dataset!r}")
    if check_paths and cfg.dataset not in DATASET_NAMES and find_path(cfg.dataset, cfg.data_dir) is None:
        where = " (as given or under data_dir)" if cfg.data_dir else ""
        raise ConfigError(f"dataset: must be one of {', '.join(DATASET_NAMES)} or an existing .npz/.zip/folder path{where}, got {cfg.dataset!r}")
    if cfg.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(cfg.device)):
        raise ConfigError(f"device: must be {DEVICES}, got {cfg.device!r}")
    for name in ("download", "channels_last", "progress", "deterministic", "compile", "eval_each_epoch"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name}: must be true or false, got {getattr(cfg, name)!r}")
    if cfg.attack in FIXED_RULE and cfg.variant != "fra":
        raise ConfigError(f"variant: attack {cfg.attack!r} has its own target rule; leave variant at fra (got {cfg.variant!r})")
    if cfg.vicinity == "explicit" and cfg.variant == "nra" and cfg.targets is None:
        raise ConfigError("targets: vicinity 'explicit' needs targets (a mapping class -> list of classes, or one list)")
