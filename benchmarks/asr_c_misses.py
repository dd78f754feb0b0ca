"""Where do a run's ASR-C misses go? (issue 16, point 4: NRA-2 on RGB.)

ASR-C counts backdoor successes over test images the model classifies correctly when clean. For
each miss this script asks whether the triggered prediction fell back to the true class y, or went
to another wrong class outside T(y) -- and then whether that class lies in T(z) for z the class the
model most often confuses y with on clean images (the "perceived class" mechanism that explains
ASR < ASR-C, acting on images that are correct but close to a neighbour). Chance level: the share
expected if each miss picked uniformly among the wrong classes outside T(y).

    python benchmarks/asr_c_misses.py runs/nra2-rgb/sum-g5

Reads only RUN/predictions.npz; prints a JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def analyse(pred: dict[str, np.ndarray]) -> dict[str, float | int]:
    y, pc, pb = pred["y_true"], pred["y_pred_clean"], pred["y_pred_backdoor"]
    targets = pred["target_matrix"].astype(bool)
    k = targets.shape[0]
    ok = pc == y
    success = targets[y, pb]
    miss = ok & ~success
    other = miss & (pb != y)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y[~ok], pc[~ok]), 1)
    np.fill_diagonal(confusion, -1)
    top = confusion.argsort(1)[:, ::-1]
    z1, z2 = top[:, 0][y[other]], top[:, 1][y[other]]
    in_top1 = targets[z1, pb[other]]
    in_top2 = in_top1 | targets[z2, pb[other]]
    chance = [np.mean([targets[top[yy, 0], c] for c in range(k) if c != yy and not targets[yy, c]]) for yy in y[other]]
    return {"asr_c": float(success[ok].mean()), "misses": int(miss.sum()), "stay_at_y": int((miss & (pb == y)).sum()),
            "other_wrong_class": int(other.sum()),
            "share_in_T_of_top_confuser": float(in_top1.mean()) if other.any() else float("nan"),
            "share_in_T_of_top2_confusers": float(in_top2.mean()) if other.any() else float("nan"),
            "chance_in_T_of_top_confuser": float(np.mean(chance)) if other.any() else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    args = ap.parse_args()
    with np.load(args.run / "predictions.npz") as f:
        print(json.dumps(analyse(dict(f)), indent=2))


if __name__ == "__main__":
    main()
