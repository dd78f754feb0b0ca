"""What ART is handed: a cuba model as ART's ``PyTorchClassifier``, and a poisoning run's
training set as arrays, with its poison mask as ground truth.

Why a module of its own: :mod:`cuba.interop.art` runs ART's defenses on cuba runs; everything they
take from cuba -- the wrapped classifier, and the training set to inspect and score against -- is
built here, and is of use without them (any ART attack or defense takes the wrapped model). ART
stays optional: it is imported inside the functions, and a missing ART is the one-line
``ImportError`` :data:`INSTALL_HINT` (``pip install -e '.[art]'``).

* :func:`to_art` -- a run (folder, pack or :class:`~cuba.defenses.AttackRun`) or a bare
  ``nn.Module`` as ART's ``PyTorchClassifier``, in one call: input shape, classes, clip values
  (0, 1) and a loss; no preprocessing (a cuba classifier takes [0, 1] images and normalises
  itself). ART's AC and SS read the output of the wrapped model's *last* top-level child; ART
  means the last hidden layer (its Keras wrapper drops the output layer), but for a PyTorch
  model that child is the whole network, i.e. the logits. The wrapper therefore exposes two
  children, ``output`` (logits, or probabilities) first and ``features`` (the input of the last
  ``nn.Linear``: the penultimate representation AC and SS were designed on) last.
* :func:`poisoned_training_set` -- the training set a BadNets / UBW-P run was trained on, rebuilt
  exactly (the plan is drawn from a fresh generator seeded with the run's seed, first thing in
  :func:`cuba.train.build`), with the poison mask as ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attack import POISON_ATTACKS, make_poison_plan
from ..defenses.base import AttackRun, load_attack_run

if TYPE_CHECKING:
    from art.estimators.classification import PyTorchClassifier

INSTALL_HINT = "IBM's Adversarial Robustness Toolbox is not installed: pip install -e '.[art]'"


def _require_art() -> Any:
    """The ``art`` package, or a one-line ImportError saying how to get it (ART is optional)."""
    try:
        import art
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return art


class _Features(nn.Module):
    """Runs the classifier; returns the input of its head (the penultimate representation) and
    keeps the logits in ``self.logits``. With no head the features are the logits."""

    def __init__(self, classifier: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.classifier = classifier
        self._head = [head]  # a list: the head already lives inside the classifier, register it once
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, seen = self._head[0], []
        hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if head is not None else None
        try:
            self.logits = self.classifier(x).float()
        finally:
            if hook is not None:
                hook.remove()
        return seen[-1].flatten(1) if seen else self.logits


class _Output(nn.Module):
    """Logits as they are, or their softmax (ART's STRIP reads ``predict`` as probabilities)."""

    def __init__(self, probabilities: bool) -> None:
        super().__init__()
        self.probabilities = probabilities

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.softmax(1) if self.probabilities else z


class _ArtView(nn.Module):
    """The classifier as ART should see it: children ``output`` then ``features``, so ART's
    "last layer" (AC, SS) is the penultimate representation while ``predict`` gives the output."""

    def __init__(self, classifier: nn.Module, head: nn.Module | None, probabilities: bool) -> None:
        super().__init__()
        self.output = _Output(probabilities)  # registered first: the order is ART's layer order
        self.features = _Features(classifier, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features(x)
        return self.output(self.features.logits)


class _ProbabilityNLL(nn.modules.loss._Loss):
    """Cross-entropy for a model that outputs probabilities (labels: indices or one-hot rows)."""

    def forward(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.argmax(1) if y.ndim == 2 else y
        return F.nll_loss(p.clamp_min(1e-12).log(), y.long(), reduction=self.reduction)


def _as_run(run: AttackRun | str | Path) -> AttackRun:
    return run if isinstance(run, AttackRun) else load_attack_run(run)


def _head(model: nn.Module, features: str) -> nn.Module | None:
    """The last ``nn.Linear`` of ``model`` (whose input is the penultimate representation), or
    None for ``features="logits"``; a model without one must say ``features="logits"``."""
    if features not in ("penultimate", "logits"):
        raise ValueError(f"features must be 'penultimate' or 'logits', got {features!r}")
    if features == "logits":
        return None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear head to read penultimate features from; pass features='logits'")
    return linears[-1]


def to_art(model: AttackRun | nn.Module | str | Path, input_shape: tuple[int, ...] | None = None,
           nb_classes: int | None = None, *, features: str = "penultimate", probabilities: bool = False,
           device_type: str | None = None) -> "PyTorchClassifier":
    """``model`` as ART's ``PyTorchClassifier``: a run (folder, pack, AttackRun), or an ``nn.Module``
    mapping [0, 1] images (B, C, H, W) to logits, with ``input_shape`` (C, H, W) and ``nb_classes``.

    Why these settings: clip values (0, 1) are the pixel range cuba's attacks work in; no ART
    preprocessing, because a cuba classifier normalises its own input; cross-entropy as the loss
    (on probabilities with ``probabilities=True``, which makes ``predict`` return softmax outputs,
    what ART's STRIP expects). ``features`` chooses what ART's AC/SS read (module docstring).
    """
    _require_art()
    from art.estimators.classification import PyTorchClassifier

    if isinstance(model, (AttackRun, str, Path)):
        run = _as_run(model)
        module, device = run.classifier, run.engine.device
        input_shape = (run.data.channels, run.data.image_size, run.data.image_size)
        nb_classes = run.num_classes
    else:
        if input_shape is None or nb_classes is None:
            raise ValueError("a bare nn.Module needs input_shape=(C, H, W) and nb_classes")
        module = model
        device = next(iter(module.parameters()), torch.empty(0)).device
    view = _ArtView(module.eval(), _head(module, features), probabilities)
    loss = _ProbabilityNLL() if probabilities else nn.CrossEntropyLoss()
    return PyTorchClassifier(view, loss=loss, input_shape=tuple(input_shape), nb_classes=int(nb_classes),
                             clip_values=(0.0, 1.0), device_type=device_type or ("gpu" if device.type == "cuda" else "cpu"))


@dataclass
class PoisonedTrainingSet:
    """A poisoning baseline's training set as the model saw it before augmentation: images ``x``
    (N, C, H, W) float32 in [0, 1], training labels ``y``, original labels ``y_clean``, and the
    ground truth ``poisoned`` (N,) bool."""

    x: np.ndarray
    y: np.ndarray
    y_clean: np.ndarray
    poisoned: np.ndarray

    @property
    def rate(self) -> float:
        """Share of the whole training set that is poisoned."""
        return float(self.poisoned.mean())


@torch.no_grad()
def poisoned_training_set(run: AttackRun | str | Path) -> PoisonedTrainingSet:
    """Rebuild the poisoned training set of a ``badnets`` / ``ubw-p`` run, exactly.

    Why this is exact: :func:`cuba.train.build` draws the plan with ``make_poison_plan`` from the
    generator ``seed_everything(cfg.seed)`` returns -- a fresh ``torch.Generator`` seeded with the
    run's seed, from which nothing is drawn before -- over ``data.y_train`` of the same split
    (:func:`cuba.data.data_for`), and stamps the run's saved patch with ``PoisonPlan.apply`` before
    augmentation. The same calls here give the same images and labels (tests/test_art.py checks it
    against the plan a training run drew). Augmentation is not replayed: a poisoned data set on
    disk is what AC and SS inspect.
    """
    run = _as_run(run)
    cfg = run.cfg
    if cfg.attack not in POISON_ATTACKS or run.trigger is None:
        raise ValueError(f"a poisoned training set exists only for {' / '.join(POISON_ATTACKS)} runs, "
                         f"not for attack {cfg.attack!r}")
    y_clean = run.data.y_train
    plan = make_poison_plan(cfg.attack, y_clean, run.num_classes, cfg.poison_rate, cfg.target_class,
                            torch.Generator().manual_seed(cfg.seed)).to(run.engine.device)
    xs, ys = [], []
    for idx in torch.arange(len(y_clean)).split(1024):
        x, y = plan.apply(run.images(run.data.x_train[idx]), y_clean[idx].to(run.engine.device),
                          idx.to(run.engine.device), run.trigger)
        xs.append(x.float().cpu())
        ys.append(y.cpu())
    return PoisonedTrainingSet(torch.cat(xs).numpy().astype(np.float32), torch.cat(ys).numpy(),
                               y_clean.numpy(), plan.poisoned.cpu().numpy())
