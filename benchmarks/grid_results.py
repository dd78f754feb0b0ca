"""Keep a long grid's finished results across machines: save its result files (no weights), restore them.

Why: the detector matrix (`cuba reproduce detectors`) is about a day of one CPU core, longer than a
working session, and a session's scratch disk does not always survive to the next one. A cell is
*done* for `cuba reproduce` when its status.json says finished and every defense has a
defense.json (cuba.reproduce.runner), and the tables, defenses.md and report.html read only those
JSON/YAML files -- never the weights. So the small result files of the done cells are all a later
session needs to skip them, and they are also the provenance of the numbers in BENCHMARKS.md.

    python benchmarks/grid_results.py save GRID OUT DEST      # done cells of OUT -> DEST (overwrites)
    python benchmarks/grid_results.py restore DEST OUT        # DEST -> OUT, never over an existing file

A grid's companions (``also``, run by the same `cuba reproduce` into OUT/<name>) are saved with it into
DEST/<name> and restored from there.

Saved per cell: config.yaml, status.json, metrics.json, history.json and defenses/*/defense.json.
Not saved: weights (*.safetensors), figures, predictions (re-made by re-running a cell). Prints one
JSON object: the cells saved or restored.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cuba.reproduce import expand, is_done, load_grid
from cuba.reproduce.grid import companions
from cuba.reproduce.runner import cell_dir
from cuba.runs import safe_name

KEEP = ("config.yaml", "status.json", "metrics.json", "history.json")


def result_files(run: Path) -> list[Path]:
    """The files of one run folder that the tables read (relative paths)."""
    files = [Path(name) for name in KEEP if (run / name).is_file()]
    files += sorted(p.relative_to(run) for p in run.glob("defenses/*/defense.json"))
    return files


def save(grid: str, out: Path, dest: Path) -> list[str]:
    """Copy the result files of every done cell of ``grid`` under ``out`` to ``dest``, and those of its
    companion grids (``also``: OUT/<name>) to DEST/<name>; a companion's cells are named <name>/<cell>."""
    raw = load_grid(grid)
    saved = []
    for name in companions(raw, grid):
        folder = safe_name(str(load_grid(name).get("name") or Path(name).stem))
        saved += [f"{folder}/{c}" for c in save(name, out / folder, dest / folder)]
    for cell in expand(raw):
        if not is_done(out, cell):
            continue
        src, dst = cell_dir(out, cell), cell_dir(dest, cell)
        if dst.exists():
            shutil.rmtree(dst)
        for rel in result_files(src):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
        saved.append(cell.name)
    return saved


def restore(dest: Path, out: Path) -> list[str]:
    """Copy saved cells back into ``out`` (a companion grid's, saved in DEST/<name>, into OUT/<name>);
    a file already there is kept (a newer run wins)."""
    restored = []
    for sub in sorted(p for p in dest.iterdir() if p.is_dir() and p.name != "runs" and (p / "runs").is_dir()):
        restored += [f"{sub.name}/{c}" for c in restore(sub, out / sub.name)]
    for src in sorted((dest / "runs").glob("*/")):
        for rel in result_files(src):
            target = out / "runs" / src.name / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, target)
        restored.append(src.name)
    return restored


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("grid")
    s.add_argument("out", type=Path)
    s.add_argument("dest", type=Path)
    r = sub.add_parser("restore")
    r.add_argument("dest", type=Path)
    r.add_argument("out", type=Path)
    a = p.parse_args()
    if a.cmd == "save":
        print(json.dumps({"saved": save(a.grid, a.out, a.dest)}))
    else:
        if not (a.dest / "runs").is_dir():
            p.error(f"{a.dest}: no runs/ folder to restore from")
        print(json.dumps({"restored": restore(a.dest, a.out)}))


if __name__ == "__main__":
    main()
