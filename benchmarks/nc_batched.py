"""Neural Cleanse: all classes in one batched optimisation vs class by class, on one trained run.

    python benchmarks/nc_batched.py RUN_DIR [--epochs 100] [--early-stop 10]
    python benchmarks/nc_batched.py RUN_DIR --scaling [--epochs 3]

Three runs of the same reverse-engineering (the defense's defaults: up to 100 epochs, NC's
per-class early stop after 10 epochs without a 1% improvement):

* ``conventional``: class by class in fp32 with NCHW tensors, as NC's original code runs it;
* ``class_by_class``: class by class with our engine's rules (bf16 autocast where native,
  channels_last);
* ``batched``: all classes in one pass per step (the default of ``cuba defend neural-cleanse``).

Prints each wall time, the speed-ups, the verdicts (flagged classes, anomaly index) and the
largest relative difference of the per-class mask norms from the conventional run, as one JSON
object.

``--scaling`` asks what batching can buy at most on this machine: it runs ``--epochs`` fixed
epochs (no early stop) of the batched optimisation with 1, 2, 5 and K classes per pass and prints
the seconds per class and epoch of each. If that cost does not fall as classes are added, the
hardware is already busy with one class's batch and batching cannot speed NC up here.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cuba.defenses import load_attack_run
from cuba.defenses.neural_cleanse import NeuralCleanse, anomaly_indices, reverse_engineer
from cuba.engine import make_engine


def scaling(run_dir: str, epochs: int) -> dict:
    """Seconds per class and epoch with c classes in one pass, for c in 1, 2, 5, K."""
    run = load_attack_run(run_dir)
    nc = NeuralCleanse()
    x_pool, _ = run.clean_train(nc.n_pool, seed=nc.seed)
    amp = make_engine(str(run.engine.device), "auto")
    run.classifier.to(memory_format=torch.channels_last)  # as NeuralCleanse.reverse does
    k = run.num_classes
    out: dict = {"run": run_dir, "epochs": epochs, "batch_size_per_class": nc.batch_size, "device": str(run.engine.device)}
    for c in sorted({1, 2, min(5, k), k}):
        reverse_engineer(run, list(range(c)), x_pool, 1, 2, nc.batch_size, early_stop=0, autocast=amp.autocast)  # warm-up
        t0 = time.perf_counter()
        reverse_engineer(run, list(range(c)), x_pool, epochs, nc.batches_per_epoch, nc.batch_size, early_stop=0, autocast=amp.autocast)
        per = (time.perf_counter() - t0) / (c * epochs)
        out[f"{c}_classes_per_pass"] = {"images_per_pass": c * nc.batch_size, "seconds_per_class_epoch": round(per, 4)}
    base = out["1_classes_per_pass"]["seconds_per_class_epoch"]
    out["best_speedup_from_batching"] = round(max(base / v["seconds_per_class_epoch"] for key, v in out.items() if key.endswith("_per_pass")), 2)
    return out

VARIANTS = {"conventional": (False, "fp32", False), "class_by_class": (False, "auto", True), "batched": (True, "auto", True)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--epochs", type=int, default=None, help="default 100 (3 with --scaling)")
    p.add_argument("--early-stop", type=int, default=10)
    p.add_argument("--scaling", action="store_true", help="only time 1, 2, 5 and K classes per pass (fixed --epochs)")
    args = p.parse_args()
    if args.scaling:
        print(json.dumps(scaling(args.run_dir, args.epochs or 3), indent=2))
        return
    run = load_attack_run(args.run_dir)
    out: dict = {"run": args.run_dir}
    norms = {}
    for key, (batched, precision, channels_last) in VARIANTS.items():
        t0 = time.perf_counter()
        res = NeuralCleanse(epochs=args.epochs or 100, early_stop=args.early_stop, batched=batched, precision=precision,
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
