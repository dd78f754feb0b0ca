"""One run end to end: load data -> train -> evaluate -> write the run folder; and its re-evaluation."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import CHECKPOINT
from .config import ConfigError, TrainConfig, setting_differences
from .data import ImageDataset, data_for
from .distributed import finish, setup
from .engine import Engine, make_engine
from .data.split import VAL_GROUPS, VAL_SEED, indices_hash
from .metrics import at_chance
from .evaluate import evaluate_models, metrics_from_predictions, predict
from .figures import plot_confidences, plot_histograms, plot_triggers
from .attack import OBJECTIVES, POISON_ATTACKS
from .runs import (
    METRIC_KEYS, RunFileError, RunFolder, default_run_dir, save_config, save_predictions, save_weights, write_json,
    writer_lock,
)
from .train import train


def schedule_warning(cfg: TrainConfig) -> str | None:
    """A warning for a learned attack whose every step is warm-up: the run is a clean classifier with
    an untrained generator under the attack's name, its ASR only the clean mistakes. A warning, not an
    error: a fraction of an epoch is how a plumbing check or a test runs the command quickly."""
    if cfg.attack in OBJECTIVES and cfg.epochs <= cfg.warmup_epochs:
        return (f"epochs {cfg.epochs:g} leaves no joint training after warmup_epochs {cfg.warmup_epochs:g}: the "
                "backdoor is never trained, and this run's ASR/DS are not a result (give more epochs, or "
                "--set warmup_epochs=W with W < epochs)")
    return None


def degenerate_reason(ca: float | None, num_classes: int) -> str | None:
    """Why a model's ASR/DS are not a result, or None. A classifier at chance level (CA < 2/K)
    makes every backdoor "succeed" for free: it misclassifies clean images just as well."""
    if at_chance(ca, num_classes):
        return f"CA {100 * ca:.2f}% is at chance level (< 2/K = {200.0 / num_classes:.1f}%): the classifier did not learn"
    return None


def split_record(data: ImageDataset, cfg: TrainConfig) -> dict[str, Any]:
    """split.json: which training images were held out for validation, so any run can be checked
    against another (same hash = same held-out images) and re-created exactly."""
    val = data.val_indices
    return {
        "val_fraction": cfg.val_fraction, "val_seed": VAL_SEED if val is not None else None,
        "stratified": True, "val_group_size": VAL_GROUPS.get(data.name, 1) if val is not None else None,
        "n_train_full": data.n_train_full or len(data.y_train),
        "n_val": 0 if val is None else len(val), "n_train": len(data.y_train), "n_test": len(data.y_test),
        "n_train_subset_seed": cfg.seed if cfg.n_train else None,
        "val_indices_sha256": indices_hash(val) if val is not None else None,
        "val_indices": [] if val is None else val.tolist(),
    }


def _figures(run_dir: Path, cfg: TrainConfig, data: ImageDataset, classifier: torch.nn.Module,
             generator: torch.nn.Module | None, engine: Engine, pred: Any, targets: torch.Tensor | None) -> list[Path]:
    """Draw a backdoored run's figures into RUN/figures (nothing for a clean run); return their paths."""
    if generator is None or targets is None:
        return []
    shown = range(min(data.num_classes, 10))
    # one test image per class (the first of each) for the trigger figure, three for the confidences
    first = [int((data.y_test == c).nonzero()[0]) for c in shown if (data.y_test == c).any()]
    three = [int(i) for c in shown for i in (data.y_test == c).nonzero().flatten()[:3]]
    with torch.inference_mode():
        x = engine.batch(data.x_test[first])
        xb = generator(x).float()
        probs = classifier(generator(engine.batch(data.x_test[three])).float()).float().softmax(1).cpu().numpy()
    name = f"{data.name} {cfg.model} {cfg.label()}"
    return [
        plot_triggers(x.float().cpu(), xb.cpu(), run_dir / "figures" / "triggers.png", [data.classes[data.y_test[i]] for i in first]),
        plot_confidences(probs, data.y_test[three].numpy(), targets, run_dir / "figures" / "confidences.png", data.classes,
                         title=f"{name}: confidence of 3 backdoor images per true class (blue box: true class)"),
        plot_histograms(pred.y_true, pred.y_pred_backdoor, targets, cfg.full_range, run_dir / "figures" / "histograms.png",
                        data.classes, title=f"{name}: backdoor predictions per source class"),
    ]


def draw_figures(run_dir: Path, device: str = "auto", data_dir: str | None = None) -> list[Path]:
    """(Re)draw a finished run's figures from its weights and predictions.npz (e.g. for a run
    trained before a figure was added); a clean run has none. ``data_dir``: where this reader keeps
    the run's data set, as for :func:`evaluate_run`."""
    run = RunFolder(run_dir).require("predictions.npz", finished=True)
    cfg = run.config()
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    engine = make_engine(device, "fp32", channels_last=False)  # figures show fp32 numbers, like evaluation
    data = run.data(cfg)
    classifier, generator = run.models(cfg, data, engine)
    pred, targets = run.predictions()
    return _figures(run.path, cfg, data, classifier, generator, engine, pred, targets)


def run_training(cfg: TrainConfig, run_dir: Path | None = None, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train, evaluate and write a complete run folder; return (run_dir, metrics).

    Re-running into a folder continues it: a finished run is returned as it is, an interrupted
    one resumes from its checkpoint (the same setting is required), unless ``overwrite``.
    ``status.json`` says running / finished / failed (with the error).
    """
    run_dir = Path(run_dir or cfg.out or default_run_dir(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    with writer_lock(run_dir):
        return _train_into(cfg, run_dir, overwrite)


def _finished_run(cfg: TrainConfig, run_dir: Path, overwrite: bool) -> dict[str, Any] | None:
    """The stored metrics when ``run_dir`` already holds this setting finished (None: train or
    resume); a folder holding another setting is a ConfigError unless ``overwrite`` or it failed
    before its first checkpoint."""
    run = RunFolder(run_dir)
    if not run.is_run() or overwrite:
        return None
    if run.failed_before_checkpoint():
        return None  # nothing trained there (a bad value, missing data): a corrected command takes it over
    diff = setting_differences(run.config(), cfg)
    if diff:
        raise ConfigError(f"{run_dir} holds a run of a different setting ({'; '.join(diff[:3])}); "
                          "choose another --out or pass --overwrite")
    if run.is_finished():
        print(f"{run_dir} is already finished; its stored metrics follow (--overwrite retrains)", flush=True)
        return run.metrics()
    return None


def _resumed_data(cfg: TrainConfig, run_dir: Path) -> ImageDataset:
    """The data a run trains on: a resumed run keeps the validation split it started with (its
    split.json, written before the first step), whatever the current rule draws; a checkpoint from
    before split.json was written first is refused where the rule has changed since (GTSRB)."""
    from .data.split import VAL_GROUPS

    run = RunFolder(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        return data_for(cfg)
    if run.has("split.json"):
        return run.data(cfg)
    if VAL_GROUPS.get(str(cfg.dataset).lower(), 1) > 1:
        raise ConfigError(f"{run_dir}: its checkpoint predates the track-aware validation split of "
                          f"{str(cfg.dataset).lower()}, and the split it trained with was not recorded; pass --overwrite")
    return data_for(cfg)


def _train_into(cfg: TrainConfig, run_dir: Path, overwrite: bool) -> tuple[Path, dict[str, Any]]:
    """run_training's body, run while this process holds the folder's writer lock."""
    done = _finished_run(cfg, run_dir, overwrite)
    if done is not None:
        return run_dir, done
    if overwrite and (run_dir / CHECKPOINT).is_file():
        (run_dir / CHECKPOINT).unlink()
    if cfg.deterministic:
        # cuBLAS refuses deterministic mode without a fixed workspace (a RuntimeError at its first call)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    d, device = setup(cfg.device)  # a torchrun launch joins its process group here
    engine = make_engine(device, cfg.precision, cfg.channels_last)
    data = _resumed_data(cfg, run_dir)
    if d.is_main:
        save_config(run_dir, cfg)
        write_json(run_dir / "split.json", split_record(data, cfg))  # a resume trains on this split again
        write_json(run_dir / "status.json", {"state": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                             "pid": os.getpid(), "processes": d.world})
    try:
        result = train(cfg, data, engine, run_dir, dist=d)
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised unchanged
        if d.is_main:
            write_json(run_dir / "status.json", {"state": "failed", "error": f"{type(e).__name__}: {e}",
                                                 "checkpoint": (run_dir / CHECKPOINT).is_file()})
        raise
    warning = schedule_warning(cfg)  # said once the run has trained: a refused command stays one error line
    if warning and d.is_main:
        print(f"cuba: warning: {warning}", file=sys.stderr, flush=True)
    t_eval = time.perf_counter()
    pred = predict(result.classifier, result.generator, data, engine, cfg.eval_batch_size, stealth=True,
                   progress=cfg.progress and d.is_main, dist=d)
    metrics = metrics_from_predictions(pred, result.targets, cfg.full_range)
    if data.has_val:  # the numbers settings are chosen by; the test block above is only reported
        val = evaluate_models(result.classifier, result.generator, data, engine, result.targets, cfg.full_range,
                              cfg.eval_batch_size, stealth=False, dist=d, split="val")
        metrics["val"] = {k: v for k, v in val.items() if not isinstance(v, list)}
    reason = degenerate_reason(metrics.get("ca"), data.num_classes)
    metrics.update(degenerate=reason is not None, degenerate_reason=reason)
    if not d.is_main:  # rank 0 writes the run folder; the others wait for it at the barrier
        finish(d)
        return run_dir, metrics
    metrics.update(
        train_seconds=round(result.seconds, 2), eval_seconds=round(time.perf_counter() - t_eval, 2),
        train_images_per_second=round(result.images_per_second, 1), num_classes=data.num_classes,
        n_train=len(data.y_train), n_val=len(data.y_val) if data.has_val else 0, n_test=len(data.y_test), dataset=data.name, setting=cfg.label(),
        generator_mode=("patch" if cfg.attack in POISON_ATTACKS else cfg.generator_mode) if cfg.is_attack else None,
        device=str(engine.device), bf16=engine.bf16, torch=torch.__version__, cuba=__version__,
        machine=platform.machine(), threads=torch.get_num_threads(), processes=d.world,
    )
    _write_run(run_dir, cfg, data, engine, result, pred, metrics)
    finish(d)
    return run_dir, metrics


def _write_run(run_dir: Path, cfg: TrainConfig, data: ImageDataset, engine: Engine, result: Any, pred: Any,
               metrics: dict[str, Any]) -> None:
    """Write a finished run's folder (rank 0): split, weights, targets, predictions, history,
    figures, metrics, then status "finished" last, so a folder that says finished is complete."""
    write_json(run_dir / "split.json", split_record(data, cfg))
    save_weights(run_dir / "classifier.safetensors", result.classifier)
    if result.generator is not None:
        save_weights(run_dir / "generator.safetensors", result.generator)
    if result.targets is not None:
        write_json(run_dir / "targets.json", {str(c): result.targets[c].nonzero().flatten().tolist() for c in range(data.num_classes)})
    save_predictions(run_dir, pred, result.targets)
    write_json(run_dir / "history.json", result.history)
    _figures(run_dir, cfg, data, result.classifier, result.generator, engine, pred, result.targets)
    write_json(run_dir / "metrics.json", metrics)
    if (run_dir / CHECKPOINT).is_file():
        (run_dir / CHECKPOINT).unlink()  # the weights are saved; the training state is no longer needed
    write_json(run_dir / "status.json", {"state": "finished", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "degenerate": metrics["degenerate"], **({"degenerate_reason": metrics["degenerate_reason"]} if metrics["degenerate"] else {})})


def evaluate_run(run_dir: Path, from_predictions: bool = False, device: str = "auto", write: bool = False,
                 data_dir: str | None = None) -> dict[str, Any]:
    """Recompute a saved run's metrics: from its weights on the test set, or only from predictions.npz.

    With ``write=True`` the recomputed values replace the stored ones in metrics.json (the
    previous values are kept under ``previous``) and predictions.npz is rewritten.
    """
    from .pack import is_pack, open_run

    if write and is_pack(run_dir):
        raise ConfigError(f"{run_dir} is a pack (read-only): --write needs a run folder")
    run = open_run(run_dir).require()
    cfg = run.config()
    if data_dir is not None:  # where this reader keeps the data set (a pack made elsewhere)
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    if from_predictions:
        pred, targets = run.predictions()
        if cfg.is_attack and (pred.y_pred_backdoor is None or targets is None):
            # an attacked run's file without its backdoor half would otherwise read as a clean run's
            raise RunFileError(f"{run.path / 'predictions.npz'}: an attacked run's predictions lack the backdoor "
                               "predictions or target sets; evaluate without --from-predictions")
    else:
        engine = make_engine(device, cfg.precision, cfg.channels_last)
        data = run.data(cfg)
        classifier, generator, engine = run.models_in_layout(cfg, data, engine)
        targets = run.targets()
        pred = predict(classifier, generator, data, engine, cfg.eval_batch_size, stealth=True, progress=cfg.progress)
    metrics = metrics_from_predictions(pred, targets, cfg.full_range)
    stored = run.metrics()
    keys = METRIC_KEYS
    if write and not from_predictions:
        save_predictions(run.path, pred, targets)
        write_json(run.path / "metrics.json", {**stored, **metrics, "previous": {k: stored.get(k) for k in keys}})
    metrics["stored"] = {k: stored.get(k) for k in keys}
    return metrics
