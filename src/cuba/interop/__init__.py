"""Bridges to other toolkits. Each bridge imports its toolkit lazily, inside its functions, so
``import cuba`` (and this package) works without any of them installed; a missing toolkit is a
one-line ``ImportError`` naming the extra to install.

* :mod:`cuba.interop.art` -- IBM's Adversarial Robustness Toolbox (``pip install -e '.[art]'``):
  a cuba classifier as ART's ``PyTorchClassifier`` in one call, and ART's Activation Clustering,
  Spectral Signatures and STRIP run on cuba runs and scored against what cuba knows (the poison
  mask, the trigger).
"""

from __future__ import annotations

from .art import (PoisonedTrainingSet, art_activation_clustering, art_spectral_signatures, art_strip, detection_metrics,
                  poisoned_training_set, to_art)

__all__ = ["PoisonedTrainingSet", "art_activation_clustering", "art_spectral_signatures", "art_strip",
           "detection_metrics", "poisoned_training_set", "to_art"]
