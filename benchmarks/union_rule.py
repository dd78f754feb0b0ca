"""Near-tie OR STRIP: can the adaptive attacker escape both? (issue 18, point 4; a post-hoc analysis)

The adaptive attacker of the detector matrix adds a confident-prediction term to CUBA and so evades
our near-tie detector (each backdoor input no longer sits at a k-way tie). Being confident is what
STRIP's paper rule looks for (low entropy under superimposition), and CUBA's near-ties are what it
misses. This reads the two detectors' stored per-input scores of each run -- they score the same test
inputs and calibrate on the same validation inputs (same ``n_eval``, ``n_calib`` and seed, checked) --
and applies the union rule: flag an input when near-tie flags it at FRR ``frr / 2`` or STRIP's
one-sided rule flags it at FRR ``frr / 2`` (a Bonferroni split, so the union's clean FRR is at most
``frr`` up to calibration error; its realised test FRR is printed). Nothing is tuned: the split is
fixed, each side is the detector's own rule at half the rate.

Honest framing: the rule was suggested by the adaptive results, after they were seen; it is reported
as a lead, and a detector built on it would be measured on new models.

    python benchmarks/union_rule.py RUN [RUN ...] [--frr 0.01] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

from cuba.defenses.base import UNHELD_CALIBRATION
from cuba.defenses.rules import far_frr, one_sided_lower, resolved
from cuba.defenses.summary import group_names
from cuba.run_groups import untaken_backdoor
from cuba.runs import read_json

SHARED_PARAMS = ("n_eval", "n_calib", "seed")


def _load(run: Path, name: str) -> dict | None:
    p = Path(run) / "defenses" / name / "defense.json"
    return read_json(p) if p.is_file() else None  # a damaged file is named in the error


def _setting(run: Path) -> str | None:
    """The setting any of the run's defense.json files names (a clean reference runs only some detectors)."""
    for p in sorted((Path(run) / "defenses").glob("*/defense.json")):
        return read_json(p).get("setting")
    return None


def union_rates(strip: dict, tie: dict, frr: float) -> dict:
    """FAR / realised test FRR of near-tie alone and STRIP alone at ``frr`` (as their defense.json
    wrote them), and of the union at ``frr / 2`` each. STRIP's threshold is its own: the ``frr / 2``
    quantile of the normal fitted to its clean validation entropies (``calib_mean``, ``calib_std``)."""
    for k in SHARED_PARAMS:
        if strip["params"].get(k) != tie["params"].get(k):
            raise SystemExit(f"{strip['run']}: STRIP and near-tie scored other inputs ({k}: "
                             f"{strip['params'].get(k)} vs {tie['params'].get(k)}); the union needs the same ones")
    e_clean, e_bd = np.asarray(strip["entropy_clean"]), np.asarray(strip["entropy_backdoor"])
    t_clean, t_bd, t_val = np.asarray(tie["tie_clean"]), np.asarray(tie["tie_backdoor"]), np.asarray(tie["tie_val"])
    half = frr / 2
    if not resolved(len(t_val), half, False):  # near-tie's threshold would be the validation minimum
        raise SystemExit(f"{tie['run']}: {len(t_val)} validation scores cannot resolve a rule at FRR {half:g}")
    if any(str(f.get("calibration", "")).startswith(UNHELD_CALIBRATION) for f in (strip, tie)):
        raise SystemExit(f"{strip['run']}: calibrated on training images (no validation split): no union rule")
    lo_strip = float(norm.ppf(half, strip["calib_mean"], strip["calib_std"]))
    lo_tie = one_sided_lower(t_val, half)
    flag_bd, flag_clean = (e_bd < lo_strip) | (t_bd < lo_tie), (e_clean < lo_strip) | (t_clean < lo_tie)
    lo_strip_full = float(norm.ppf(frr, strip["calib_mean"], strip["calib_std"]))
    strip_far, strip_frr = far_frr(e_clean, e_bd, lo_strip_full)
    tie_far, tie_frr = far_frr(t_clean, t_bd, one_sided_lower(t_val, frr))
    return {"setting": strip.get("setting"), "near_tie_far": tie_far, "near_tie_frr": tie_frr,
            "strip_far": strip_far, "strip_frr": strip_frr,
            "union_far": float(1 - flag_bd.mean()), "union_frr": float(flag_clean.mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--frr", type=float, default=0.01, help="the union's total clean FRR (split in half)")
    ap.add_argument("--json", type=Path, help="also write the per-run numbers here")
    a = ap.parse_args(argv)
    if not 0 < a.frr < 1:
        raise SystemExit(f"--frr must lie in (0, 1), got {a.frr}")
    rows, used = [], []
    for run in a.runs:
        strip, tie = _load(run, "strip"), _load(run, "near-tie")
        if not strip or not tie or strip.get("applicable") is False or tie.get("applicable") is False:
            if _setting(run) != "clean":  # a clean model has no backdoor inputs: no word
                print(f"skipped {run}: STRIP or near-tie missing or not applicable", file=sys.stderr)
            continue
        why = untaken_backdoor(run, str(strip.get("setting")))
        if why:  # as in cuba defense-table: nothing to catch
            print(f"left out {run}: {why}", file=sys.stderr)
            continue
        rows.append({"run": run.name, **union_rates(strip, tie, a.frr)})
        used.append(run)
    for r, g in zip(rows, group_names(used)):  # the shared data set / model prefix and the seed dropped
        r["group"] = g
    if not rows:
        raise SystemExit("no run has applicable STRIP and near-tie results")
    pct = f"{100 * a.frr:g}%"
    print(f"| group (models) | near-tie FAR@FRR {pct} | STRIP FAR@FRR {pct} | union FAR (each at {100 * a.frr / 2:g}%) "
          "| union test FRR | caught by the union (FAR <= 0.05) |")
    print("|---|---|---|---|---|---|")
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g]
        m = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
        caught = sum(r["union_far"] <= 0.05 for r in rs)
        print(f"| {g} ({len(rs)}) | {m('near_tie_far'):.3f} | {m('strip_far'):.3f} | {m('union_far'):.3f} "
              f"| {m('union_frr'):.3f} (max {max(r['union_frr'] for r in rs):.3f}) | {caught}/{len(rs)} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
