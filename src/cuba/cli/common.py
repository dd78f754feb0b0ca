"""What the commands share: the training flags, the one ``--set`` parser, the data-set presets,
and the plain-text metrics table."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from ..config import FIELDS, ConfigError, flatten_values, load_config_file, parse_variant, shipped_config
from ..formatting import first_line, number, pct

# CLI flags for the main config fields: name -> (type, help)
TRAIN_FLAGS: dict[str, tuple[Any, str]] = {
    "dataset": (str, None),
    "data_dir": (str, "folder searched first for named data sets (default ./data)"),
    "model": (str, None),
    "attack": (str, None),
    "variant": (str, "fra | nra | nra-K (e.g. nra-5)"),
    "k": (int, "NRA target-set size"),
    "vicinity": (str, None),
    "generator_mode": (str, None),
    "eps": (float, "final L-inf bound of a residual trigger"),
    "tau": (float, "LNF temperature"),
    "target_class": (int, "target class of the all-to-one controls (targeted, badnets)"),
    "poison_rate": (float, "share of eligible training images poisoned (badnets, ubw-p)"),
    "alpha": (float, "MSE weight"), "beta": (float, "clean CE weight"), "gamma": (float, "backdoor loss weight"),
    "epochs": (float, "training epochs (fractions allowed)"),
    "batch_size": (int, "batch size"), "lr": (float, "classifier learning rate"),
    "n_train": (int, "random training subset size (drawn after the validation split)"), "n_test": (int, "random test subset size"),
    "val_fraction": (float, "stratified share of the full training set held out for validation (default 0.1; 0: none)"),
    "seed": (int, "random seed"), "device": (str, "auto | cpu | cuda | cuda:N"),
    "precision": (str, None), "out": (str, "run folder to write"),
}


def registry_help() -> dict[str, str]:
    """The --help text of the flags whose choices live in a registry."""
    from ..attack import ATTACKS, VICINITIES
    from ..config import PRECISIONS
    from ..data import DATASET_NAMES
    from ..models import CLASSIFIERS, GENERATOR_MODES

    return {"dataset": " | ".join(DATASET_NAMES) + " | path to .npz/.zip/folder", "model": " | ".join(CLASSIFIERS) + " | torchvision:NAME | timm:NAME | package.module:factory",
            "attack": " | ".join(ATTACKS) + " (none: the clean baseline)", "vicinity": "NRA target sets: " + " | ".join(VICINITIES),
            "generator_mode": " | ".join(GENERATOR_MODES), "precision": " | ".join(PRECISIONS)}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML file of config fields (flags override it)")
    choices = registry_help()
    for name, (kind, text) in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text or choices[name])
    p.add_argument("--download", action="store_true", default=None, help="allow torchvision to download the data set")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other config field (YAML value), e.g. --set eps_start=0.3; repeatable")


# The preset a named data set gets when no --config is given (issue: the bare dataclass defaults,
# 10 epochs with no warm-up and no gamma ramp, collapse clean accuracy on digits). A path whose
# file name is a known set's (mnist.npz, gtsrb.npz) gets that set's preset too.
DATASET_PRESETS = {"digits": "demo", "mnist": "mnist", "fashion-mnist": "mnist", "gtsrb": "gtsrb",
                   "cifar10": "cifar10", "cifar100": "cifar100"}


def preset_for(dataset: Any) -> str | None:
    """The packaged preset name for a data set spec, or None (an unknown path keeps the defaults)."""
    key = str(dataset).strip().lower().replace("_", "-")
    return DATASET_PRESETS.get(key) or DATASET_PRESETS.get(Path(key).stem)


def preset(name: str) -> dict[str, Any]:
    """A shipped config preset (src/cuba/configs/NAME.yaml)."""
    import yaml

    path = shipped_config(name)
    if path is None:
        raise ConfigError(f"no preset named {name!r}")
    return flatten_values(yaml.safe_load(path.read_text()) or {})


def parse_set(items: Sequence[str], what: str = "FIELD", sections: bool = True) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> {key: value}: the value read as YAML ('0.1' -> 0.1, 'true' ->
    True), dashes in the key read as underscores, and (``sections``) a config key given as
    ``section.field`` resolved to its flat field name, so it overrides a preset's flat value. The
    one parser behind train, sweep, defend and reproduce."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects {what}=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({first_line(e)})") from None
    return flatten_values(out) if sections else out


def config_values(args: argparse.Namespace, base: dict[str, Any] | None = None, use_preset: bool = True) -> dict[str, Any]:
    """Config values from (in rising priority) the data set's preset or ``--config``, ``--set`` and flags."""
    values: dict[str, Any] = dict(base or {})
    if args.config:
        values.update(flatten_values(load_config_file(args.config)))
    overrides = parse_set(args.set)
    unknown = [k for k in overrides if k not in FIELDS]
    if unknown:
        raise ConfigError(f"--set: unknown config field {unknown[0]!r}")
    for name in [*TRAIN_FLAGS, "download", "progress", "deterministic", "checkpoint_every"]:
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    _check_k_against_variant(overrides)
    if use_preset and not args.config and not base:
        name = preset_for(overrides.get("dataset", FIELDS["dataset"].default))
        if name is not None:
            values.update(preset(name))
            print(f"using the {name} preset (src/cuba/configs/{name}.yaml; --config {name}) for this data set; "
                  "--config FILE chooses another")
    values.update(overrides)
    return values


def _check_k_against_variant(overrides: dict[str, Any]) -> None:
    """The user's own k and variant must agree: ``--variant nra-2 --k 3`` would otherwise train NRA-2
    and drop the 3 without a word (``nra-K`` sets k), and FRA has no target-set size at all."""
    if overrides.get("k") is None or overrides.get("variant") is None:
        return
    variant, k = parse_variant(overrides["variant"])
    if variant == "fra":
        raise ConfigError(f"k: only NRA has a target-set size; variant fra was given with k {overrides['k']}")
    if k is not None and k != overrides["k"]:
        raise ConfigError(f"k: given twice with different values ({overrides['k']}, and {k} from variant "
                          f"{overrides['variant']!r})")


def format_metrics_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table of runs: CA / ASR / ASR-C / DS / DS-min in %, D_p, PSNR (dB), SSIM, L-inf."""
    head = f"{'run':<22}{'CA%':>8}{'ASR%':>8}{'ASR-C%':>8}{'DS%':>8}{'DSmin%':>8}{'D_p':>6}{'PSNR':>7}{'SSIM':>6}{'Linf':>6}{'time s':>8}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(
            f"{name:<22}{pct(m.get('ca')):>8}{pct(m.get('asr')):>8}{pct(m.get('asr_c')):>8}{pct(m.get('ds')):>8}"
            f"{pct(m.get('ds_min')):>8}{number(m.get('d_p')):>6}{number(m.get('psnr')):>7}"
            f"{number(m.get('ssim')):>6}{number(m.get('linf')):>6}{number(m.get('train_seconds')):>8}"
        )
    return "\n".join(lines)


def ds_scale_line(name: str, m: dict[str, Any]) -> str | None:
    """Where a run's DS sits between collapse and a uniformly random attacker (docs/reference/runs.md, Metrics);
    None for a clean run or an older metrics.json without the keys."""
    if not isinstance(m.get("ds_uniform"), float) or math.isnan(m["ds_uniform"]):
        return None
    return (f"{name}: DS {pct(m.get('ds'))} between collapse {pct(m.get('ds_floor'))} and uniform-random "
            f"{pct(m.get('ds_uniform'))}; {number(m.get('effective_classes'))} effective classes per source class")

