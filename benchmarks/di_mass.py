"""A threshold-free statistic for dispersion inversion, checked on held-out models (issue 18).

Dispersion inversion's pre-registered score is the smallest budget at which a universal
perturbation flips >= 90% of clean validation inputs *and* spreads them with dispersion >= 0.8. On
the first digits models of the `detectors-digits` grid (seeds 0 and 1) the CUBA models flipped most
inputs at 16/255 with dispersion ~0.6 -- dispersive, but under the 0.8 bar -- so the score mostly
ties at "beyond the schedule". This script scores the *whole curve* instead:

    mass = mean over the budget schedule of flip_rate x dispersion   (high = suspicious)

defined after looking at seeds 0-1 only (``--dev-seeds``), and reports the AUROC of CUBA vs clean
models on the other seeds, which played no part in defining it, beside the pre-registered score's.
It reads `<run>/defenses/dispersion-inversion/defense.json` files written with
`--set full_curve=true` (every budget measured), e.g.

    for r in runs/detectors-digits/runs/*; do
      cuba defend dispersion-inversion $r --set full_curve=true --out runs/di-full/$(basename $r)/defenses
    done
    python benchmarks/di_mass.py runs/di-full --dev-seeds 0 1

Prints a JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sklearn.metrics import roc_auc_score

# the statistic lives with the detector (defense.json field ``dispersive_mass``); recomputed here so
# that defense.json files written before the field existed are scored too
from cuba.defenses.dispersion_inversion import dispersive_mass


def collect(root: Path) -> list[dict]:
    out = []
    for f in sorted(root.glob("*/defenses/dispersion-inversion/defense.json")):
        d = json.loads(f.read_text())
        seed = re.search(r"-s(\d+)$", f.parents[2].name)
        out.append({"run": f.parents[2].name, "setting": d["setting"], "seed": int(seed.group(1)) if seed else None,
                    "score": d["score"], "mass": dispersive_mass(d["rows"], len(d["budgets"]))})
    return out


def auroc(models: list[dict], key: str, high_is_suspicious: bool) -> tuple[float | None, int, int]:
    pos = [m[key] for m in models if m["setting"].startswith("cuba") and m[key] is not None]
    neg = [m[key] for m in models if m["setting"] == "clean" and m[key] is not None]
    if not pos or not neg:
        return None, len(pos), len(neg)
    sign = 1.0 if high_is_suspicious else -1.0
    return float(roc_auc_score([1] * len(pos) + [0] * len(neg), [sign * v for v in pos + neg])), len(pos), len(neg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="folder of <run>/defenses/dispersion-inversion/defense.json")
    ap.add_argument("--dev-seeds", type=int, nargs="*", default=[0, 1], help="seeds looked at to define the statistic")
    ap.add_argument("--exclude", nargs="*", default=[], help="run names left out (e.g. the grid's reference models)")
    args = ap.parse_args()
    models = [m for m in collect(args.root) if m["run"] not in set(args.exclude)]
    held = [m for m in models if m["seed"] not in set(args.dev_seeds)]
    dev = [m for m in models if m["seed"] in set(args.dev_seeds)]
    report = {}
    for name, part in (("dev", dev), ("held_out", held)):
        for key, high in (("score", False), ("mass", True)):
            auc, n_pos, n_neg = auroc(part, key, high)
            report[f"{name}_{key}_auroc"] = auc
            report[f"{name}_{key}_n"] = [n_pos, n_neg]
    report["models"] = models
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
