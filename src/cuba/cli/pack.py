"""``cuba pack``: a finished run as one shareable, checksummed file with a model card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_pack(args: argparse.Namespace) -> int:
    from ..pack import CARD, pack_run, read_pack

    # the folder's whole name: with_suffix would cut "tau=0.1-s0" at its dot, and two runs would share a pack
    out = pack_run(args.run_dir, args.out or Path(args.run_dir).resolve().name + ".cuba")
    members = read_pack(out)  # what a reader will verify: check it once here
    size = out.stat().st_size / 1e6
    print(f"packed {args.run_dir} -> {out} ({len(members) - 1} files, {size:.1f} MB, checksums verified)")
    print(f"model card: unzip -p {out} {CARD}; use it with: cuba evaluate {out} --data-dir DIR, "
          f"cuba defend all {out} --out FOLDER")
    return 0


def add_parsers(sub: Any) -> None:
    k = sub.add_parser("pack", help="write a finished run as one file (weights, config, metrics, predictions, "
                                    "split, model card, checksums) that evaluate and defend accept")
    k.add_argument("run_dir")
    k.add_argument("--out", default=None, help="the pack's file name (default RUN_NAME.cuba in the current folder)")
    k.set_defaults(func=cmd_pack)
