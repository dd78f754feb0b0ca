"""``cuba evaluate`` and ``cuba figures``: a saved run's numbers and pictures, recomputed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import format_metrics_table


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..pipeline import evaluate_run

    m = evaluate_run(Path(args.run_dir), from_predictions=args.from_predictions, device=args.device, write=args.write,
                     data_dir=args.data_dir)
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "ds_per_class"}, indent=2, default=str))
    else:
        print(format_metrics_table([("recomputed", m), ("stored", m["stored"])]))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from ..pipeline import draw_figures

    for run_dir in args.run_dirs:
        paths = draw_figures(Path(run_dir), device=args.device, data_dir=args.data_dir)
        print(f"{run_dir}: " + (", ".join(p.name for p in paths) if paths else "a clean run has no figures"))
    return 0


def add_parsers(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="recompute a saved run's metrics")
    e.add_argument("run_dir", help="a run folder, or a pack made by cuba pack")
    e.add_argument("--data-dir", default=None, help="folder holding the run's data set (for a run or pack made elsewhere)")
    e.add_argument("--from-predictions", action="store_true", help="use predictions.npz only (no data, no weights)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--write", action="store_true", help="store the recomputed metrics in metrics.json and predictions.npz")
    e.set_defaults(func=cmd_evaluate)
    g = sub.add_parser("figures", help="(re)draw run folders' figures (triggers, confidences, histograms) from their weights")
    g.add_argument("run_dirs", nargs="+")
    g.add_argument("--data-dir", default=None, help="folder holding the runs' data set (for runs made elsewhere)")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_figures)

