"""The run folder: the one contract between training, evaluation, the tables and the defenses.
Every reader opens one through :class:`RunFolder`; :func:`is_finished` is the one rule for a
finished run; :func:`writer_lock` keeps a second writer out.

    RUN_DIR/
      config.yaml               the resolved TrainConfig
      metrics.json              ca, asr, asr_c, ds, ds_min, d_p, psnr, ssim, linf (+ extras)
      history.json              per-epoch CA / ASR / DS during training
      predictions.npz           y_true, y_pred_clean, y_pred_backdoor, target_sets (N, K) bool,
                                psnr, ssim, linf per test image
      targets.json              the (K, K) target sets as lists, by source class
      classifier.safetensors    weights (safetensors: loading never runs code)
      generator.safetensors     trigger generator weights (attacks only)
      figures/triggers.png      clean / backdoor / amplified residual (paper Fig. 4)
      figures/confidences.png   softmax of 3 backdoor images per true class (paper Fig. 5)
      figures/histograms.png    backdoor prediction histogram per source class (with Fig. 8: compare)
      split.json                the validation split: held-out training indices, their sha256, sizes
      .lock                     held (flock) by the process writing the folder; see writer_lock
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, TrainConfig, config_from_run
from .formatting import first_line

METRIC_KEYS = ("ca", "asr", "asr_c", "ds", "ds_min", "d_p", "psnr", "ssim", "linf")


@dataclass
class Predictions:
    """Per test image: the true class, the clean and the backdoor prediction, and the trigger's
    stealth (PSNR, SSIM, L-inf); what predictions.npz holds and every metric is computed from."""

    y_true: np.ndarray
    y_pred_clean: np.ndarray
    y_pred_backdoor: np.ndarray | None
    psnr: np.ndarray | None
    ssim: np.ndarray | None
    linf: np.ndarray | None


def is_finished(run_dir: str | Path) -> bool:
    """The one rule for "this folder holds a finished run": metrics.json is there and status.json
    says finished -- or is absent (folders written before status.json existed). Training writes
    status "running" first and "finished" last, so a crash between the two never counts."""
    run_dir = Path(run_dir)
    status = run_dir / "status.json"
    if not (run_dir / "metrics.json").is_file():
        return False
    if not status.is_file():
        return True
    try:
        state = json.loads(status.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("state") == "finished"  # a hand-edited "finished" is no record


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file 0600; a result should get the mode any new file gets (0644 under the
# usual umask 022), so that colleagues on a shared cluster can read a run folder
_FILE_MODE = 0o666 & ~_umask()


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null means "not defined for this run"
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _jsonable(v.item())
    return v


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda t: Path(t).write_text(text))


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(_jsonable(obj), indent=2)
    _atomic_write(path, lambda t: Path(t).write_text(text + "\n"))


class RunFileError(ConfigError):
    """A file of a run folder (config.yaml, a JSON file, weights, predictions) exists but cannot be
    used: damaged, truncated, hand-edited, or (weights) of another shape than the run's config
    builds. One line naming the file, never a parser's traceback."""


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn a parser's failure on ``path`` into a :class:`RunFileError` that names the file."""
    try:
        yield
    except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError, yaml.YAMLError, SafetensorError) as e:
        if isinstance(e, (FileNotFoundError, ConfigError)):
            raise
        raise RunFileError(f"{path}: not readable as {what} ({first_line(e)})") from None


def read_json(path: Path) -> Any:
    with reading(Path(path), "JSON"):
        return json.loads(Path(path).read_text())


def _record(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (status.json, split.json); anything else is damage."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: not readable as a record (a JSON object was expected, got {type(data).__name__})")
    return data


def save_weights(path: Path, module: nn.Module) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    _atomic_write(path, lambda t: save_file(tensors, t))


def load_weights(path: Path, module: nn.Module) -> nn.Module:
    with reading(Path(path), "safetensors weights"):
        state = load_file(str(path))
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # a readable file of another shape: a model or data set that is not the run's
        raise RunFileError(f"{path}: the weights do not fit the {type(module).__name__} the run's config builds "
                           f"({first_line(e)}); another architecture, class count or cuba version?") from None
    return module


def save_config(run_dir: Path, cfg: TrainConfig) -> None:
    text = yaml.safe_dump(cfg.to_sections(), sort_keys=False)
    _atomic_write(run_dir / "config.yaml", lambda t: Path(t).write_text(text))


def load_run_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    with reading(path, "a run's config"):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a mapping of sections was expected, got {type(data).__name__}")
    return config_from_run(data)


def save_predictions(run_dir: Path, pred: Predictions, targets: torch.Tensor | None) -> None:
    arrays: dict[str, np.ndarray] = {"y_true": pred.y_true, "y_pred_clean": pred.y_pred_clean}
    for name in ("y_pred_backdoor", "psnr", "ssim", "linf"):
        v = getattr(pred, name)
        if v is not None:
            arrays[name] = np.asarray(v)
    if targets is not None:
        arrays["target_sets"] = targets.numpy()[pred.y_true]  # each sample's T(y) as a K-long bool row
        arrays["target_matrix"] = targets.numpy()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    _atomic_write(run_dir / "predictions.npz", write)


def load_predictions(run_dir: Path) -> tuple[Predictions, torch.Tensor | None]:
    path = Path(run_dir) / "predictions.npz"
    with reading(path, "predictions (.npz)"), np.load(path, allow_pickle=False) as z:
        get = lambda k: z[k] if k in z.files else None  # noqa: E731
        pred = Predictions(z["y_true"], z["y_pred_clean"], get("y_pred_backdoor"), get("psnr"), get("ssim"), get("linf"))
        tm = get("target_matrix")
    return pred, torch.from_numpy(tm) if tm is not None else None


class RunLockedError(ConfigError):
    """Another live process is writing this run folder."""


@contextmanager
def writer_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR/.lock exclusively while a process writes the folder.

    Why: two ``cuba train`` commands started into the same ``--out`` (say seeds 0 and 1) both ran
    to "finished" and left a folder mixing their files. The second writer is now refused with a
    one-line error naming the holder's pid. ``flock`` locks die with their process, so a run killed
    by SIGKILL leaves no stale lock and resumes as before. Under torchrun only rank 0 takes it
    (the other ranks belong to the same run). Where ``fcntl`` does not exist (Windows) there is no
    lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    f = open(Path(run_dir) / ".lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunLockedError(f"{run_dir} is being written by another process (pid {holder}); "
                                 "wait for it to finish or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()  # closing the file releases the lock


def default_run_dir(cfg: TrainConfig, root: str | Path = "runs") -> Path:
    import time

    name = cfg.name or f"{Path(cfg.dataset).stem}-{safe_name(cfg.model)}-{cfg.label()}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(root) / name


def safe_name(text: str) -> str:
    """``text`` usable in a file name on every file system: ``torchvision:resnet18`` ->
    ``torchvision-resnet18`` (':' is illegal on Windows, '/' everywhere)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "run"


class RunFolder:
    """One run folder (the layout in this module's docstring), the way every reader of a run opens
    it: training (to resume or skip), evaluate, figures, compare, the tables, the defenses and
    import-model. Reading goes through here so that "finished", "its config" and "its models"
    mean one thing everywhere."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def is_run(self) -> bool:
        """A run folder at all: it has its config.yaml."""
        return self.has("config.yaml")

    def is_finished(self) -> bool:
        return is_finished(self.path)

    def require(self, *names: str, finished: bool = False) -> "RunFolder":
        """Itself, or FileNotFoundError naming what is missing (for commands given a path)."""
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or directory")
        if self.path.is_file():  # e.g. a pack from `cuba pack`, given to a command that needs the folder
            raise FileNotFoundError(f"{self.path} is a file, not a run folder (a pack from `cuba pack` is read by "
                                    "cuba evaluate and cuba defend)")
        missing = [n for n in ("config.yaml", *names) if not self.has(n)]
        if missing or (finished and not self.is_finished()):
            why = f"no {', '.join(missing)}" if missing else "status.json does not say finished"
            raise FileNotFoundError(f"{self.path} is not a {'finished ' if finished else ''}run folder ({why})")
        return self

    def config(self) -> TrainConfig:
        return load_run_config(self.path)

    def metrics(self) -> dict[str, Any]:
        """metrics.json, or {} before the run has written it."""
        return read_json(self.path / "metrics.json") if self.has("metrics.json") else {}

    def status(self) -> dict[str, Any]:
        return _record(self.path / "status.json") if self.has("status.json") else {}

    def failed_before_checkpoint(self) -> bool:
        """Training failed before its first checkpoint (a bad value, missing data): the folder holds
        a config and nothing trained, so a corrected command may take it over."""
        return self.status().get("state") == "failed" and not self.has("checkpoint.pt")

    def predictions(self) -> tuple[Predictions, torch.Tensor | None]:
        return load_predictions(self.path)

    def targets(self) -> torch.Tensor | None:
        """The (K, K) target sets the run trained with (stored in predictions.npz), or None."""
        return load_predictions(self.path)[1] if self.has("predictions.npz") else None

    def data(self, cfg: TrainConfig) -> Any:
        """The run's data set, holding out the very images its split.json recorded (when it has
        one), not whatever the current rule would draw: GTSRB's split became track-aware after
        runs had been trained on the image-by-image one, and a defense calibrated on a new draw
        would read images the model trained on as held-out ones."""
        from .data import data_for

        recorded = None
        if self.has("split.json"):
            path = self.path / "split.json"
            with reading(path, "a validation split"):
                recorded = [int(i) for i in _record(path).get("val_indices") or []]
        return data_for(cfg, val_indices=recorded)

    def models(self, cfg: TrainConfig, data: Any, engine: Any) -> tuple[nn.Module, nn.Module | None]:
        """The classifier (and trigger generator) rebuilt from the config and the safetensors
        weights, on the engine's device, in eval mode."""
        from .attack import build_trigger
        from .models import build_classifier

        try:  # an own model whose module cannot be imported here: one error line, not a traceback
            classifier = build_classifier(cfg.model, data.channels, data.num_classes, data.image_size)
        except ValueError as e:
            raise ConfigError(f"{self.path}: its model cannot be rebuilt: {e}") from None
        load_weights(self.path / "classifier.safetensors", classifier)
        generator = build_trigger(cfg, data.channels, data.image_size)
        if generator is not None:
            load_weights(self.path / "generator.safetensors", generator)
        return engine.prepare(classifier).eval(), (engine.prepare(generator).eval() if generator is not None else None)

    def models_in_layout(self, cfg: TrainConfig, data: Any, engine: Any) -> tuple[nn.Module, nn.Module | None, Any]:
        """:meth:`models`, and the engine to run them with: the given one, or its NCHW twin when the
        classifier's forward refuses channels_last -- a model that flattens a convolution's output
        with ``.view`` (common in older code, e.g. a model under audit) cannot take that layout's
        strides, and is slower NCHW but correct. Probed on two test images."""
        import dataclasses

        classifier, generator = self.models(cfg, data, engine)
        if engine.channels_last:
            try:
                with torch.no_grad():
                    classifier(engine.batch(data.x_test[:2]))
            except RuntimeError:
                engine = dataclasses.replace(engine, channels_last=False)
                classifier, generator = self.models(cfg, data, engine)
        return classifier, generator, engine

    def lock(self) -> Any:
        """:func:`writer_lock` on this folder (a context manager)."""
        return writer_lock(self.path)
