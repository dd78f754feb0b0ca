"""Backdoor defenses, one module each, all behind :class:`Defense` and the :data:`DEFENSES` registry.

Add one by writing a module with a ``@register``-ed :class:`Defense` subclass and importing it here.
"""

from .base import DEFENSES, AttackRun, Defense, DefenseResult, load_attack_run, register, run_defense
from . import fine_pruning, nad, neural_cleanse, sentinet, strip  # noqa: F401  (registers them)

__all__ = ["DEFENSES", "AttackRun", "Defense", "DefenseResult", "load_attack_run", "register", "run_defense"]
