"""The ``cuba`` command line, one module per group of commands:

    train.py      train, demo
    evaluate.py   evaluate, figures
    audit.py      defend, defense-table, import-model
    pack.py       pack
    reproduce.py  reproduce, bench
    compare.py    compare, sweep
    common.py     the training flags, the one --set parser, presets, the metrics table

Every user error (bad config value, missing data, unknown run folder) ends as one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..config import ConfigError
from .common import DATASET_PRESETS, ds_scale_line, format_metrics_table, preset, preset_for

__all__ = ["DATASET_PRESETS", "build_parser", "ds_scale_line", "format_metrics_table", "main", "preset", "preset_for"]


def build_parser() -> argparse.ArgumentParser:
    from . import audit, compare, evaluate, pack, reproduce, train

    p = argparse.ArgumentParser(prog="cuba", description="Controlled untargeted backdoor attacks (CUBA) and their evaluation.")
    from .. import __version__

    p.add_argument("--version", action="version", version=f"cuba {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, audit, pack, reproduce, compare):
        module.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from ..attack import TargetSetError
    from ..data import DataError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, TargetSetError, FileNotFoundError) as e:
        print(f"cuba: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a file where a folder must be, or the reverse; no permission
        if not e.filename:  # not about a path the user gave: a real failure, keep its traceback
            raise
        print(f"cuba: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except yaml.YAMLError as e:  # a grid file or a sweep's values that are not YAML
        print(f"cuba: error: not valid YAML: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cuba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
