"""``cuba defense-table``: the defenses' verdicts on several runs, read back from their defense.json.

Two Markdown tables: (1) defenses as rows, runs as columns, each cell the headline numbers and
the defense's wall time; (2) the removal curves of Fine-pruning and NAD (paper Table III), one
row per prune ratio / epoch, CA / ASR per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runs import read_json

ORDER = ("strip", "neural-cleanse", "sentinet", "fine-pruning", "nad")


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def headline(name: str, f: dict[str, Any]) -> str:
    """The numbers a reader needs from one defense.json, in one cell."""
    if name == "strip":
        high = f" (high-entropy AUROC {f['auroc_high_entropy']:.3f})" if "auroc_high_entropy" in f else ""
        return f"AUROC {f['auroc']:.3f}, FAR@FRR1% {f['far_at_frr_1pct']:.3f}{high}"
    if name == "sentinet":
        return f"AUROC {f['auroc']:.3f}, TPR@FPR5% {f['tpr_at_fpr_5pct']:.3f}"
    if name == "neural-cleanse":
        flagged = ",".join(map(str, f["flagged_classes"])) or "none"
        return f"index {f['anomaly_index']:.2f}, flagged {flagged}"
    rows = f["rows"]
    key = "prune_ratio" if name == "fine-pruning" else "epoch"
    first, last = rows[0], rows[-1]
    return f"{key} {first[key]:g}: {_pct(first['ca'])}/{_pct(first['asr'])} → {last[key]:g}: {_pct(last['ca'])}/{_pct(last['asr'])} (CA/ASR)"


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
    res = load_results(run_dirs)
    cols = names or [str(next(iter(d.values())).get("setting", r.name)) for r, d in res]
    lines = ["| defense | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in ORDER:
        cells = []
        for _, d in res:
            f = d.get(name)
            cells.append("–" if f is None else f"{headline(name, f)} ({f['seconds']:.0f} s)")
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
                cells.append("–" if row is None else f"{_pct(row['ca'])} / {_pct(row['asr'])}")
            lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
