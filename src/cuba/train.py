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
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT, capture, load_checkpoint, restore, save_checkpoint
from .attack.step import joint_loss
from .attack import OBJECTIVES, POISON_ATTACKS, attack_targets, build_trigger, make_poison_plan, needs_reference_model
from .config import ConfigError, TrainConfig
from .data import ImageDataset
from .data.augment import augment_batch, augment_policy
from .distributed import Dist, all_mean
from .engine import Engine, seed_everything
from .evaluate import evaluate_models
from .models import build_classifier


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step."""


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


def train(cfg: TrainConfig, data: ImageDataset, engine: Engine, run_dir: Path | None = None, dist: Dist | None = None) -> TrainResult:
    """Train a classifier (and, for an attack, its trigger generator) as ``cfg`` says.

    With ``run_dir``, a checkpoint is written there every ``cfg.checkpoint_every`` epochs
    (fractions allowed: mid-epoch), and a checkpoint found there is resumed from. Under torchrun
    (``dist``), each rank trains on its slice of every global batch (:mod:`cuba.distributed`).
    """
    d = dist or Dist()
    if d.enabled and cfg.batch_size % d.world:
        raise ConfigError(f"batch_size: must be divisible by the {d.world} torchrun processes, got {cfg.batch_size}")
    gen = seed_everything(cfg.seed)
    k = data.num_classes
    if cfg.variant == "nra" and cfg.is_attack and not 0 < cfg.k < k:
        raise ConfigError(f"k: must satisfy 0 < k < K = {k} for {data.name}, got {cfg.k}")
    if needs_reference_model(cfg) and cfg.warmup_epochs <= 0:
        raise ConfigError("warmup_epochs: vicinity 'similar' needs warmup_epochs > 0 (the warmed-up classifier is the clean reference model)")
    if cfg.is_attack and cfg.target_class >= k:
        raise ConfigError(f"target_class: must lie in [0, {k}) for {data.name}, got {cfg.target_class}")
    if cfg.attack in POISON_ATTACKS and cfg.patch_size > data.image_size:
        raise ConfigError(f"patch_size: must be at most the image size {data.image_size}, got {cfg.patch_size}")
    mean, std = channel_stats(data.x_train)
    try:  # architecture limits (e.g. simplecnn needs a side divisible by 4) as one-line config errors
        classifier = engine.prepare(build_classifier(cfg.model, data.channels, k, data.image_size, mean, std))
        trigger = build_trigger(cfg, data.channels, data.image_size)
    except ValueError as e:
        raise ConfigError(f"model: {e} ({data.name} images are {data.image_size}x{data.image_size})") from None
    generator = engine.prepare(trigger) if trigger is not None else None
    targets = None if needs_reference_model(cfg) else attack_targets(cfg, k)
    # the model forward passes go through DDP wrappers when distributed (gradients averaged in backward)
    fwd_f, fwd_g = classifier, generator
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_f = DDP(classifier)
        if cfg.attack in OBJECTIVES:
            fwd_g = DDP(generator)
        torch.manual_seed(cfg.seed + 7919 * (d.rank + 1))  # augmentation draws differ across ranks
    if cfg.compile:  # the wrappers share parameters with the plain modules (checkpoints, evaluation)
        fwd_f = torch.compile(fwd_f)
        if cfg.attack in OBJECTIVES:
            fwd_g = torch.compile(fwd_g)
    poison = None
    if cfg.attack in POISON_ATTACKS:
        poison = make_poison_plan(cfg.attack, data.y_train, k, cfg.poison_rate, cfg.target_class, gen).to(engine.device)

    n = len(data.y_train)
    steps_per_epoch = max(1, n // cfg.batch_size)  # drop the ragged last batch: constant BN statistics
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    learned = cfg.attack in OBJECTIVES  # a generator trained jointly with F (not a fixed patch)
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch)) if learned else 0
    params = list(classifier.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15, anneal_strategy="cos",
        cycle_momentum=False, div_factor=10.0, final_div_factor=100.0,
    )
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.generator_lr) if learned else None
    objective = OBJECTIVES.get(cfg.attack)
    pad, flip = augment_policy(cfg.augment, data.name)
    x_all = data.x_train.to(engine.device)
    y_all = data.y_train.to(engine.device)
    n_bd = max(1, round(cfg.backdoor_ratio * cfg.batch_size))
    # Why two passes: one pass over cat([x, x*]) makes the first layer's backward compute an
    # input gradient for all 2B images, though only x* (the generator's output) needs one; for
    # SimpleCNN on MNIST that was a sixth of a CUBA step. Only where it cannot change the model:
    # no BatchNorm (whose batch statistics would then differ) and no DDP (which allows one
    # forward per backward).
    split_passes = batch_independent(classifier) and not d.enabled
    history: list[dict[str, Any]] = []
    target_rows: torch.Tensor | None = None
    classifier.train()
    if learned:
        generator.train()
    # redraw at most every 30 s when stderr is a file or pipe (logs stay readable)
    bar = tqdm(total=total_steps, desc=f"train {cfg.label()}", disable=not cfg.progress or not d.is_main, unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    step, epoch, start_i, order, elapsed = 0, 0, 0, None, 0.0
    every = round(cfg.checkpoint_every * steps_per_epoch) if run_dir is not None and cfg.checkpoint_every > 0 else 0
    saved = load_checkpoint(run_dir) if run_dir is not None else None
    if saved is not None:
        st = restore(saved, classifier, generator, opt, opt_g, sched, gen)
        step, epoch, start_i, elapsed, history = st["step"], st["epoch"], st["in_epoch"], st["elapsed"], st["history"]
        order = st["order"].to(engine.device) if st["order"] is not None else None
        targets = st["targets"] if st["targets"] is not None else targets
        bar.update(step)
        tqdm.write(f"resumed from {run_dir / CHECKPOINT} at step {step} (epoch {epoch})")
    t0 = time.perf_counter() - elapsed
    here, t_warm = 0, 0.0  # steps run by this process; when its warm-up steps ended
    while step < total_steps:
        if order is None:
            order = torch.randperm(n, generator=gen).to(engine.device)
        for i in range(start_i, steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size][d.rank::d.world]
            x, y = engine.batch(x_all[idx]), y_all[idx]
            if poison is not None:
                x, y = poison.apply(x, y, idx, generator)
            x = augment_batch(x, pad, flip)
            if step == warmup_steps and targets is None and learned:
                targets = attack_targets(cfg, k, class_confusion(classifier, data, engine))
            joint = learned and step >= warmup_steps
            with engine.autocast():
                if not joint:
                    logits = fwd_f(x)
                    loss = F.cross_entropy(logits.float(), y)
                    parts = {"ce": loss.item()} if step % 50 == 0 else {}
                else:
                    progress = (step - warmup_steps) / max(1, (total_steps - warmup_steps) * cfg.eps_anneal) if cfg.eps_anneal > 0 else 1.0
                    generator.eps = cosine(cfg.eps_start, cfg.eps, progress)
                    if target_rows is None:  # the (K, K) float rows, moved to the device once
                        target_rows = targets.to(engine.device).float()
                    ramp = cfg.gamma_ramp_epochs * steps_per_epoch
                    gamma = cfg.gamma * min(1.0, (step - warmup_steps + 1) / ramp) if ramp > 0 else cfg.gamma
                    jl = joint_loss(fwd_f, fwd_g, x, y, target_rows, objective, cfg, gamma, n_bd, split_passes)
                    loss, mse, ce, bd = jl.total, jl.mse, jl.ce, jl.backdoor
                    parts = {"mse": mse.item(), "ce": ce.item(), "bd": bd.item(), "eps": generator.eps} if step % 50 == 0 else {}
            if not torch.isfinite(all_mean(loss, d)):  # the same verdict on every rank
                bar.close()
                raise NonFiniteLossError(f"the loss became {loss.item()} at step {step} (epoch {epoch}); lower lr or gamma")
            opt.zero_grad(set_to_none=True)
            if opt_g is not None:
                opt_g.zero_grad(set_to_none=True)
            loss.backward()
            # clipping keeps the joint objective from blowing up when F cannot yet tell x* from x
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if opt_g is not None:
                torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip)
            opt.step()
            if opt_g is not None and joint:
                opt_g.step()
            sched.step()
            step += 1
            here += 1
            if here == 2:
                t_warm = time.perf_counter()
            bar.update(1)
            if parts:
                bar.set_postfix({k_: f"{v:.3g}" for k_, v in parts.items()}, refresh=False)
            if every and d.is_main and step % every == 0 and step < total_steps:
                state = {"step": step, "epoch": epoch, "in_epoch": i + 1, "order": order.cpu(), "history": history,
                         "targets": targets, "elapsed": time.perf_counter() - t0}
                save_checkpoint(run_dir, capture(classifier, generator, opt, opt_g, sched, gen, state))
        start_i, order = 0, None
        epoch += 1
        if cfg.extra.get("eval_each_epoch", True):
            # on the validation split, never the test set: these numbers are what a user (or a
            # sweep) watches to choose epochs and settings; without a split, time only
            m: dict[str, Any] = {}
            if data.has_val:
                m = evaluate_models(classifier, generator, data, engine, targets, cfg.full_range, cfg.eval_batch_size,
                                    stealth=False, dist=d, split="val")
            m.update(epoch=epoch, step=step, seconds=round(time.perf_counter() - t0, 2), split="val" if data.has_val else None)
            history.append(m)
            line = f"epoch {epoch}: val CA {m['ca']:.4f}" if data.has_val else f"epoch {epoch} (no validation split)"
            if data.has_val and generator is not None and targets is not None:
                line += f"  ASR {m['asr']:.4f}  DS {m['ds']:.4f}  DS-min {m['ds_min']:.4f}"
            if d.is_main:
                tqdm.write(line + f"  ({m['seconds']:.0f} s)")
            classifier.train()
            if learned:
                generator.train()
    bar.close()
    t_end = time.perf_counter()
    seconds = t_end - t0
    classifier.eval()
    if generator is not None:
        generator.eval()
    if learned:
        generator.eps = cfg.eps
    ips = total_steps * cfg.batch_size / max(seconds, 1e-9)  # global images/s
    # per-epoch evaluation, when on, falls inside both windows (the bench turns it off)
    steady = (here - 2) * cfg.batch_size / max(t_end - t_warm, 1e-9) if here > 2 else ips
    return TrainResult(classifier, generator, targets, history, seconds, ips, steady)
