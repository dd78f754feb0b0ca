"""The ``cuba`` command line: train, evaluate, defend, compare, sweep, demo.

Every user error (bad config value, missing data, unknown run folder) ends as one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, FIELDS, load_config_file, make_config

# CLI flags for the main config fields: name -> (type, help)
TRAIN_FLAGS: dict[str, tuple[Any, str]] = {
    "dataset": (str, "digits | mnist | fashion-mnist | cifar10 | cifar100 | gtsrb | path to .npz/.zip/folder"),
    "data_dir": (str, "folder searched first for named data sets (default ./data)"),
    "model": (str, "simplecnn | resnet18 | preactresnet18"),
    "attack": (str, "none (clean baseline) | cuba | untargeted-ce | push-away | targeted | badnets | ubw-p"),
    "variant": (str, "fra | nra | nra-K (e.g. nra-5)"),
    "k": (int, "NRA target-set size"),
    "vicinity": (str, "NRA target sets: index | similar | explicit"),
    "generator_mode": (str, "residual | image"),
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
    "precision": (str, "auto | fp32 | bf16"), "out": (str, "run folder to write"),
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML file of config fields (flags override it)")
    for name, (kind, text) in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)
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


def _config_values(args: argparse.Namespace, base: dict[str, Any] | None = None, use_preset: bool = True) -> dict[str, Any]:
    """Config values from (in rising priority) the data set's preset or ``--config``, ``--set`` and flags."""
    import yaml

    values: dict[str, Any] = dict(base or {})
    if args.config:
        values.update(load_config_file(args.config))
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in FIELDS:
            raise ConfigError(f"--set: unknown config field {key!r}")
        overrides[key] = yaml.safe_load(raw)
    for name in [*TRAIN_FLAGS, "download", "progress", "deterministic", "checkpoint_every"]:
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    if use_preset and not args.config and not base:
        name = preset_for(overrides.get("dataset", FIELDS["dataset"].default))
        if name is not None:
            values.update(preset(name))
            print(f"using the {name} preset (src/cuba/configs/{name}.yaml) for this data set; --config FILE chooses another")
    values.update(overrides)
    return values


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.2f}" if pct else f"{v:.2f}"


def format_metrics_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table of runs: CA / ASR / ASR-C / DS / DS-min in %, D_p, PSNR (dB), SSIM, L-inf."""
    head = f"{'run':<22}{'CA%':>8}{'ASR%':>8}{'ASR-C%':>8}{'DS%':>8}{'DSmin%':>8}{'D_p':>6}{'PSNR':>7}{'SSIM':>6}{'Linf':>6}{'time s':>8}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(
            f"{name:<22}{_fmt(m.get('ca')):>8}{_fmt(m.get('asr')):>8}{_fmt(m.get('asr_c')):>8}{_fmt(m.get('ds')):>8}"
            f"{_fmt(m.get('ds_min')):>8}{_fmt(m.get('d_p'), False):>6}{_fmt(m.get('psnr'), False):>7}"
            f"{_fmt(m.get('ssim'), False):>6}{_fmt(m.get('linf'), False):>6}{_fmt(m.get('train_seconds'), False):>8}"
        )
    return "\n".join(lines)


def ds_scale_line(name: str, m: dict[str, Any]) -> str | None:
    """Where a run's DS sits between collapse and a uniformly random attacker (README, Metrics);
    None for a clean run or an older metrics.json without the keys."""
    if not isinstance(m.get("ds_uniform"), float) or math.isnan(m["ds_uniform"]):
        return None
    return (f"{name}: DS {_fmt(m.get('ds'))} between collapse {_fmt(m.get('ds_floor'))} and uniform-random "
            f"{_fmt(m.get('ds_uniform'))}; {_fmt(m.get('effective_classes'), False)} effective classes per source class")


def cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import run_training

    cfg = make_config(_config_values(args))
    run_dir, metrics = run_training(cfg, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":
        # under torchrun only rank 0 reports; the other ranks leave at once: letting the
        # interpreter tear down a gloo process group after its peer has gone can abort (SIGABRT),
        # which torchrun would report as a failed run although every output is written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    print(format_metrics_table([(cfg.label(), metrics)]))
    scale = ds_scale_line(cfg.label(), metrics)
    if scale:
        print(scale)
    if metrics.get("degenerate"):
        print(f"WARNING: degenerate run, its ASR/DS are not a result: {metrics.get('degenerate_reason')}")
    print(f"run folder: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import evaluate_run

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    m = evaluate_run(run_dir, from_predictions=args.from_predictions, device=args.device, write=args.write)
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "ds_per_class"}, indent=2, default=str))
    else:
        print(format_metrics_table([("recomputed", m), ("stored", m["stored"])]))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .pipeline import draw_figures

    for run_dir in args.run_dirs:
        paths = draw_figures(Path(run_dir), device=args.device)
        print(f"{run_dir}: " + (", ".join(p.name for p in paths) if paths else "a clean run has no figures"))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    md, files = compare(args.runs, out=Path(args.out), name=args.name, by=args.by, source_class=args.source_class, val=args.val)
    print(md)
    print("\nwritten: " + ", ".join(str(f) for f in files))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import parse_value, run_sweep

    base = _config_values(args)
    out = base.pop("out", None)
    if not out:
        raise ConfigError("sweep: --out FOLDER is required (it holds one run folder per value and seed)")
    seeds = args.seeds if args.seeds is not None else [int(base.get("seed", 0))]
    md, files = run_sweep(base, args.field.replace("-", "_"), [parse_value(v) for v in args.values], seeds, Path(out),
                          within=args.within)
    print(md)
    print("\nwritten: " + ", ".join(str(f) for f in files))
    return 0


def preset(name: str) -> dict[str, Any]:
    """A shipped config preset (src/cuba/configs/NAME.yaml)."""
    import yaml

    path = resources.files("cuba") / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r}")
    return yaml.safe_load(path.read_text())


def cmd_demo(args: argparse.Namespace) -> int:
    """A real CUBA run on the bundled digits data: clean baseline, then CUBA FRA, side by side."""
    from .pipeline import run_training

    out = Path(args.out or "runs/demo")
    base = preset("demo")
    rows = []
    for label, overrides in (("clean", {"attack": "none"}), ("cuba-fra", {"attack": "cuba", "variant": "fra"})):
        cfg = make_config({**base, **overrides, "out": str(out / label), "progress": not args.no_progress})
        print(f"== {label}: {cfg.dataset} / {cfg.model}, {cfg.epochs:g} epochs", flush=True)
        _, m = run_training(cfg, overwrite=True)  # a demo always trains
        rows.append((label, m))
    print()
    print(format_metrics_table(rows))
    for line in filter(None, (ds_scale_line(label, m) for label, m in rows)):
        print(line)
    print(f"\nrun folders: {out}/clean, {out}/cuba-fra (metrics.json, predictions.npz, figures/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cuba", description="Controlled untargeted backdoor attacks (CUBA) and their evaluation.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a clean or backdoored model and write a run folder")
    _add_train_flags(t)
    t.add_argument("--overwrite", action="store_true", help="retrain from scratch even if --out holds a finished or interrupted run")
    t.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms (bit-exact resume on CPU)")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=float, default=None, help="epochs between checkpoints (0: none)")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="recompute a saved run's metrics")
    e.add_argument("run_dir")
    e.add_argument("--from-predictions", action="store_true", help="use predictions.npz only (no data, no weights)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--write", action="store_true", help="store the recomputed metrics in metrics.json and predictions.npz")
    e.set_defaults(func=cmd_evaluate)
    g = sub.add_parser("figures", help="(re)draw run folders' figures (triggers, confidences, histograms) from their weights")
    g.add_argument("run_dirs", nargs="+")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_figures)
    from . import cli_audit, cli_grid  # here, not at the top: they import helpers from this module

    cli_audit.add_parsers(sub)
    cli_grid.add_parsers(sub)
    c = sub.add_parser("compare", help="one table (Markdown + CSV) of runs, seeds folded into mean ± std")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding run folders")
    c.add_argument("--out", default=".", help="folder for NAME.md / NAME.csv (default: current folder)")
    c.add_argument("--name", default="compare", help="file name stem (default compare)")
    c.add_argument("--by", default=None, metavar="FIELD", help="config field to sort by, tabulate and plot against (NAME.png)")
    c.add_argument("--source-class", type=int, default=None, metavar="C",
                   help="also draw the backdoor prediction histogram of class C for each setting (paper Fig. 8)")
    c.add_argument("--val", action="store_true", help="also show the validation split's CA / ASR / DS beside the test ones")
    c.set_defaults(func=cmd_compare)
    w = sub.add_parser("sweep", help="train over values of one config field x seeds; table + plot of DS/ASR/CA")
    w.add_argument("field", help="config field to sweep, e.g. tau or gamma")
    w.add_argument("values", nargs="+", help="values (YAML), e.g. 0.01 0.1 1")
    w.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per value (default: --seed, or 0)")
    w.add_argument("--within", type=float, default=None, metavar="POINTS",
                   help="pick the first value as listed whose val DS is within POINTS of the best "
                        "(for a field that costs stealth, e.g. eps listed smallest first); default: the top val DS")
    _add_train_flags(w)
    w.set_defaults(func=cmd_sweep)
    d = sub.add_parser("demo", help="clean vs CUBA FRA on the bundled digits data, in a few minutes on CPU")
    d.add_argument("--out", default=None, help="folder for the two run folders (default runs/demo)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .attack import TargetSetError
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, TargetSetError, FileNotFoundError) as e:
        print(f"cuba: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cuba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
