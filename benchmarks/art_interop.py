"""Measure ART's AC / SS / STRIP on cuba runs (benchmarks/results/art_interop.md).

    pip install -e ".[art]"
    cuba train --dataset digits --attack badnets --out /tmp/art-badnets --no-progress
    cuba train --dataset digits --attack ubw-p --out /tmp/art-ubwp --no-progress
    python benchmarks/art_interop.py out.json
"""
import json, sys, time
import numpy as np
from cuba.defenses import load_attack_run
from cuba.interop.art import art_activation_clustering, art_spectral_signatures, art_strip, poisoned_training_set

def slim(d):
    return {k: v for k, v in d.items() if not isinstance(v, (list, np.ndarray)) or k.endswith("per_class")}

out = {}
for name, path in (("badnets", "/tmp/art-badnets"), ("ubw-p", "/tmp/art-ubwp")):
    t = time.perf_counter(); run = load_attack_run(path, device="cpu"); ts = poisoned_training_set(run)
    r = out[name] = {"load_and_rebuild_s": round(time.perf_counter() - t, 2), "n_train": len(ts.y),
                     "n_poison": int(ts.poisoned.sum()), "rate": ts.rate}
    for ca in ("smaller", "relative-size", "distance", "silhouette-scores"):
        r[f"ac_{ca}"] = slim(art_activation_clustering(run, ts, cluster_analysis=ca))
    r["ac_smaller_logits"] = slim(art_activation_clustering(run, ts, features="logits"))
    r["ss_default"] = slim(art_spectral_signatures(run, ts))
    r["ss_oracle_rate"] = slim(art_spectral_signatures(run, ts, expected_pp_poison=round(ts.rate, 4)))
    r["ss_default_logits"] = slim(art_spectral_signatures(run, ts, features="logits"))
    r["strip_n20"] = slim(art_strip(run))
    r["strip_n100"] = slim(art_strip(run, num_samples=100))
json.dump(out, open(sys.argv[1], "w"), indent=1, default=float)
print(json.dumps(out, indent=1, default=float))
