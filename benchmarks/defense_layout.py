"""Do the defenses run faster with the classifier channels_last? Each defense both ways, same process.

    python benchmarks/defense_layout.py RUN [--defenses strip sentinet ...] [--repeats 3]
        [--set n_eval=200 ...] [--json]

Training uses channels_last (``benchmarks/memory_format.py``); the defenses rebuilt a run's
classifier NCHW. Most of a detector's time is forward (and input-gradient) passes of the
classifier, so the layout decides a large share of a detector matrix's cost on a CPU. This
script times ``run_defense`` on one finished run with ``load_attack_run(channels_last=...)``
both ways, interleaved (median of ``repeats``), writes the results to a scratch folder (never
into the run), and checks that both layouts give the same headline numbers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cuba.bench import cpu_flags
from cuba.cli.common import parse_set
from cuba.defenses import DEFENSES
from cuba.defenses.base import load_attack_run, run_defense

HEADLINE_KEYS = ("auroc", "far_at_frr_1pct", "tpr_at_fpr_5pct", "score", "anomaly_index")


def time_one(name: str, run_dir: str, channels_last: bool, params: dict, out: Path) -> tuple[float, dict]:
    accepted = inspect.signature(DEFENSES[name].__init__).parameters
    params = {k: v for k, v in params.items() if k in accepted}  # e.g. n_eval only where a defense has it
    run = load_attack_run(run_dir, channels_last=channels_last)
    t0 = time.perf_counter()
    res = run_defense(name, run, out / ("cl" if channels_last else "nchw"), **params)
    return time.perf_counter() - t0, {k: res.fields[k] for k in HEADLINE_KEYS if isinstance(res.fields.get(k), float)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--defenses", nargs="+", default=["strip", "sentinet", "scale-up", "mm-bd", "cognitive-distillation"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], help="defense parameters, KEY=VALUE, given to each defense that has them")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    unknown = [d for d in a.defenses if d not in DEFENSES]
    if unknown:
        p.error(f"unknown defense(s) {unknown}; choose from {', '.join(DEFENSES)}")
    params = parse_set(a.set)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.defenses:
            secs: dict[bool, list[float]] = {True: [], False: []}
            heads: dict[bool, dict] = {}
            for _ in range(a.repeats):
                for cl in (False, True):  # interleaved: a slow spell of a shared machine hits both alike
                    s, heads[cl] = time_one(name, a.run, cl, params, Path(tmp) / name)
                    secs[cl].append(s)
            med = {cl: statistics.median(v) for cl, v in secs.items()}
            diff = max((abs(heads[True][k] - heads[False][k]) for k in heads[False] if k in heads[True]), default=0.0)
            rows[name] = {"nchw_s": round(med[False], 2), "channels_last_s": round(med[True], 2),
                          "speedup": round(med[False] / med[True], 3), "max_headline_diff": diff}
    out = {"run": a.run, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_flags(),
           "params": params, "repeats": a.repeats, "defenses": rows}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"cpu {out['cpu']}, {out['threads']} threads, median of {a.repeats}")
        for name, r in rows.items():
            print(f"{name:<24} NCHW {r['nchw_s']:>8.2f} s  channels_last {r['channels_last_s']:>8.2f} s  "
                  f"x{r['speedup']:.2f}  max headline diff {r['max_headline_diff']:.2g}")
    return out


if __name__ == "__main__":
    main()
