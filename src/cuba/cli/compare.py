"""``cuba compare`` and ``cuba sweep``: runs side by side, and one field over values x seeds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .common import add_train_flags, config_values


def cmd_compare(args: argparse.Namespace) -> int:
    from ..compare import compare

    if Path(args.name).name != args.name or args.name in ("", ".", ".."):
        raise ConfigError(f"--name: a file name stem inside --out, not a path, got {args.name!r}")
    md, files = compare(args.runs, out=Path(args.out), name=args.name, by=args.by, source_class=args.source_class, val=args.val)
    print(md)
    print("\nwritten: " + ", ".join(str(f) for f in files))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..sweep import parse_value, run_sweep

    base = config_values(args)
    out = base.pop("out", None)
    if not out:
        raise ConfigError("sweep: --out FOLDER is required (it holds one run folder per value and seed)")
    seeds = args.seeds if args.seeds is not None else [int(base.get("seed", 0))]
    md, files = run_sweep(base, args.field.replace("-", "_"), [parse_value(v) for v in args.values], seeds, Path(out),
                          within=args.within)
    print(md)
    print("\nwritten: " + ", ".join(str(f) for f in files))
    return 0


def add_parsers(sub: Any) -> None:
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
    add_train_flags(w)
    w.set_defaults(func=cmd_sweep)

