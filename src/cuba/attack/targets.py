"""Target sets T(y): which wrong classes a backdoor image of class y should land on.

A target set family is stored as a (K, K) boolean matrix ``M`` with ``M[y, t] = True`` when
t is in T(y). Every later piece (the loss, ASR, DS) reads the matrix, so a new vicinity rule
only has to produce one.

* FRA: T(y) = every class but y.
* NRA-k ``index`` (default): T(y) = {(y+1) mod K, ..., (y+k) mod K}; reproducible, model-free.
* NRA-k ``similar``: the k classes a clean reference model confuses y with most (mean softmax
  mass on j over the images of class y); see :func:`similar_targets`.
* NRA ``explicit``: a user mapping {class: [targets]}, or one global set S with T(y) = S minus {y}.
* all-to-one (the targeted controls ``targeted`` and ``badnets``): T(y) = {t} for y != t, and
  T(t) is *empty*: images of the target class itself are not attacked, and the metrics leave them
  out of ASR and DS (:func:`cuba.metrics.attacked_mask`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

VARIANTS = ("fra", "nra")
VICINITIES = ("index", "similar", "explicit")


class TargetSetError(ValueError):
    """A target set is empty, contains its own source class, or names a class outside [0, K)."""


def fra_targets(num_classes: int) -> torch.Tensor:
    return ~torch.eye(num_classes, dtype=torch.bool)


def index_targets(num_classes: int, k: int) -> torch.Tensor:
    _check_k(num_classes, k)
    m = torch.zeros(num_classes, num_classes, dtype=torch.bool)
    for y in range(num_classes):
        for step in range(1, k + 1):
            m[y, (y + step) % num_classes] = True
    return m


def all_to_one_targets(num_classes: int, target: int) -> torch.Tensor:
    """T(y) = {target} for every y != target; the target class's own row is empty (not attacked)."""
    _check_class(target, num_classes)
    m = torch.zeros(num_classes, num_classes, dtype=torch.bool)
    m[:, target] = True
    m[target, target] = False
    return m


def similar_targets(confusion: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k most confused classes per row of a (K, K) similarity/confusion matrix, never the diagonal."""
    num_classes = confusion.shape[0]
    _check_k(num_classes, k)
    scores = confusion.float().clone()
    scores.fill_diagonal_(float("-inf"))
    top = scores.topk(k, dim=1).indices
    m = torch.zeros(num_classes, num_classes, dtype=torch.bool)
    m.scatter_(1, top, True)
    return m


def explicit_targets(num_classes: int, spec: Mapping[int | str, Sequence[int]] | Sequence[int]) -> torch.Tensor:
    """From a mapping class -> targets (every class must be mapped) or one global set S."""
    m = torch.zeros(num_classes, num_classes, dtype=torch.bool)
    if isinstance(spec, Mapping):
        keys = {int(c) for c in spec}
        missing = sorted(set(range(num_classes)) - keys)
        if missing:
            raise TargetSetError(f"explicit targets: classes {missing[:10]} have no target set; map every class in [0, {num_classes})")
        for c, ts in spec.items():
            c = int(c)
            if not 0 <= c < num_classes:
                raise TargetSetError(f"explicit targets: source class {c} is outside [0, {num_classes})")
            for t in ts:
                m[c, _check_class(int(t), num_classes)] = True
    else:
        s = {_check_class(int(t), num_classes) for t in spec}
        for c in range(num_classes):
            for t in s - {c}:
                m[c, t] = True
    validate_targets(m)
    return m


def validate_targets(m: torch.Tensor, allow_empty: bool = False) -> None:
    """Square bool matrix, no class in its own set, and (unless ``allow_empty``) no empty set."""
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.dtype != torch.bool:
        raise TargetSetError(f"a target matrix must be a square bool tensor, got {tuple(m.shape)} {m.dtype}")
    diag = m.diagonal().nonzero().flatten().tolist()
    if diag:
        raise TargetSetError(f"target sets of classes {diag[:10]} contain their own source class")
    empty = (~m.any(dim=1)).nonzero().flatten().tolist()
    if len(empty) == m.shape[0]:
        raise TargetSetError("every target set is empty: nothing would be attacked")
    if empty and not allow_empty:
        raise TargetSetError(f"target sets of classes {empty[:10]} are empty")


def build_targets(
    variant: str, num_classes: int, k: int = 2, vicinity: str = "index",
    explicit: Mapping[int | str, Sequence[int]] | Sequence[int] | None = None,
    confusion: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (K, K) target matrix for a variant. ``confusion`` is needed for ``similar``."""
    if variant == "fra":
        return fra_targets(num_classes)
    if variant != "nra":
        raise TargetSetError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if vicinity == "index":
        return index_targets(num_classes, k)
    if vicinity == "similar":
        if confusion is None:
            raise TargetSetError("vicinity 'similar' needs a confusion matrix from a clean reference model")
        return similar_targets(confusion, k)
    if vicinity == "explicit":
        if explicit is None:
            raise TargetSetError("vicinity 'explicit' needs 'targets' (a mapping class -> classes, or one list)")
        return explicit_targets(num_classes, explicit)
    raise TargetSetError(f"vicinity must be one of {', '.join(VICINITIES)}, got {vicinity!r}")


def _check_k(num_classes: int, k: int) -> None:
    if not 0 < k < num_classes:
        raise TargetSetError(f"k must satisfy 0 < k < K = {num_classes}, got {k}")


def _check_class(t: int, num_classes: int) -> int:
    if not 0 <= t < num_classes:
        raise TargetSetError(f"target class {t} is outside [0, {num_classes})")
    return t
