"""Where the time of one CUBA training step goes, against one clean step.

    python benchmarks/step_breakdown.py [--model simplecnn|resnet18] [--steps 60] [--repeats 3] [--profile] [--json]

`cuba bench` gives the ratio of a CUBA step to a clean step; this script splits it. It replays
the training step of :func:`cuba.train.train` (:class:`cuba.attack.step.TrainStep`: same modules,
engine, losses, optimisers, gradient clipping) with parts left out, and times the U-Net generator on its own at full and half
resolution and two widths. Each number is the median of ``repeats`` interleaved measurements
of ``steps`` steps, after three warm-up steps; synthetic uint8 images (speed does not depend on
pixel values). ``--model resnet18`` does the same for ResNet18 on 32x32 RGB (use ``--steps 5``:
one step takes seconds); as in training, a classifier with BatchNorm sees the clean and the
triggered half as one concatenated batch, a BatchNorm-free one as two passes. ``--profile`` adds,
per operator, the time of the clean step and of the two classifier passes (torch.profiler),
which shows where the passes cost more than twice the clean step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from cuba.attack import OBJECTIVES
from cuba.attack.step import TrainStep
from cuba.config import make_config
from cuba.engine import make_engine
from cuba.models import TriggerGenerator, build_classifier
from cuba.train import batch_independent

BATCH, K = 128, 10
SHAPES = {"simplecnn": (1, 28), "resnet18": (3, 32)}  # (channels, image size) of each case


def _macs_per_image(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds of the convolutions and linear layers of one forward pass, per image."""
    total = 0

    def hook(m: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):  # each output element: in_channels x kh x kw
            total += out[0].numel() * m.weight[0].numel()
        elif isinstance(m, torch.nn.ConvTranspose2d):  # each input element spreads to out_channels x kh x kw
            total += inp[0][0].numel() * m.weight[0].numel()
        elif isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module.eval()(x[:1])
    module.train()
    for h in handles:
        h.remove()
    return float(total)


def _profile(clean: Callable[[int], None], passes: Callable[[int], None], steps: int, top: int = 10) -> dict[str, tuple[float, float]]:
    """Self CPU (or CUDA) time per step of each operator, for the clean step and the two passes:
    the ``top`` operators by their extra time in the two passes over twice the clean step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    per_op = []
    for fn in (clean, passes):
        for i in range(3):
            fn(i)
        with profile(activities=acts) as prof:
            for i in range(steps):
                fn(i)
        per_op.append({e.key: (e.self_device_time_total if torch.cuda.is_available() else e.self_cpu_time_total) / 1000 / steps
                       for e in prof.key_averages()})
    names = sorted(set(per_op[0]) | set(per_op[1]), key=lambda k: per_op[1].get(k, 0) - 2 * per_op[0].get(k, 0), reverse=True)
    return {k: (round(per_op[0].get(k, 0.0), 2), round(per_op[1].get(k, 0.0), 2)) for k in names[:top]}


CFG = make_config({})  # the defaults: alpha = beta = 1, gamma = 5, tau 0.1, mean MSE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", choices=sorted(SHAPES), default="simplecnn")
    ap.add_argument("--profile", action="store_true", help="also split the clean step and the two passes by operator")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    ch, size = SHAPES[args.model]
    eng = make_engine("auto")
    torch.manual_seed(0)
    xs = [eng.batch(torch.randint(0, 256, (BATCH, ch, size, size), dtype=torch.uint8)) for _ in range(8)]
    ys = [torch.randint(0, K, (BATCH,), device=eng.device) for _ in range(8)]
    rows = (1 - torch.eye(K, device=eng.device))  # FRA target rows
    f = eng.prepare(build_classifier(args.model, ch, K, size))
    split = batch_independent(f)  # the training loop's rule (cuba.train)
    opt = torch.optim.SGD(f.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def make_gen(scale: int, width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        g = eng.prepare(TriggerGenerator(ch, size, "residual", 0.05, width, scale))
        return g, torch.optim.Adam(g.parameters(), lr=1e-3)

    g_half, opt_half = make_gen(2, 16)

    def train_step(gen: tuple[torch.nn.Module, torch.optim.Optimizer] | None, attack: bool) -> Callable[[int], None]:
        # the training loop's own step (cuba.attack.step.TrainStep); without a generator the
        # triggered input is a leaf that still needs its gradient
        g = gen[0] if gen else (lambda a: a.detach().clone().requires_grad_(True))
        ts = TrainStep(CFG, f, gen[0] if gen else None, opt, gen[1] if gen else None, objective=OBJECTIVES["cuba"],
                       n_bd=BATCH, split_passes=split, fwd_g=g, autocast=eng.autocast)
        ts.target_rows = rows

        def step(i: int) -> None:
            ts(xs[i % 8], ys[i % 8], joint=attack, gamma=CFG.gamma)
        return step

    def gen_alone(scale: int, width: int) -> Callable[[int], None]:
        g, o = make_gen(scale, width)

        def step(i: int) -> None:
            with eng.autocast():
                out = g(xs[i % 8])
            out.sum().backward()
            o.step()
            o.zero_grad(set_to_none=True)
        return step

    cases: dict[str, Callable[[int], None]] = {
        "clean step": train_step(None, False),
        "two classifier passes + losses, no generator": train_step(None, True),
        "CUBA step, half-resolution U-Net (width 16)": train_step((g_half, opt_half), True),
        "CUBA step, full-resolution U-Net (width 16)": train_step(make_gen(1, 16), True),
        "U-Net alone, full resolution, width 16": gen_alone(1, 16),
        "U-Net alone, full resolution, width 8": gen_alone(1, 8),
        "U-Net alone, half resolution, width 16": gen_alone(2, 16),
        "U-Net alone, half resolution, width 8": gen_alone(2, 8),
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            for i in range(3):
                fn(i)
            t0 = time.perf_counter()
            for i in range(args.steps):
                fn(i)
            samples[name].append((time.perf_counter() - t0) / args.steps * 1000)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    clean = ms["clean step"]
    macs = {
        args.model: _macs_per_image(f, xs[0]),
        **{f"unet scale {s} width {w}": _macs_per_image(TriggerGenerator(ch, size, "residual", 0.05, w, s).unet, F.avg_pool2d(xs[0].float(), s))
           for s in (1, 2) for w in (16, 8)},
    }
    out = {"model": args.model, "device": str(eng.device), "bf16": eng.bf16, "threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats,
           "ms": {k: round(v, 2) for k, v in ms.items()}, "clean_steps": {k: round(v / clean, 3) for k, v in ms.items()},
           "forward_mmacs_per_image": {k: round(v / 1e6, 2) for k, v in macs.items()}}
    if args.profile:
        out["profile_ms_per_step"] = _profile(cases["clean step"], cases["two classifier passes + losses, no generator"], args.steps)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"| part ({args.model}, {out['device']}, bf16 {eng.bf16}, {out['threads']} threads, batch {BATCH}) | ms | clean steps |\n|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.1f} | {v / clean:.2f} |")
    print("\nforward multiply-adds per image (M): " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in macs.items()))
    if args.profile:
        print("\n| operator (self time) | clean step ms | two passes ms | ratio |\n|---|---|---|---|")
        for name, (a, b) in out["profile_ms_per_step"].items():
            print(f"| {name} | {a:.1f} | {b:.1f} | {b / a if a else float('inf'):.2f} |")


if __name__ == "__main__":
    main()
