"""``cuba reproduce`` and ``cuba bench``: the paper grid and the speed benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, flatten_values
from .common import parse_set


def _stop_on_term() -> Any:
    """Make SIGTERM (``timeout``, SLURM's notice before a kill) stop the grid the way Ctrl-C does,
    so the tables of the finished cells are still written; returns the handler it replaced.
    Why not rely on SIGINT alone: a process started in the background of a shell without job
    control inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding caller): keep the default
        return None


def _prepared(grid: str, args: argparse.Namespace) -> dict[str, Any]:
    """The grid's YAML with the command line's --download / --set / --data-dir applied."""
    from ..reproduce import load_grid

    raw = load_grid(grid)
    if args.download:
        raw.setdefault("set", {})["download"] = True
    if args.set:
        raw["set"] = {**flatten_values(raw.get("set") or {}), **parse_set(args.set)}
    if args.data_dir:
        raw["data_dir"] = args.data_dir
    return raw


def _plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid and its companions (``also``: each into OUT/<its name>), every cell of all of them
    expanded and checked before the first trains; ``--only`` keeps the matching cells of each."""
    from fnmatch import fnmatchcase

    from ..reproduce import expand
    from ..reproduce.grid import RESERVED_FOLDERS, companions
    from ..reproduce.tables import blocked_settings
    from ..runs import safe_name

    raw = _prepared(args.grid, args)
    parts = [(args.grid, raw, Path(args.out))]
    for name in companions(raw, args.grid):
        sub = _prepared(name, args)
        if sub.get("also"):
            raise ConfigError(f"grid {name}: a companion grid (named in also: of {args.grid}) cannot have companions")
        folder = safe_name(str(sub.get("name") or Path(name).stem))
        if folder in RESERVED_FOLDERS or folder in {p[2].name for p in parts[1:]}:
            raise ConfigError(f"grid {name}: its folder OUT/{folder} is taken (by the grid's own {folder}/ or another "
                              "companion); give it another name: in its file")
        parts.append((name, sub, Path(args.out) / folder))
    plan = []
    for grid, g, out in parts:
        cells = expand(g)
        if not cells:  # e.g. attacks given per data set for data sets the grid does not list
            raise ConfigError(f"grid {grid}: expands to no cell; check datasets, attacks and variants (see --dry-run)")
        # the whole grid's blocked settings: table2 covers all of --out, not only this call's --only
        plan.append({"grid": grid, "raw": g, "out": out, "blocked": blocked_settings(cells),
                     "references": [c.name for c in cells if c.reference],
                     "cells": [c for c in cells if not args.only or any(fnmatchcase(c.name, p) for p in args.only)]})
    if not any(p["cells"] for p in plan):  # e.g. --only 'mnist-*': one part of a grid now, the rest later
        raise ConfigError(f"--only {' '.join(args.only)}: no cell of grid {args.grid}"
                          + (" or its companions" if len(plan) > 1 else "") + " matches (see --dry-run)")
    return [p for p in plan if p["cells"]]


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs: must be a positive number of processes, got {args.jobs}")
    plan = _plan(args)
    if args.dry_run:
        from ..reproduce import cell_state

        for p in plan:
            states = [cell_state(p["out"], c) for c in p["cells"]]
            if len(plan) > 1:
                print(f"grid {p['grid']} -> {p['out']}")
            for c, state in zip(p["cells"], states):
                print(f"{c.name}  defenses: {', '.join(c.defenses) or '-'}  [{state}]")
            n_blocked = sum(s.startswith("blocked") for s in states)
            print(f"{len(p['cells'])} cells" + (f", {n_blocked} blocked (no local data)" if n_blocked else ""))
        return 0
    for p in plan:
        main_grid = p["out"] == Path(args.out)  # --only may leave the main grid out of the plan
        p["companions"] = [q["out"].name for q in plan if q["out"] != Path(args.out)] if main_grid else []
        code = _run_part(p, args)
        if code:  # interrupted: the companions wait for the same command to be run again
            return code
    return 0


def _run_part(p: dict[str, Any], args: argparse.Namespace) -> int:
    """Run one grid's cells into its folder, then write its tables and report.html (also when
    interrupted, from the finished cells); 130 when interrupted, else 0."""
    import signal

    from ..reproduce import run_grid, write_report, write_table2

    out = p["out"]
    slurm = {k: v for k, v in (("slurm_partition", args.partition), ("gpus_per_node", args.gpus),
                               ("timeout_min", args.timeout_min), ("cpus_per_task", args.cpus)) if v is not None}
    previous = _stop_on_term()
    interrupted = False
    try:
        run_grid(p["cells"], out, args.executor, args.jobs, slurm, wait=not args.no_wait)
    except KeyboardInterrupt:
        # a time budget ran out (or Ctrl-C): the running cell keeps its last checkpoint; write what
        # is finished so every call leaves a current table2 / report.html, then say how to go on
        interrupted = True
        print("\ncuba reproduce: interrupted; the running cell resumes from its last checkpoint when the same "
              "command is run again (and then runs any companion grid still to come). Tables of the finished "
              "cells follow.", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    files = write_table2(out, p["blocked"])
    print("\n" + files[0].read_text())
    report = write_report(out, title=f"cuba reproduce {p['grid']}", blocked=p["blocked"], references=p["references"],
                          compare=p["raw"].get("compare"), companions=p["companions"])
    extra = [f for f in (out / "table3.md", out / "defenses.md") if f.is_file()]
    print("written: " + ", ".join(str(f) for f in [*files, *extra, report]))
    return 130 if interrupted else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import CASES, run_bench

    if args.repeats is not None and args.repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1, got {args.repeats}")
    res = run_bench(quick=args.quick, device=args.device, repeats=args.repeats)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"device {res['device']}, bf16 {res['bf16']}, {res['threads']} threads, batch {res['batch_size']}, "
          f"median of {res['repeats']} interleaved measurements, each after 2 warm-up steps")
    print(f"{'case':<14}{'clean img/s':>12}{'CUBA img/s':>12}{'ref img/s':>11}{'CUBA/clean step':>17}{'half-res':>10}{'cheap step x':>14}{'engine/ref':>12}{'peak MB':>9}")
    for name, *_ in CASES:
        r = res[name]
        print(f"{name:<14}{r['engine_clean_img_s']:>12.0f}{r['engine_cuba_img_s']:>12.0f}{r['reference_img_s']:>11.0f}"
              f"{r['cuba_step_over_clean_step']:>17.2f}{r['cuba_half_res_step_over_clean_step']:>10.2f}{r['cuba_step_speedup']:>14.2f}{r['engine_over_reference']:>12.2f}{r['peak_memory_mb']:>9.0f}")
    return 0


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("reproduce", help="run a grid (data sets x models x attacks x seeds + defenses); write table2")
    from ..reproduce.grid import shipped_grids

    r.add_argument("grid", help=f"a grid YAML file, or a shipped grid: {', '.join(shipped_grids())}")
    r.add_argument("--out", required=True, help="folder for runs/<cell>/ and the tables (a companion grid of also: in OUT/<its name>)")
    r.add_argument("--data-dir", default=None, help="folder of the named data sets")
    r.add_argument("--download", action="store_true",
                   help="let torchvision download named data sets that have no local copy (else their cells are blocked)")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a config field for every cell")
    r.add_argument("--executor", default="sequential", choices=["sequential", "local", "slurm"])
    r.add_argument("--jobs", type=int, default=2, help="parallel processes with --executor local")
    r.add_argument("--partition", default=None, help="SLURM partition")
    r.add_argument("--gpus", type=int, default=None, help="GPUs per SLURM job")
    r.add_argument("--cpus", type=int, default=None, help="CPUs per SLURM job")
    r.add_argument("--timeout-min", type=int, default=None, help="SLURM time limit per cell, minutes")
    r.add_argument("--no-wait", action="store_true", help="submit to SLURM and return (re-run later to aggregate)")
    r.add_argument("--dry-run", action="store_true", help="list the cells (done or to run) and exit")
    r.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="run only the cells whose name matches (repeatable), e.g. 'mnist-*'")
    r.set_defaults(func=cmd_reproduce)
    b = sub.add_parser("bench", help="engine vs conventional loop, CUBA step vs clean step (images/s, memory)")
    b.add_argument("--quick", action="store_true", help="few steps: under 2 minutes on 2 CPU cores")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--device", default="auto")
    b.add_argument("--repeats", type=int, default=None, help="measurements per number, median reported (default 3; 1 with --quick)")
    b.set_defaults(func=cmd_bench)
