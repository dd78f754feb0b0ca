"""How far a GTSRB validation image lies from the training set, per way of splitting (issue 16).

GTSRB's training images are tracks of 30 frames of one sign. A validation split drawn image by
image keeps each held-out frame's neighbours in training, so it measures memory, not
generalisation; the test set was recorded on other tracks. For each validation image (and each
test image, for reference) this prints the RMS pixel distance (grey levels, 0-255) to the nearest
training image of its class, for the image-by-image split (group size 1) and the track-aware one
(group size 30, what cuba uses for GTSRB: :data:`cuba.data.split.VAL_GROUPS`). The split whose
distances look like the test set's is the honest one.

    python benchmarks/gtsrb_val_leak.py --data-dir ../shared/data      # about 10 s on one core

Measured 2026-12-01 (2-core Xeon, AMX/bf16; fp32 distances): group 1 median 14.9, 32.7% under 10;
group 30 median 29.9, 10.6% under 10; test median 28.8, 11.5% under 10.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cuba.data.split import stratified_split


def nearest_same_class(xq: torch.Tensor, yq: torch.Tensor, xr: torch.Tensor, yr: torch.Tensor) -> torch.Tensor:
    """RMS distance (grey levels) from each query image to the nearest reference image of its class."""
    out = [torch.cdist(xq[yq == c], xr[yr == c]).min(1).values for c in torch.unique(yq).tolist()]
    return torch.cat(out) / xq.shape[1] ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--val-fraction", type=float, default=0.1)
    args = ap.parse_args()
    path = args.data_dir / "gtsrb.npz"
    if not path.is_file():
        raise SystemExit(f"gtsrb_val_leak: {path} not found (pass --data-dir)")
    d = np.load(path)
    x = torch.from_numpy(d["x_train"]).float().flatten(1)
    y = torch.from_numpy(d["y_train"]).long()

    def report(name: str, nn: torch.Tensor) -> None:
        print(f"{name}: {len(nn)} images; nearest same-class training image: median {nn.median():.1f} grey levels, "
              f"{(nn < 10).float().mean() * 100:.1f}% under 10")

    for group in (1, 30):
        rest, val = stratified_split(y, args.val_fraction, group_size=group)
        report(f"validation, group size {group}", nearest_same_class(x[val], y[val], x[rest], y[rest]))
    xt = torch.from_numpy(d["x_test"]).float().flatten(1)
    report("test", nearest_same_class(xt, torch.from_numpy(d["y_test"]).long(), x, y))


if __name__ == "__main__":
    main()
