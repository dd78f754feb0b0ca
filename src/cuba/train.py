"""Training: the clean baseline and the joint classifier + generator update of CUBA (Algorithm 1).

One loop serves every attack. Per step, for a batch (x, y):

    x* = G(x)                                   (backdoor twins of the first ratio*B images)
    z, z* = F(concat(x, x*))                    (one pass, so BN sees both; two passes when F has no BN)
    L = alpha * MSE(x*, x) + beta * CE(z, y) + gamma * objective(z*, y, T(y))

and both F and G step on the gradient of L. ``objective`` comes from
:data:`cuba.attack.OBJECTIVES` (CUBA's LNF, or a baseline), so a new attack loss is one entry
there. The poisoning baselines (``badnets``, ``ubw-p``) take the clean branch on a poisoned
batch instead: their fixed patch is stamped on the planned images and their labels swapped
(:mod:`cuba.attack.poison`) before augmentation. Schedules that keep joint training from
collapsing (METHOD.md "Known failure modes"):
an optional clean warm-up of F, and a residual bound annealed from ``eps_start`` (the
trigger is obvious, F learns it) down to ``eps`` (stealthy) over ``eps_anneal`` of training.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT, capture, load_checkpoint, own_rng_state, restore, restore_own_rng, save_checkpoint
from .attack.step import NonFiniteLossError, TrainStep
from .attack import OBJECTIVES, POISON_ATTACKS, attack_targets, build_trigger, make_poison_plan, needs_reference_model
from .config import ConfigError, TrainConfig
from .data import ImageDataset
from .data.augment import augment_batch, augment_policy
from .distributed import Dist, all_mean, gather_objects
from .engine import Engine, seed_everything
from .evaluate import evaluate_models
from .models import build_classifier


@dataclass
class TrainResult:
    classifier: nn.Module
    generator: nn.Module | None  # the trigger: a U-Net TriggerGenerator or a fixed PatchTrigger
    targets: torch.Tensor | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    # over the steps of this process after its first two (allocator and kernel warm-up), the
    # way the bench times its reference loop; equals images_per_second for runs of <= 2 steps
    steady_images_per_second: float = 0.0


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of a uint8 (N, C, H, W) tensor, in [0, 1] units, in chunks to bound memory."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for chunk in x.split(8192):
        c = chunk.double().div(255.0)
        s += c.sum(dim=(0, 2, 3))
        s2 += (c * c).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    return mean.float(), (s2 / n - mean**2).clamp_min(0).sqrt().float()


def batch_independent(model: nn.Module) -> bool:
    """True when no layer mixes samples in training mode (no BatchNorm), so that
    ``model(cat([a, b])) == cat([model(a), model(b)])``."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def cosine(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from start (progress 0) to end (progress >= 1)."""
    p = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


def stratified_rows(y: torch.Tensor, max_images: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``max_images`` rows of ``y``, an equal share from every class (all of a
    class that has fewer), in random order within each class.

    Why not ``y[:max_images]``: data sets stored class by class (ImageFolder trees, the cifar10-jpeg
    zip, torchvision's GTSRB) would then give most classes no row at all.
    """
    k = int(y.max()) + 1 if len(y) else 0
    per = max(1, max_images // max(k, 1))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(k):
        idx = (y == c).nonzero().flatten()
        rows.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def class_confusion(classifier: nn.Module, data: ImageDataset, engine: Engine, max_images: int = 10000) -> torch.Tensor:
    """(K, K) mean softmax of a model over training images of each class: the 'similar' vicinity.
    At most ``max_images`` images, stratified over the classes (:func:`stratified_rows`)."""
    rows = stratified_rows(data.y_train, max_images)
    x, y = data.x_train[rows], data.y_train[rows]
    k = data.num_classes
    conf = torch.zeros(k, k)
    classifier.eval()
    for xb, yb in zip(x.split(1024), y.split(1024)):
        with engine.autocast():
            p = classifier(engine.batch(xb)).float().softmax(1).cpu()
        conf.index_add_(0, yb, p)
    classifier.train()
    return conf / torch.bincount(y, minlength=k).clamp_min(1)[:, None]


@dataclass
class Schedule:
    """Where a step sits in training: the clean warm-up, the gamma ramp, the eps anneal.

    Why these schedules (METHOD.md "Known failure modes"): joint training from step 0 with a
    small residual collapses clean accuracy; a clean warm-up of F, gamma ramped from 0, and a
    residual bound annealed from ``eps_start`` (the trigger is obvious, F learns it) down to
    ``eps`` (stealthy) keep it from collapsing.
    """

    cfg: TrainConfig
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    learned: bool  # a generator trained jointly with F (not a fixed patch, not clean)

    @classmethod
    def of(cls, cfg: TrainConfig, n_images: int) -> "Schedule":
        steps_per_epoch = max(1, n_images // cfg.batch_size)  # drop the ragged last batch: constant BN statistics
        total = max(1, round(cfg.epochs * steps_per_epoch))
        learned = cfg.attack in OBJECTIVES
        warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch)) if learned else 0
        return cls(cfg, steps_per_epoch, total, warmup, learned)

    def joint(self, step: int) -> bool:
        return self.learned and step >= self.warmup_steps

    def eps(self, step: int) -> float:
        c = self.cfg
        span = max(1, (self.total_steps - self.warmup_steps) * c.eps_anneal)
        return cosine(c.eps_start, c.eps, (step - self.warmup_steps) / span if c.eps_anneal > 0 else 1.0)

    def gamma(self, step: int) -> float:
        ramp = self.cfg.gamma_ramp_epochs * self.steps_per_epoch
        return self.cfg.gamma * min(1.0, (step - self.warmup_steps + 1) / ramp) if ramp > 0 else self.cfg.gamma


def check_against_data(cfg: TrainConfig, data: ImageDataset, d: Dist) -> None:
    """The checks a config can only pass or fail once its data set is known (K, image size)."""
    k = data.num_classes
    if d.enabled and cfg.batch_size % d.world:
        raise ConfigError(f"batch_size: must be divisible by the {d.world} torchrun processes, got {cfg.batch_size}")
    if cfg.variant == "nra" and cfg.is_attack and not 0 < cfg.k < k:
        raise ConfigError(f"k: must satisfy 0 < k < K = {k} for {data.name}, got {cfg.k}")
    if needs_reference_model(cfg) and cfg.warmup_epochs <= 0:
        raise ConfigError("warmup_epochs: vicinity 'similar' needs warmup_epochs > 0 (the warmed-up classifier is the clean reference model)")
    if cfg.is_attack and cfg.target_class >= k:
        raise ConfigError(f"target_class: must lie in [0, {k}) for {data.name}, got {cfg.target_class}")
    if cfg.attack in POISON_ATTACKS and cfg.patch_size > data.image_size:
        raise ConfigError(f"patch_size: must be at most the image size {data.image_size}, got {cfg.patch_size}")


def build_models(cfg: TrainConfig, data: ImageDataset, engine: Engine) -> tuple[nn.Module, nn.Module | None]:
    """The classifier (input normalised by the training set's channel statistics) and the trigger."""
    mean, std = channel_stats(data.x_train)
    try:  # architecture limits (e.g. simplecnn needs a side divisible by 4) as one-line config errors
        classifier = engine.prepare(build_classifier(cfg.model, data.channels, data.num_classes, data.image_size, mean, std))
        trigger = build_trigger(cfg, data.channels, data.image_size)
    except ValueError as e:
        raise ConfigError(f"model: {e} ({data.name} images are {data.image_size}x{data.image_size})") from None
    return classifier, engine.prepare(trigger) if trigger is not None else None


def make_optimizers(cfg: TrainConfig, classifier: nn.Module, generator: nn.Module | None, schedule: Schedule) -> tuple[Any, Any, Any]:
    """(opt, opt_g, sched): SGD (Nesterov) or Adam for F under a one-cycle cosine lr; Adam for G."""
    params = list(classifier.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=schedule.total_steps, pct_start=0.15, anneal_strategy="cos",
        cycle_momentum=False, div_factor=10.0, final_div_factor=100.0,
    )
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.generator_lr) if schedule.learned and generator is not None else None
    return opt, opt_g, sched


@dataclass
class Loop:
    """The loop's position and record: what a checkpoint stores (plus the models and optimisers)."""

    step: int = 0
    epoch: int = 0
    in_epoch: int = 0
    order: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    targets: torch.Tensor | None = None
    elapsed: float = 0.0


@dataclass
class Training:
    """Everything one training run is built from (:func:`build`), before the loop starts."""

    cfg: TrainConfig
    data: ImageDataset
    engine: Engine
    d: Dist
    gen: torch.Generator
    classifier: nn.Module
    generator: nn.Module | None
    schedule: Schedule
    step_fn: TrainStep
    poison: Any
    x_all: torch.Tensor
    y_all: torch.Tensor
    augment: tuple[int, bool]


def build(cfg: TrainConfig, data: ImageDataset, engine: Engine, d: Dist) -> tuple[Training, Loop]:
    """Seed, build the models, their wrappers, optimisers and the step; in this order, which fixes
    every random draw (a resumed or repeated run must draw the same)."""
    gen = seed_everything(cfg.seed)
    classifier, generator = build_models(cfg, data, engine)
    loop = Loop(targets=None if needs_reference_model(cfg) else attack_targets(cfg, data.num_classes))
    # the forward passes go through DDP wrappers when distributed (gradients averaged in backward)
    fwd_f, fwd_g = classifier, generator
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_f = DDP(classifier)
        fwd_g = DDP(generator) if cfg.attack in OBJECTIVES else fwd_g
        torch.manual_seed(cfg.seed + 7919 * (d.rank + 1))  # augmentation draws differ across ranks
    if cfg.compile:  # the wrappers share parameters with the plain modules (checkpoints, evaluation)
        fwd_f = torch.compile(fwd_f)
        fwd_g = torch.compile(fwd_g) if cfg.attack in OBJECTIVES else fwd_g
    poison = None
    if cfg.attack in POISON_ATTACKS:
        poison = make_poison_plan(cfg.attack, data.y_train, data.num_classes, cfg.poison_rate, cfg.target_class, gen).to(engine.device)
    schedule = Schedule.of(cfg, len(data.y_train))
    opt, opt_g, sched = make_optimizers(cfg, classifier, generator, schedule)
    # Why two passes where allowed: one pass over cat([x, x*]) makes the first layer's backward
    # compute an input gradient for all 2B images, though only x* needs one (a sixth of a CUBA
    # step for SimpleCNN on MNIST). Only where it cannot change the model: no BatchNorm (whose
    # batch statistics would then differ) and no DDP (one forward per backward).
    step_fn = TrainStep(cfg, classifier, generator, opt, opt_g, sched, objective=OBJECTIVES.get(cfg.attack),
                        n_bd=backdoor_count(cfg.backdoor_ratio, cfg.batch_size, d.world),
                        split_passes=batch_independent(classifier) and not d.enabled, fwd_f=fwd_f, fwd_g=fwd_g,
                        autocast=engine.autocast, finite=lambda loss: bool(torch.isfinite(all_mean(loss, d))))
    t = Training(cfg, data, engine, d, gen, classifier, generator, schedule, step_fn, poison,
                 data.x_train.to(engine.device), data.y_train.to(engine.device), augment_policy(cfg.augment, data.name))
    return t, loop


def backdoor_count(ratio: float, batch_size: int, world: int = 1) -> int:
    """How many images of each process's slice get a backdoor twin: ``ratio`` of the slice, which is
    ``batch_size / world`` under torchrun (the global batch split evenly), so the global share stays
    ``ratio`` whatever the number of processes; at least one."""
    return max(1, round(ratio * batch_size / world))


def _checkpoint(t: Training, loop: Loop, run_dir: Path, t0: float) -> None:
    rank_rng = gather_objects(own_rng_state(t.engine.device), t.d)  # a collective: every rank is here
    if not t.d.is_main:
        return
    state = {"step": loop.step, "epoch": loop.epoch, "in_epoch": loop.in_epoch, "order": loop.order.cpu(),
             "history": loop.history, "targets": loop.targets, "elapsed": time.perf_counter() - t0}
    s = t.step_fn
    payload = capture(t.classifier, t.generator, s.opt, s.opt_g, s.sched, t.gen, state)
    save_checkpoint(run_dir, {**payload, "rank_rng": rank_rng})


def _resume(t: Training, loop: Loop, run_dir: Path | None) -> Loop:
    """The loop as a checkpoint in ``run_dir`` left it (models and optimisers restored in place)."""
    saved = load_checkpoint(run_dir) if run_dir is not None else None
    if saved is None:
        return loop
    s = t.step_fn
    st = restore(saved, t.classifier, t.generator, s.opt, s.opt_g, s.sched, t.gen)
    restore_own_rng(saved, t.d.rank, t.d.world, t.engine.device)
    sch = t.schedule
    if st["step"] > 0 and sch.learned and sch.joint(st["step"] - 1):
        # the bound the last step trained with: a checkpoint at an epoch's end is followed by that
        # epoch's validation, which must see the annealed trigger, not the generator's initial bound
        t.generator.eps = sch.eps(st["step"] - 1)
    order = st["order"].to(t.engine.device) if st["order"] is not None else None
    tqdm.write(f"resumed from {run_dir / CHECKPOINT} at step {st['step']} (epoch {st['epoch']})")
    return Loop(st["step"], st["epoch"], st["in_epoch"], order, st["history"],
                st["targets"] if st["targets"] is not None else loop.targets, st["elapsed"])


def _one_step(t: Training, loop: Loop) -> dict[str, float]:
    """Draw the loop's next batch, poison and augment it, and run :class:`TrainStep` on it."""
    cfg, sch, d = t.cfg, t.schedule, t.d
    idx = loop.order[loop.in_epoch * cfg.batch_size:(loop.in_epoch + 1) * cfg.batch_size][d.rank::d.world]
    x, y = t.engine.batch(t.x_all[idx]), t.y_all[idx]
    if t.poison is not None:
        x, y = t.poison.apply(x, y, idx, t.generator)
    x = augment_batch(x, *t.augment)
    step = loop.step
    if step == sch.warmup_steps and loop.targets is None and sch.learned:
        loop.targets = attack_targets(cfg, t.data.num_classes, class_confusion(t.classifier, t.data, t.engine))
    joint = sch.joint(step)
    if joint:
        t.generator.eps = sch.eps(step)
        if t.step_fn.target_rows is None:  # the (K, K) float rows, moved to the device once
            t.step_fn.target_rows = loop.targets.to(t.engine.device).float()
    try:
        jl = t.step_fn(x, y, joint, sch.gamma(step) if joint else 0.0)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e} at step {step} (epoch {loop.epoch}); lower lr or gamma") from None
    return jl.log(t.generator.eps if joint else None) if step % 50 == 0 else {}


def _evaluate_epoch(t: Training, loop: Loop, t0: float) -> None:
    """Per-epoch numbers on the validation split, never the test set: what a user (or a sweep)
    watches to choose epochs and settings; without a split, time only."""
    data, cfg = t.data, t.cfg
    m: dict[str, Any] = {}
    if data.has_val:
        m = evaluate_models(t.classifier, t.generator, data, t.engine, loop.targets, cfg.full_range, cfg.eval_batch_size,
                            stealth=False, dist=t.d, split="val")
    m.update(epoch=loop.epoch, step=loop.step, seconds=round(time.perf_counter() - t0, 2), split="val" if data.has_val else None)
    loop.history.append(m)
    line = f"epoch {loop.epoch}: val CA {m['ca']:.4f}" if data.has_val else f"epoch {loop.epoch} (no validation split)"
    if data.has_val and t.generator is not None and loop.targets is not None:
        line += f"  ASR {m['asr']:.4f}  DS {m['ds']:.4f}  DS-min {m['ds_min']:.4f}"
    if t.d.is_main:
        tqdm.write(line + f"  ({m['seconds']:.0f} s)")
    _train_mode(t)


def _train_mode(t: Training, on: bool = True) -> None:
    t.classifier.train(on)
    if t.generator is not None and (t.schedule.learned or not on):
        t.generator.train(on)


def train(cfg: TrainConfig, data: ImageDataset, engine: Engine, run_dir: Path | None = None, dist: Dist | None = None) -> TrainResult:
    """Train a classifier (and, for an attack, its trigger generator) as ``cfg`` says.

    With ``run_dir``, a checkpoint is written there every ``cfg.checkpoint_every`` epochs
    (fractions allowed: mid-epoch), and a checkpoint found there is resumed from. Under torchrun
    (``dist``), each rank trains on its slice of every global batch (:mod:`cuba.distributed`).
    """
    d = dist or Dist()
    check_against_data(cfg, data, d)
    t, loop = build(cfg, data, engine, d)
    sch = t.schedule
    every = round(cfg.checkpoint_every * sch.steps_per_epoch) if run_dir is not None and cfg.checkpoint_every > 0 else 0
    _train_mode(t)
    # redraw at most every 30 s when stderr is a file or pipe (logs stay readable)
    bar = tqdm(total=sch.total_steps, desc=f"train {cfg.label()}", disable=not cfg.progress or not d.is_main, unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    loop = _resume(t, loop, run_dir)
    bar.update(loop.step)
    t0 = time.perf_counter() - loop.elapsed
    here, t_warm = 0, 0.0  # steps run by this process; when its warm-up steps ended
    with bar:
        while loop.step < sch.total_steps:
            if loop.order is None:
                loop.order = torch.randperm(len(data.y_train), generator=t.gen).to(engine.device)
            while loop.in_epoch < sch.steps_per_epoch and loop.step < sch.total_steps:
                parts = _one_step(t, loop)
                loop.step, loop.in_epoch, here = loop.step + 1, loop.in_epoch + 1, here + 1
                t_warm = time.perf_counter() if here == 2 else t_warm
                bar.update(1)
                if parts:
                    bar.set_postfix({k_: f"{v:.3g}" for k_, v in parts.items()}, refresh=False)
                if every and loop.step % every == 0 and loop.step < sch.total_steps:
                    _checkpoint(t, loop, run_dir, t0)  # every rank: each hands over its random stream
            loop.in_epoch, loop.order, loop.epoch = 0, None, loop.epoch + 1
            if cfg.eval_each_epoch:
                _evaluate_epoch(t, loop, t0)
    return _finish(t, loop, t0, here, t_warm)


def _finish(t: Training, loop: Loop, t0: float, here: int, t_warm: float) -> TrainResult:
    """Both models to eval mode, the trigger at its final bound; the throughput of this process."""
    t_end = time.perf_counter()
    seconds = t_end - t0
    _train_mode(t, on=False)
    if t.schedule.learned:
        t.generator.eps = t.cfg.eps
    batch = t.cfg.batch_size
    ips = t.schedule.total_steps * batch / max(seconds, 1e-9)  # global images/s
    # per-epoch evaluation, when on, falls inside both windows (the bench turns it off)
    steady = (here - 2) * batch / max(t_end - t_warm, 1e-9) if here > 2 else ips
    return TrainResult(t.classifier, t.generator, loop.targets, loop.history, seconds, ips, steady)
