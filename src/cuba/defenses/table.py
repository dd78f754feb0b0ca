"""``cuba defense-table``: the defenses' verdicts on several runs, read back from their defense.json.

Two Markdown tables: (1) defenses as rows, runs as columns, each cell the headline numbers and
the defense's wall time; (2) the removal curves of Fine-pruning and NAD (paper Table III), one
row per prune ratio / epoch, CA / ASR per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runs import read_json
from .base import pct


def load_results(run_dirs: list[Path], root: str = "defenses") -> list[tuple[Path, dict[str, dict[str, Any]]]]:
    """[(run, {defense: defense.json})] for every defense.json found under RUN/defenses/*/, in order."""
    out: list[tuple[Path, dict[str, dict[str, Any]]]] = []
    for r in run_dirs:
        found = {p.parent.name: read_json(p) for p in sorted((Path(r) / root).glob("*/defense.json"))}
        if not found:
            raise FileNotFoundError(f"{r} has no {root}/<defense>/defense.json (run `cuba defend all {r}` first)")
        out.append((Path(r), found))
    return out


def defense_tables(run_dirs: list[Path], names: list[str] | None = None) -> str:
    from . import DEFENSES  # here: the package imports this module's siblings

    res = load_results(run_dirs)
    cols = names or [str(next(iter(d.values())).get("setting", r.name)) for r, d in res]
    lines = ["| defense | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    # registered defenses in registration order, then any other defense.json found (e.g. a removed defense)
    found = list(DEFENSES) + sorted({n for _, d in res for n in d} - set(DEFENSES))
    for name in found:
        cells = []
        for _, d in res:
            f = d.get(name)
            line = DEFENSES[name].headline(f) if f is not None and name in DEFENSES else "see defense.json"
            cells.append("–" if f is None else f"{line} ({f['seconds']:.0f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, key in (("fine-pruning", "prune_ratio"), ("nad", "epoch")):
        per_run = [d.get(name, {}).get("rows", []) for _, d in res]
        steps = sorted({r[key] for rows in per_run for r in rows})
        if not steps:
            continue
        lines += ["", f"{name}: CA / ASR (%) per run", "", f"| {key} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for s in steps:
            cells = []
            for rows in per_run:
                row = next((r for r in rows if r[key] == s), None)
                cells.append("–" if row is None else f"{pct(row['ca'])} / {pct(row['asr'])}")
            lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
