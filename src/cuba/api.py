"""cuba from Python: attack your own model on your own data, audit it, load runs and packs.

    from cuba import api

    run = api.attack(classifier=MyNet, dataset="digits", attack="cuba", variant="fra")
    print(run.metrics["ca"], run.metrics["asr"], run.metrics["ds"])
    strip = api.defend(run, "strip")          # the defense's defense.json fields

``classifier`` is a registered name (``simplecnn``), ``torchvision:NAME``, ``timm:NAME``, a
``"package.module:factory"`` path, or the factory itself -- a function or an ``nn.Module`` class
taking whichever of ``in_channels``, ``num_classes``, ``image_size`` it needs -- or a module
instance (trained from its current weights). It must map [0, 1] images (B, C, H, W) to logits.
A factory or instance is recorded in the run's config by its import path, so the command line
(``cuba evaluate``, ``cuba defend``) can rebuild the model later; define it at the top level of
an importable module for that (a class defined in ``__main__`` works within the same process).

Data: a named data set or path (``dataset=``, as on the command line), or arrays
(``train=(x, y), test=(x, y)``: uint8 images N x H x W or N x H x W x C, or float [0, 1]
tensors N x C x H x W, and integer labels), which are written to the run folder as ``data.npz``
so that the run stays self-contained.

Every other keyword is a config field (``epochs=``, ``tau=``, ``attack.gamma=`` is not valid
Python: use ``gamma=``); a named data set gets its preset first, as ``cuba train`` does.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ConfigError, TrainConfig, make_config
from .runs import RunFolder

Arrays = tuple[Any, Any]


@dataclass
class Run:
    """A finished run: its folder, config and metrics; models are rebuilt on demand."""

    path: Path
    config: TrainConfig
    metrics: dict[str, Any] = field(default_factory=dict)

    def models(self, device: str = "cpu") -> tuple[nn.Module, nn.Module | None]:
        """(classifier, trigger generator or None), in eval mode, fp32."""
        from .engine import make_engine

        folder = RunFolder(self.path)
        return folder.models(self.config, folder.data(self.config), make_engine(device, "fp32", channels_last=False))


def _model_path(classifier: Any) -> str:
    """The config's ``model`` for whatever ``classifier`` is (see the module docstring)."""
    from .models.external import register_instance

    if isinstance(classifier, str):
        return classifier
    if isinstance(classifier, nn.Module):
        path = f"{type(classifier).__module__}:{type(classifier).__qualname__}"
        register_instance(path, classifier)  # this process trains the given instance
        return path
    if callable(classifier) and hasattr(classifier, "__qualname__"):
        if "<locals>" in classifier.__qualname__ or "<lambda>" in classifier.__qualname__:
            raise ConfigError(f"classifier: {classifier.__qualname__} cannot be imported later; define it at "
                              "the top level of a module")
        return f"{classifier.__module__}:{classifier.__qualname__}"
    raise ConfigError(f"classifier: a model name, a factory or an nn.Module, got {type(classifier).__name__}")


def _as_uint8_images(x: Any, what: str) -> np.ndarray:
    """N x H x W (x C) uint8, from uint8 arrays or float [0, 1] N x C x H x W tensors."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype == np.uint8 and a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[3] not in (1, 3):
        a = a.transpose(0, 2, 3, 1)  # N x C x H x W bytes -> the npz layout N x H x W x C
    if a.dtype != np.uint8:
        if a.ndim != 4 or a.min() < 0 or a.max() > 1:
            raise ConfigError(f"{what}: float images must be N x C x H x W in [0, 1], got shape {a.shape}")
        a = np.round(a.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    return a


def _write_arrays(out: Path, train: Arrays, test: Arrays) -> Path:
    arrays = {"x_train": _as_uint8_images(train[0], "train"), "y_train": np.asarray(train[1]).astype(np.int64),
              "x_test": _as_uint8_images(test[0], "test"), "y_test": np.asarray(test[1]).astype(np.int64)}
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "data.npz", **arrays)
    return out / "data.npz"


def attack(
    classifier: Any = "simplecnn", *, dataset: str | None = None, train: Arrays | None = None, test: Arrays | None = None,
    attack: str = "cuba", variant: str = "fra", out: str | Path | None = None, overwrite: bool = False, **fields: Any,
) -> Run:
    """Train ``classifier`` with a backdoor (``attack="none"``: a clean reference) and evaluate it;
    writes a run folder (``out``, default under ./runs) and returns it as a :class:`Run`."""
    from .cli.common import preset, preset_for
    from .pipeline import run_training
    from .runs import default_run_dir

    if (train is None) != (test is None):
        raise ConfigError("train and test: give both (arrays), or neither and a dataset")
    if train is not None and dataset is not None:
        raise ConfigError("give a dataset or train/test arrays, not both")
    values: dict[str, Any] = {}
    name = preset_for(dataset) if dataset is not None else None
    if name is not None:
        values.update(preset(name))
    values.update(dataset=dataset or "digits", model=_model_path(classifier), attack=attack, variant=variant, **fields)
    cfg = make_config(values)  # every field checked before anything is written
    if train is not None:  # arrays: the run folder keeps them, named after them
        run_dir = Path(out) if out is not None else default_run_dir(dataclasses.replace(cfg, dataset="arrays"))
        cfg = make_config({**values, "dataset": str(_write_arrays(run_dir, train, test))})
    else:
        run_dir = Path(out) if out is not None else default_run_dir(cfg)
    run_dir, metrics = run_training(dataclasses.replace(cfg, out=str(run_dir)), overwrite=overwrite)
    return Run(Path(run_dir), RunFolder(run_dir).config(), metrics)


def load(path: str | Path) -> Run:
    """A finished run folder, or a pack (``cuba pack``), as a :class:`Run`."""
    from .pack import open_run

    folder = open_run(path).require(finished=True)
    return Run(folder.path, folder.config(), folder.metrics())


def defend(run: Run | str | Path, name: str, out: str | Path | None = None, device: str = "auto",
           **params: Any) -> dict[str, Any]:
    """Run one defense on a run (or run folder / pack path); returns its defense.json fields.
    Parameters are the defense's own (e.g. ``n_eval=500`` for STRIP)."""
    from .defenses import DEFENSES, load_attack_run, run_defense

    if name not in DEFENSES:
        raise ConfigError(f"defense: must be one of {', '.join(DEFENSES)}, got {name!r}")
    accepted = set(inspect.signature(DEFENSES[name].__init__).parameters) - {"self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"{name} has no parameter {', '.join(unknown)}")
    attack_run = load_attack_run(run.path if isinstance(run, Run) else run, device=device)
    result = run_defense(name, attack_run, Path(out) if out is not None else None, **params)
    return {**result.to_json(), "seconds": result.seconds}


__all__ = ["Run", "attack", "defend", "load"]
