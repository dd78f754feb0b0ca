"""``cuba train`` and ``cuba demo``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..config import make_config
from .common import add_train_flags, config_values, ds_scale_line, format_metrics_table, preset


def cmd_train(args: argparse.Namespace) -> int:
    from ..pipeline import run_training

    cfg = make_config(config_values(args))
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


def cmd_demo(args: argparse.Namespace) -> int:
    """A real CUBA run on the bundled digits data: clean baseline, then CUBA FRA, side by side."""
    from ..pipeline import run_training

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


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("train", help="train a clean or backdoored model and write a run folder")
    add_train_flags(t)
    t.add_argument("--overwrite", action="store_true", help="retrain from scratch even if --out holds a finished or interrupted run")
    t.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms (bit-exact resume on CPU)")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=float, default=None, help="epochs between checkpoints (0: none)")
    t.set_defaults(func=cmd_train)
    d = sub.add_parser("demo", help="clean vs CUBA FRA on the bundled digits data, in a few minutes on CPU")
    d.add_argument("--out", default=None, help="folder for the two run folders (default runs/demo)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

