"""Neural Cleanse: all classes in one batched optimisation vs class by class, on one trained run.

    python benchmarks/nc_batched.py RUN_DIR [--epochs 100] [--early-stop 10]

Three runs of the same reverse-engineering (the defense's defaults: up to 100 epochs, NC's
per-class early stop after 10 epochs without a 1% improvement):

* ``conventional``: class by class in fp32 with NCHW tensors, as NC's original code runs it;
* ``class_by_class``: class by class with our engine's rules (bf16 autocast where native,
  channels_last);
* ``batched``: all classes in one pass per step (the default of ``cuba defend neural-cleanse``).

Prints each wall time, the speed-ups, the verdicts (flagged classes, anomaly index) and the
largest relative difference of the per-class mask norms from the conventional run, as one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cuba.defenses import load_attack_run
from cuba.defenses.neural_cleanse import NeuralCleanse, anomaly_indices

VARIANTS = {"conventional": (False, "fp32", False), "class_by_class": (False, "auto", True), "batched": (True, "auto", True)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--early-stop", type=int, default=10)
    args = p.parse_args()
    run = load_attack_run(args.run_dir)
    out: dict = {"run": args.run_dir}
    norms = {}
    for key, (batched, precision, channels_last) in VARIANTS.items():
        t0 = time.perf_counter()
        res = NeuralCleanse(epochs=args.epochs, early_stop=args.early_stop, batched=batched, precision=precision,
                            channels_last=channels_last).reverse(run)
        norms[key] = res["norm"].numpy()
        _, index, flagged = anomaly_indices(norms[key])
        out[key] = {"seconds": round(time.perf_counter() - t0, 1), "precision": precision, "channels_last": channels_last, "anomaly_index": round(index, 3),
                    "flagged": flagged, "l1_norms": [round(float(v), 2) for v in norms[key]],
                    "max_relative_norm_difference": round(float(np.max(np.abs(norms[key] - norms["conventional"]) / norms["conventional"])), 4)}
    out["speedup_over_conventional"] = round(out["conventional"]["seconds"] / out["batched"]["seconds"], 2)
    out["speedup_from_batching_alone"] = round(out["class_by_class"]["seconds"] / out["batched"]["seconds"], 2)
    out["same_flagged"] = out["batched"]["flagged"] == out["class_by_class"]["flagged"] == out["conventional"]["flagged"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
