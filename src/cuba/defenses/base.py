"""What every defense shares: the attacked run it inspects, its result, and the registry.

The contract with the attacks is the run folder (:mod:`cuba.runs`): a defense never needs to
know how a model was trained. :func:`load_attack_run` rebuilds the classifier, the trigger and
the target sets from a run folder once; each defense takes that :class:`AttackRun` and returns
a :class:`DefenseResult` -- the numbers for ``defense.json`` plus the figures it drew.

Clean data a defender holds: by convention a defense draws its clean reference images (STRIP's
overlays, Neural Cleanse's optimisation batch, the 5% fine-tuning set of Fine-pruning and NAD,
SentiNet's paste-onto images) from the *training* set, fits every threshold or boundary on the
*validation* split (:meth:`AttackRun.clean_val`, METHOD.md section 2: everything chosen from data is
chosen there), and measures detection and removal on the *test* set, so no image is both fitted on
and scored, and no test number picks its own threshold.

Two rules every defense follows here:

* Untargeted attacks (FRA/NRA: cuba, untargeted-ce, push-away, ubw-p) count any prediction in T(y)
  as a success, so a repaired model that lost its backdoor still "succeeds" on each clean mistake:
  ASR >= 1 - CA by construction. Mitigation rows therefore carry ASR-C too (over test images the
  same repaired model classifies correctly when clean) and :func:`headline_asr_key` makes it the
  headline for those settings; the all-to-one controls keep plain ASR.
* A detector whose scores cannot rank anything (all equal) or whose calibration collapsed says so
  with ``"applicable": false`` and a ``"reason"`` (:func:`not_applicable`); headlines and tables
  then print "n/a (reason)" instead of numbers that look measured, and the raw numbers stay in
  defense.json for inspection.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..attack import PatchTrigger, attack_targets
from ..config import ConfigError, TrainConfig
from ..data import ImageDataset
from ..engine import Engine, make_engine
from ..formatting import first_line
from ..metrics import at_chance, attack_success_rate  # noqa: F401 - at_chance re-exported: report.py reads it from here
from ..runs import write_json
# the score statistics live in .rules; re-exported here, where detectors and the add-a-defense tutorial import them
from .headlines import ASR_NAMES, headline_asr_key, headline_asr_key_of, headline_value, pct, removal_headline
from .rules import constant_scores, rate_tag, roc_summary, val_threshold

# What this module offers, its re-exports from .rules included: listed so that the API reference
# (mkdocstrings renders an imported name only when __all__ exports it) keeps documenting them here,
# where docs/ links to them (the removal headlines live in .headlines). at_chance, re-exported for
# report.py, is documented under cuba.metrics.
__all__ = ["AttackRun", "load_attack_run", "DefenseResult", "Defense", "SampledInputDetector", "rate_tag",
           "val_threshold", "roc_summary", "constant_scores", "model_verdict", "not_applicable", "rule_tag",
           "rule_headline", "missing_stages", "pct", "ASR_NAMES",
           "headline_asr_key", "headline_asr_key_of", "headline_value", "removal_headline", "DEFENSES", "register",
           "check_param", "run_defense"]


IMPORTED = "imported"
"""The ``setting`` of a model brought in by ``cuba import-model``: backdoored or not is unknown."""
UNHELD_CALIBRATION = "training images"
"""How :attr:`AttackRun.calibration_source` starts for a run without a validation split: its detectors'
thresholds were fitted on images the model trained on, so :func:`~.verdict.verdict` gives their rules no verdict."""


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
    origin: str | None = None  # the pack the run was read from (run_dir is then its unpacked copy)
    # made by `cuba import-model` from someone else's weights: whether it holds a backdoor is what
    # an audit asks, so its defense.json says "imported", never "clean", and no verdict presumes either
    imported: bool = False
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

    def _attacked_idx(self, n: int | None = None, seed: int = 0) -> torch.Tensor:
        """Indices into the test set of images of attacked classes (non-empty T(y)), at most ``n``, random order."""
        y = self.data.y_test
        keep = torch.ones_like(y, dtype=torch.bool) if self.targets is None else self.targets.any(1)[y]
        idx = keep.nonzero().flatten()
        return idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))][:n]

    def attacked_test(self, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Test images of attacked classes (non-empty T(y)) and labels, at most ``n``, random order."""
        idx = self._attacked_idx(n, seed)
        return self.images(self.data.x_test[idx]), self.data.y_test[idx].to(self.engine.device)

    @torch.inference_mode()
    def repair_metrics(self, model: nn.Module | None = None) -> dict[str, float | None]:
        """{ca, asr, asr_c} of ``model`` (default: the run's) on the test set, for a mitigation step.

        CA over the whole test set; ASR over the backdoor twins of the attacked test images (the
        run's success rule, prediction in T(y)); ASR-C over those of them that *this same model*
        classifies correctly when clean. The last matters for untargeted attacks: once pruning or
        distillation costs clean accuracy, every clean mistake is also a "success" (any wrong
        class is in T(y) under FRA), so ASR >= 1 - CA even with the backdoor gone; ASR-C does not
        count them. The backdoor images are made once and cached. ASR and ASR-C are None for a
        clean model (and ASR-C when the model gets no attacked image right).
        """
        model = model or self.classifier
        was_training = model.training
        model.eval()
        x = self.images(self.data.x_test)
        y = self.data.y_test.to(self.engine.device)
        pred = torch.cat([model(xb).float().argmax(1) for xb in x.split(2048)])
        out: dict[str, float | None] = {"ca": float((pred == y).float().mean()), "asr": None, "asr_c": None}
        if self.trigger is not None and self.targets is not None:
            if self._bd_cache is None:
                idx = self._attacked_idx()
                self._bd_cache = (self.backdoor(self.images(self.data.x_test[idx])), idx)
            xb_all, idx = self._bd_cache
            pb = torch.cat([model(xb).float().argmax(1) for xb in xb_all.split(2048)]).cpu()
            ya, pc, targets = self.data.y_test[idx], pred.cpu()[idx], self.targets.cpu()
            out["asr"] = attack_success_rate(ya, pb, targets)
            asr_c = attack_success_rate(ya, pb, targets, pc)
            out["asr_c"] = None if np.isnan(asr_c) else asr_c
        model.train(was_training)
        return out

    def ca_asr(self, model: nn.Module | None = None) -> tuple[float, float | None]:
        """(CA, ASR) of ``model``: :meth:`repair_metrics` without ASR-C."""
        m = self.repair_metrics(model)
        return m["ca"], m["asr"]

    @property
    def calibration_source(self) -> str:
        """Where :meth:`clean_val` draws from, in words (each detector writes it to defense.json)."""
        if self.data.has_val:
            return f"validation split ({len(self.data.y_val)} held-out training images)"
        return UNHELD_CALIBRATION + " (this run has no validation split, val_fraction 0: the model has seen them)"

    def clean_val(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``n`` random clean *held-out* images and labels, for fitting a detector's threshold
        or boundary: the run's validation split, or (without one) training images -- see
        :attr:`calibration_source`. Never test images: those are what detection is scored on."""
        x, y = (self.data.x_val, self.data.y_val) if self.data.has_val else (self.data.x_train, self.data.y_train)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=g)[:n]
        return self.images(x[idx]), y[idx].to(self.engine.device)

    def clean_train(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random clean training images and labels (the defender's clean data)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.data.y_train), generator=g)[:n]
        return self.images(self.data.x_train[idx]), self.data.y_train[idx].to(self.engine.device)


def load_attack_run(run_dir: str | Path, device: str = "auto", data: ImageDataset | None = None,
                    data_dir: str | None = None, channels_last: bool = True) -> AttackRun:
    """Rebuild a finished run's models and data from its folder or pack (config.yaml + safetensors +
    targets); ``data_dir`` replaces the folder the run found its data set in. ``channels_last``:
    the classifier's weights in that layout (its convolutions then run channels_last whatever
    the layout of the images given; ``benchmarks/defense_layout.py`` times it), unless the model
    refuses it (:meth:`RunFolder.models_in_layout`)."""
    from ..pack import is_pack, open_run

    origin = str(run_dir) if is_pack(run_dir) else None
    run = open_run(run_dir).require("classifier.safetensors", finished=True)
    run_dir = run.path
    cfg = run.config()
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    engine = make_engine(device, "fp32", channels_last=channels_last)
    data = data if data is not None else run.data(cfg)
    classifier, trigger, engine = run.models_in_layout(cfg, data, engine)
    for m in (classifier, trigger):
        if m is not None:
            m.requires_grad_(False)
    targets = None
    if cfg.is_attack:
        targets = run.targets()
        targets = targets if targets is not None else attack_targets(cfg, data.num_classes)
    imported = "imported_from" in run.status()
    return AttackRun(run_dir, cfg, data, classifier, trigger, targets, engine, origin, imported)


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

    A clean model has no trigger: input-level detectors then score a probe patch it never
    learned (:meth:`AttackRun.backdoor`), a negative control.
    """

    name: ClassVar[str]
    # input-level detectors: (defense.json key, "far" | "tpr") of their decision rule's operating
    # point, which cuba.defenses.verdict judges; None for model-level and removal defenses
    rule: ClassVar[tuple[str, str] | None] = None

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    @property
    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def checked(cls, **params: Any) -> "Defense":
        """The defense built from ``params`` (``--set`` values, read as YAML): a value its constructor
        cannot take (``frr=abc``, ``ratios=5``) is a one-line ConfigError naming the defense, not a
        traceback from deep inside the constructor."""
        try:
            return cls(**params)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            given = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "its defaults"
            raise ConfigError(f"{cls.name}: cannot take {given} ({type(e).__name__}{': ' + first_line(e) if str(e).strip() else ''})") from None

    @abstractmethod
    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        """Inspect (or repair) ``run``; draw figures into ``out``; return the numbers."""

    @classmethod
    def headline(cls, fields: dict[str, Any]) -> str:
        """The numbers a reader needs from this defense's defense.json, in one line (``cuba defend``
        prints it, ``cuba defense-table`` puts it in a cell). Override per defense; an override
        starts with :func:`not_applicable` so a degenerate result never reads as a measurement."""
        na = not_applicable(fields)
        if na:
            return na
        return f"AUROC {fields['auroc']:.3f}" if "auroc" in fields else "(see defense.json)"

    @classmethod
    def format_score(cls, score: float, fields: dict[str, Any]) -> str:
        """A model-level score (from the defense.json ``fields``) as this detector's headline writes it."""
        return f"{score:g}"

    @classmethod
    def with_references(cls, fields: dict[str, Any], reference_scores: list[float]) -> dict[str, Any] | None:
        """``fields`` with ``flagged`` decided from clean reference models' scores under this same
        detector (``cuba defense-table --reference``); None for a detector with no reference rule."""
        return None

    @classmethod
    def has_reference_rule(cls) -> bool:
        """Whether this detector decides its flag against clean reference models (it overrides
        :meth:`with_references`): the defenses a grid's reference cell runs, and ``--reference`` feeds."""
        return cls.with_references.__func__ is not Defense.with_references.__func__  # type: ignore[attr-defined]


class SampledInputDetector(Defense):
    """An input-level detector that calibrates on ``n_calib`` clean validation images and scores
    ``n_eval`` attacked test images (the entropy and near-tie detectors): one place validates the
    two counts, so the detectors that share them cannot disagree on what a valid count is."""

    def __init__(self, n_eval: int = 1000, n_calib: int = 1000, seed: int = 0) -> None:
        super().__init__(seed)
        for name, v in (("n_eval", n_eval), ("n_calib", n_calib)):
            check_param(name, isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an integer >= 2", v)
        self.n_eval, self.n_calib = n_eval, n_calib


def model_verdict(score: float | None, suspicious: str, flagged: bool | None, assumes_target_class: bool) -> dict[str, Any]:
    """The fields every model-level detector writes, so that ``cuba defense-table`` can rank models
    by one number: ``level`` "model"; ``score``; ``score_suspicious`` ("high" or "low": which end of
    the score is the backdoored one); ``flagged`` (the detector's own decision rule; None when it
    cannot decide, e.g. no reference); ``assumes_target_class`` (an untargeted backdoor has none)."""
    if suspicious not in ("high", "low"):
        raise ValueError(f"score_suspicious: 'high' or 'low', got {suspicious!r}")
    return {"level": "model", "score": None if score is None else float(score), "score_suspicious": suspicious,
            "flagged": flagged, "assumes_target_class": assumes_target_class}


def not_applicable(fields: dict[str, Any]) -> str | None:
    """ "n/a (reason)" for a defense.json that says ``"applicable": false``, else None. Headlines and
    tables print this instead of the raw numbers, which stay in defense.json for inspection."""
    if fields.get("applicable", True) is False:
        return f"n/a ({fields.get('reason', 'no reason recorded')})"
    return None


def rule_tag(key: str) -> str:
    """The tag of a rule's defense.json key: "far_at_frr_1pct_two_sided" -> "1pct_two_sided"."""
    return key.split("_at_", 1)[-1].split("_", 1)[-1]


def rule_headline(fields: dict[str, Any], label: str, key: str, realised_key: str, realised_name: str) -> str:
    """An input detector's headline: AUROC, then its rule at a fixed error rate (``key``) with the
    rate that rule realised on clean test inputs (``realised_key``), then the same for the
    two-sided rule (``key + "_two_sided"``) when defense.json has one; "n/a (reason)" when the
    detector does not apply. Older defense.json files lack the realised and two-sided keys."""
    na = not_applicable(fields)
    if na:
        return na

    def one(k: str, rk: str) -> str:
        text = f"{label} {fields[k]:.3f}" + (f" (test {realised_name} {fields[rk]:.3f})" if rk in fields else "")
        if rule_tag(k) in fields.get("unresolved_rules", ()):
            text += f" [unresolved: {fields.get('n_calib_used', '?')} validation inputs]"
        return text

    text = f"AUROC {fields['auroc']:.3f}, " + one(key, realised_key)
    if f"{key}_two_sided" in fields:
        text += "; two-sided " + one(f"{key}_two_sided", f"{realised_key}_two_sided")
    return text


def missing_stages(run: AttackRun) -> str | None:
    """Why ``run``'s classifier cannot serve a defense that hooks its feature stages (Grad-CAM,
    pruning, attention), or None when it declares them."""
    try:
        run.classifier.stages()
    except (ValueError, AttributeError) as e:
        return f"the model declares no feature stages to hook ({e})"
    return None


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
    if out is None and run.origin is not None:
        raise ConfigError(f"{run.origin} is a pack (read-only): give --out FOLDER for the defense results")
    folder = (out or run.run_dir / "defenses") / name
    folder.mkdir(parents=True, exist_ok=True)
    defense = DEFENSES[name].checked(**params)
    t0 = time.perf_counter()
    result = defense.run(run, folder)
    result.seconds = time.perf_counter() - t0
    setting = IMPORTED if run.imported else run.cfg.label()
    write_json(folder / "defense.json", {"run": run.origin or str(run.run_dir), "setting": setting, **result.to_json()})
    return result
