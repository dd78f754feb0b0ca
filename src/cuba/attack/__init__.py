"""The attacks: target sets, backdoor objectives, poisoning baselines, and the registry tying them together."""

from .losses import OBJECTIVES, lnf_loss, push_away_loss, soft_target_ce
from .poison import POISON_ATTACKS, PatchTrigger, PoisonPlan, make_poison_plan
from .registry import (
    ALL_TO_ONE, ATTACKS, FIXED_RULE, GENERATOR_ATTACKS, attack_targets, build_trigger, needs_reference_model,
)
from .targets import (
    VARIANTS, VICINITIES, TargetSetError, all_to_one_targets, build_targets, explicit_targets, fra_targets,
    index_targets, similar_targets, validate_targets,
)

__all__ = [
    "ALL_TO_ONE", "ATTACKS", "FIXED_RULE", "GENERATOR_ATTACKS", "OBJECTIVES", "POISON_ATTACKS", "PatchTrigger",
    "PoisonPlan", "TargetSetError", "VARIANTS", "VICINITIES", "all_to_one_targets", "attack_targets",
    "build_targets", "build_trigger", "explicit_targets", "fra_targets", "index_targets", "lnf_loss",
    "make_poison_plan", "needs_reference_model", "push_away_loss", "similar_targets", "soft_target_ce",
    "validate_targets",
]
