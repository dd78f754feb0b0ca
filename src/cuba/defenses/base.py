"""What every defense shares: the attacked run it inspects, its result, and the registry.

The contract with the attacks is the run folder (:mod:`cuba.runs`): a defense never needs to
know how a model was trained. :func:`load_attack_run` rebuilds the classifier, the trigger and
the target sets from a run folder once; each defense takes that :class:`AttackRun` and returns
a :class:`DefenseResult` -- the numbers for ``defense.json`` plus the figures it drew.

Clean data a defender holds: by convention a defense draws its clean reference images (STRIP's
overlays, Neural Cleanse's optimisation batch, the 5% fine-tuning set of Fine-pruning and NAD,
SentiNet's held-out images) from the *training* set, and measures detection and removal on the
*test* set, so no image is both fitted on and scored.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from ..attack import PatchTrigger, attack_targets
from ..config import ConfigError, TrainConfig
from ..data import ImageDataset
from ..engine import Engine, make_engine
from ..runs import load_predictions, load_run_config, write_json


@dataclass
class AttackRun:
    """A trained run as the defenses see it: models in eval mode, data in memory."""

    run_dir: Path
    cfg: TrainConfig
    data: ImageDataset
    classifier: nn.Module
    trigger: nn.Module | None  # None for a clean model
    targets: torch.Tensor | None  # (K, K) bool target sets; None for a clean model
    engine: Engine
    _bd_cache: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def images(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float [0, 1] on the device (fp32, contiguous)."""
        return x_uint8.to(self.engine.device).float().div_(255.0)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """fp32 logits of float images, in batches (defenses score in fp32, like evaluation)."""
        return torch.cat([self.classifier(xb).float() for xb in x.split(batch_size)])

    @property
    def trigger_kind(self) -> str:
        return "run trigger" if self.trigger is not None else "probe patch (clean model: a 3x3 white patch it never learned)"

    def backdoor(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered twins of ``x``. A clean model has no trigger; it gets a 3x3 white probe patch,
        so input-level detectors still have a negative control (they should not separate it)."""
        trig = self.trigger
        if trig is None:
            trig = PatchTrigger(self.data.channels, self.data.image_size, 3).to(self.engine.device)
        with torch.no_grad():
            return torch.cat([trig(xb).float() for xb in x.split(1024)])

    def attacked_test(self, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Test images of attacked classes (non-empty T(y)) and labels, at most ``n``, random order."""
        y = self.data.y_test
        keep = torch.ones_like(y, dtype=torch.bool) if self.targets is None else self.targets.any(1)[y]
        idx = keep.nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))][:n]
        return self.images(self.data.x_test[idx]), y[idx].to(self.engine.device)

    @torch.inference_mode()
    def ca_asr(self, model: nn.Module | None = None) -> tuple[float, float | None]:
        """CA on the whole test set and ASR (the run's success rule) of ``model`` (default: the run's).

        Mitigation defenses call this after each repair step; the backdoor test images are
        made once and cached. ASR is None for a clean model.
        """
        model = model or self.classifier
        was_training = model.training
        model.eval()
        x = self.images(self.data.x_test)
        y = self.data.y_test.to(self.engine.device)
        pred = torch.cat([model(xb).float().argmax(1) for xb in x.split(2048)])
        ca = float((pred == y).float().mean())
        asr = None
        if self.trigger is not None and self.targets is not None:
            if self._bd_cache is None:
                xa, ya = self.attacked_test()
                self._bd_cache = (self.backdoor(xa), ya)
            xb_all, ya = self._bd_cache
            pb = torch.cat([model(xb).float().argmax(1) for xb in xb_all.split(2048)])
            asr = float(self.targets.to(pb.device)[ya, pb].float().mean())
        model.train(was_training)
        return ca, asr

    def clean_train(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random clean training images and labels (the defender's clean data)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.data.y_train), generator=g)[:n]
        return self.images(self.data.x_train[idx]), self.data.y_train[idx].to(self.engine.device)


def load_attack_run(run_dir: str | Path, device: str = "auto", data: ImageDataset | None = None) -> AttackRun:
    """Rebuild a run's models and data from its folder (config.yaml + safetensors + targets)."""
    from ..pipeline import load_data, load_models

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "classifier.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder (needs config.yaml and classifier.safetensors)")
    cfg = load_run_config(run_dir)
    engine = make_engine(device, "fp32", channels_last=False)
    data = data if data is not None else load_data(cfg)
    classifier, trigger = load_models(run_dir, cfg, data, engine)
    for m in (classifier, trigger):
        if m is not None:
            m.requires_grad_(False)
    targets = None
    if cfg.is_attack:
        targets = load_predictions(run_dir)[1] if (run_dir / "predictions.npz").is_file() else None
        targets = targets if targets is not None else attack_targets(cfg, data.num_classes)
    return AttackRun(run_dir, cfg, data, classifier, trigger, targets, engine)


@dataclass
class DefenseResult:
    """A defense's outcome: ``fields`` go to defense.json as they are; ``figures`` were written by it."""

    defense: str
    fields: dict[str, Any]
    params: dict[str, Any]
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"defense": self.defense, "seconds": round(self.seconds, 2), "params": self.params,
                **self.fields, "figures": [p.name for p in self.figures]}


class Defense(ABC):
    """A backdoor defense. Subclasses set ``name``, validate parameters in ``__init__`` and implement ``run``.

    ``needs_trigger``: input-level detectors score backdoor inputs, so a clean model (no
    trigger) is only scored on clean inputs; see :func:`run_defense`.
    """

    name: ClassVar[str]
    needs_trigger: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    @property
    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @abstractmethod
    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        """Inspect (or repair) ``run``; draw figures into ``out``; return the numbers."""

    @classmethod
    def headline(cls, fields: dict[str, Any]) -> str:
        """The numbers a reader needs from this defense's defense.json, in one line (``cuba defend``
        prints it, ``cuba defense-table`` puts it in a cell). Override per defense."""
        return f"AUROC {fields['auroc']:.3f}" if "auroc" in fields else "(see defense.json)"


def roc_summary(s_clean: np.ndarray, s_bd: np.ndarray, fpr_at: float = 0.05) -> dict[str, float]:
    """AUROC of a detector score (higher = more suspicious), backdoor vs clean inputs, and its
    TPR at the largest threshold whose FPR is at most ``fpr_at`` (sklearn's ROC)."""
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_bd))]
    scores = np.r_[s_clean, s_bd]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"auroc": float(roc_auc_score(labels, scores)), f"tpr_at_fpr_{round(100 * fpr_at)}pct": float(tpr[fpr <= fpr_at].max())}


def pct(v: float | None) -> str:
    """A rate in [0, 1] as a percentage with one decimal; "–" where it is not defined (None)."""
    return "–" if v is None else f"{100 * v:.1f}"


def at_chance(ca: float | None, num_classes: int | None) -> bool:
    """True when a mitigation left clean accuracy under twice chance (2/K): the model has
    (nearly) stopped classifying, and an ASR measured on it no longer means a backdoor."""
    return ca is not None and bool(num_classes) and ca < 2.0 / num_classes


def removal_headline(rows: list[dict[str, Any]], key: str, num_classes: int | None = None) -> str:
    """First and last row of a mitigation curve (Fine-pruning, NAD) as CA/ASR in %.

    With ``num_classes``, a last model whose CA is under twice chance is said to be so: its ASR
    then counts where a model that no longer classifies happens to point, not a backdoor.
    """
    first, last = rows[0], rows[-1]
    text = f"{key} {first[key]:g}: {pct(first['ca'])}/{pct(first['asr'])} → {last[key]:g}: {pct(last['ca'])}/{pct(last['asr'])} (CA/ASR)"
    if last["asr"] is not None and at_chance(last["ca"], num_classes):
        text += f" — CA at chance level (K={num_classes}): ASR not meaningful"
    return text


DEFENSES: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make a defense available to ``cuba defend NAME``."""
    DEFENSES[cls.name] = cls
    return cls


def check_param(name: str, ok: bool, allowed: str, value: Any) -> None:
    """One-line parameter validation, in the style of the config's errors."""
    if not ok:
        raise ConfigError(f"{name}: must be {allowed}, got {value!r}")


def run_defense(name: str, run: AttackRun, out: Path | None = None, **params: Any) -> DefenseResult:
    """Run one registered defense on ``run``; write OUT/NAME/defense.json (default RUN_DIR/defenses/NAME)."""
    if name not in DEFENSES:
        raise ConfigError(f"defense: must be one of {', '.join(DEFENSES)} or all, got {name!r}")
    folder = (out or run.run_dir / "defenses") / name
    folder.mkdir(parents=True, exist_ok=True)
    defense = DEFENSES[name](**params)
    t0 = time.perf_counter()
    result = defense.run(run, folder)
    result.seconds = time.perf_counter() - t0
    write_json(folder / "defense.json", {"run": str(run.run_dir), "setting": run.cfg.label(), **result.to_json()})
    return result
