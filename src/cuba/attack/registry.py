"""Every attack the toolkit trains, and the three things that tell them apart.

An attack is (1) a trigger -- a learned U-Net generator or a fixed patch, (2) a target rule --
which wrong classes count as success, and (3) how the classifier learns it -- a backdoor loss
on generated twins (:data:`cuba.attack.OBJECTIVES`) or a poisoned training set
(:mod:`cuba.attack.poison`). The training loop asks this module for those pieces, so a new
attack is one entry here plus its loss or poisoning rule.

| attack          | trigger   | target rule T(y)                 | learning                          |
|-----------------|-----------|----------------------------------|-----------------------------------|
| cuba            | generator | FRA or NRA-k (``variant``)       | LNF on flipped one-hot (paper)    |
| untargeted-ce   | generator | FRA or NRA-k                     | CE on flipped one-hot, no norm    |
| push-away       | generator | FRA or NRA-k (loss ignores it)   | -log(1 - q_y)                     |
| targeted        | generator | {target_class} (all-to-one)      | CE to the target class            |
| badnets         | patch     | {target_class} (all-to-one)      | poison_rate of images relabelled  |
| ubw-p           | patch     | every class but y (FRA)          | poison_rate, uniformly random labels |
| cuba-adaptive   | generator | FRA or NRA-k                     | LNF + adaptive_weight x entropy   |
| cuba-adaptive-set | generator | FRA or NRA-k                   | in T(y), confident per input, spread over the set |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models import TriggerGenerator
from .losses import OBJECTIVES
from .poison import POISON_ATTACKS, PatchTrigger
from .targets import all_to_one_targets, build_targets, fra_targets

if TYPE_CHECKING:
    from ..config import TrainConfig

GENERATOR_ATTACKS: tuple[str, ...] = tuple(OBJECTIVES)
ATTACKS: tuple[str, ...] = ("none", *GENERATOR_ATTACKS, *POISON_ATTACKS)
ALL_TO_ONE: tuple[str, ...] = ("targeted", "badnets")
# attacks whose target rule does not come from ``variant`` (an NRA variant is an error for them)
FIXED_RULE: tuple[str, ...] = ("targeted", "badnets", "ubw-p")


def build_trigger(cfg: "TrainConfig", channels: int, image_size: int) -> nn.Module | None:
    """The run's trigger: a fresh U-Net generator, a fixed patch, or None for a clean run."""
    if cfg.attack in POISON_ATTACKS:
        return PatchTrigger(channels, image_size, cfg.patch_size)
    if cfg.attack in GENERATOR_ATTACKS:
        return TriggerGenerator(channels, image_size, cfg.generator_mode, cfg.eps, cfg.generator_width, cfg.generator_scale)
    return None


def needs_reference_model(cfg: "TrainConfig") -> bool:
    """True when the target sets come from a (warmed-up) clean model: NRA with the 'similar' vicinity."""
    return cfg.attack not in ("none", *FIXED_RULE) and cfg.variant == "nra" and cfg.vicinity == "similar"


def attack_targets(cfg: "TrainConfig", num_classes: int, confusion: torch.Tensor | None = None) -> torch.Tensor | None:
    """The (K, K) bool target matrix of the run (None for a clean run)."""
    if cfg.attack == "none":
        return None
    if cfg.attack in ALL_TO_ONE:
        return all_to_one_targets(num_classes, cfg.target_class)
    if cfg.attack == "ubw-p":
        return fra_targets(num_classes)
    return build_targets(cfg.variant, num_classes, cfg.k, cfg.vicinity, cfg.targets, confusion)
