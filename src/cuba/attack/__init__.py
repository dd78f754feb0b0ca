"""The attack: target sets and backdoor objectives."""

from .losses import OBJECTIVES, lnf_loss, push_away_loss, soft_target_ce
from .targets import (
    VARIANTS, VICINITIES, TargetSetError, build_targets, explicit_targets, fra_targets, index_targets,
    similar_targets, validate_targets,
)

__all__ = [
    "OBJECTIVES", "VARIANTS", "VICINITIES", "TargetSetError", "build_targets", "explicit_targets",
    "fra_targets", "index_targets", "lnf_loss", "push_away_loss", "similar_targets", "soft_target_ce",
    "validate_targets",
]
