"""channels_last or NCHW on this machine? The engine's training step both ways, same process.

    python benchmarks/memory_format.py [--model resnet18|simplecnn] [--steps 4] [--repeats 3] [--json]

The engine stores activations channels_last because bf16 convolutions (oneDNN on AVX512-BF16 /
AMX CPUs, tensor cores on GPUs) run fastest in that layout. On an fp32-only CPU the best layout
is an empirical question, and ``cuba bench`` showed the ResNet18 engine step no faster than a
conventional NCHW loop on an AVX2 machine. This script times ``cuba.bench.engine_throughput``
(the real training loop: clean step and CUBA step) with ``channels_last`` on and off, each the
median of ``repeats`` interleaved measurements, and prints the machine's CPU flags beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from cuba import bench
from cuba.bench import cpu_flags

SHAPES = {"resnet18": (3, 32, "crop+flip"), "simplecnn": (1, 28, "none")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="resnet18")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    ch, size, aug = SHAPES[a.model]
    data = bench.synthetic(ch, size, a.steps * a.batch + a.batch)
    kinds = {f"{attack}_{'cl' if cl else 'nchw'}": (attack, cl) for attack in ("none", "cuba") for cl in (True, False)}
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.repeats):  # interleaved, so a slow spell of the machine hits every kind alike
        for key, (attack, cl) in kinds.items():
            samples[key].append(bench.engine_throughput(a.model, data, attack, aug, a.steps, a.batch, "cpu",
                                                        channels_last=cl))
    med = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    out = {"model": a.model, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_flags(),
           "img_s": med, "range": {k: [round(min(v), 2), round(max(v), 2)] for k, v in samples.items()},
           "nchw_over_channels_last": {att: round(med[f"{att}_nchw"] / med[f"{att}_cl"], 3) for att in ("none", "cuba")}}
    print(json.dumps(out, indent=2) if a.json else
          f"{a.model}: images/s (median of {a.repeats}) {med}; NCHW / channels_last {out['nchw_over_channels_last']}; cpu {out['cpu']}")
    return out


if __name__ == "__main__":
    main()
