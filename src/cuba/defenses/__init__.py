"""Backdoor defenses, one module each, all behind :class:`Defense` and the :data:`DEFENSES` registry.

Add one by writing a module with a ``@register``-ed :class:`Defense` subclass and importing it here.
"""

from .base import DEFENSES, AttackRun, Defense, DefenseResult, load_attack_run, register, run_defense
# the import order is the registry's order: `cuba defend all` runs them, and tables list them, in it
from . import strip, neural_cleanse, sentinet, fine_pruning, nad, scale_up, entropy, mm_bd  # noqa: F401,I001  (registers them)
from . import cognitive_distillation  # noqa: F401,I001  (registers it)
from . import trigger_inversion  # noqa: F401,I001  (registers it)
from . import ibd_psc  # noqa: F401,I001  (registers it)
from . import dispersion_inversion  # noqa: F401,I001  (registers it)
from . import near_tie  # noqa: F401,I001  (registers it)

__all__ = ["DEFENSES", "AttackRun", "Defense", "DefenseResult", "load_attack_run", "register", "run_defense"]
