"""Why SCALE-UP cannot see a backdoor on MNIST (issue 18): its clean inputs do not drift.

SCALE-UP flags an input whose prediction survives pixel amplification, clip(n * x, 0, 1) for
n in (3, 5, 7, 9, 11), on the premise that a clean input's prediction drifts. On a near-binary image the clip
leaves most pixels where they were, so a clean prediction survives too, and SPC (the share of
scales that keep the prediction) is 1 for clean and backdoor inputs alike. This prints, for each
SCALE-UP result given, how many clean and backdoor test inputs keep their prediction at every
scale, and for each data set how much of an image amplification moves:

* ``grey_share_of_ink``: of the pixels above 0.05, the share below 0.95 (those the clip can move);
* ``x3_moved_mass``: mean |clip(3x) - x| over mean x, the share of the image's mass that x3 adds.

    python benchmarks/scale_up_saturation.py --data-dir ../shared/data \\
        RUN/defenses/scale-up/defense.json [...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cuba.data.sources import load_dataset


def spc_summary(defense_json: Path) -> dict:
    """Share of clean / backdoor test inputs with SPC 1 (the prediction kept at every scale)."""
    d = json.loads(Path(defense_json).read_text())
    if d.get("defense") != "scale-up":
        raise SystemExit(f"{defense_json}: not a SCALE-UP result (defense {d.get('defense')!r})")
    clean, backdoor = np.asarray(d["spc_clean"]), np.asarray(d.get("spc_backdoor") or [])
    return {"result": str(defense_json), "setting": d.get("setting"), "auroc": d.get("auroc"),
            "clean_spc_1": float(np.mean(clean == 1)),
            "backdoor_spc_1": float(np.mean(backdoor == 1)) if len(backdoor) else None,
            "clean_mean_spc": float(clean.mean())}


def saturation(x: torch.Tensor) -> dict:
    """How much amplification can move images in [0, 1] (see the module docstring)."""
    x = x.float()
    ink = x > 0.05
    grey = ink & (x < 0.95)
    return {"grey_share_of_ink": float(grey.sum() / ink.sum()),
            "x3_moved_mass": float(((3 * x).clamp(0, 1) - x).abs().mean() / x.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*", type=Path, help="SCALE-UP defense.json files")
    ap.add_argument("--data-dir", default=None)
    # comma-separated, so that result files after it are not read as data set names
    ap.add_argument("--datasets", default="mnist,digits", help="comma-separated data sets to measure")
    a = ap.parse_args()
    data = {}
    for name in filter(None, a.datasets.split(",")):
        ds = load_dataset(name, a.data_dir)
        x = ds.x_test
        data[name] = saturation(x / 255 if x.dtype == torch.uint8 else x)
    print(json.dumps({"datasets": data, "results": [spc_summary(p) for p in a.results]}, indent=1))


if __name__ == "__main__":
    main()
