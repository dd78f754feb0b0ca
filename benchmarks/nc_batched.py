"""Neural Cleanse: all classes in one batched optimisation vs class by class, on one trained run.

    python benchmarks/nc_batched.py RUN_DIR [--epochs 100] [--early-stop 10]

Both use the defense's defaults (up to 100 epochs, NC's early stop after 10 epochs without a 1%
improvement). Class by class, each class stops on its own, as in NC's original code; batched, the
pass stops once every class has stalled -- so the two can differ by a few epochs per class, and
the norms are compared with a tolerance rather than for equality. Prints the wall time of each,
the speed-up, both verdicts (flagged classes, anomaly index) and the largest relative difference
between their per-class mask norms, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cuba.defenses import load_attack_run
from cuba.defenses.neural_cleanse import NeuralCleanse, anomaly_indices


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--early-stop", type=int, default=10)
    args = p.parse_args()
    run = load_attack_run(args.run_dir)
    out = {"run": args.run_dir}
    norms = {}
    for batched in (True, False):
        t0 = time.perf_counter()
        res = NeuralCleanse(epochs=args.epochs, early_stop=args.early_stop, batched=batched).reverse(run)
        key = "batched" if batched else "class_by_class"
        norms[key] = res["norm"].numpy()
        _, index, flagged = anomaly_indices(norms[key])
        out[key] = {"seconds": round(time.perf_counter() - t0, 1), "anomaly_index": round(index, 3), "flagged": flagged,
                    "l1_norms": [round(float(v), 2) for v in norms[key]]}
    out["speedup"] = round(out["class_by_class"]["seconds"] / out["batched"]["seconds"], 2)
    out["max_relative_norm_difference"] = round(float(np.max(np.abs(norms["batched"] - norms["class_by_class"]) / norms["class_by_class"])), 4)
    out["same_flagged"] = out["batched"]["flagged"] == out["class_by_class"]["flagged"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
