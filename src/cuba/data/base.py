"""The in-memory image data set every part of cuba works on.

Images are kept as one uint8 tensor per split (N, C, H, W) instead of a torch ``Dataset`` of
files: at MNIST/CIFAR scale the whole set fits in memory many times over, batches are then
plain index slices, and augmentation can run batched on the training device
(:mod:`cuba.data.augment`) instead of per sample in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class DataError(ValueError):
    """A data set could not be found, read or validated; the message says which and why."""


@dataclass
class ImageDataset:
    """A labelled image classification data set held in memory.

    ``x_*`` are uint8 tensors of shape (N, C, H, W) with C in {1, 3}; ``y_*`` are int64 label
    tensors of shape (N,) with values in ``[0, num_classes)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str] = field(default_factory=list)
    # the validation split (see :mod:`cuba.data.split`): images carved out of the full training
    # set, which then no longer holds them; ``val_indices`` index that full training set
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    val_indices: torch.Tensor | None = None
    n_train_full: int | None = None  # training images before the split (and any subsetting)

    def __post_init__(self) -> None:
        if not self.classes:
            k = int(max(self.y_train.max(), self.y_test.max()).item()) + 1
            self.classes = [str(i) for i in range(k)]
        validate_dataset(self)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def has_val(self) -> bool:
        return self.y_val is not None and len(self.y_val) > 0

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of ``train``, ``val`` or ``test``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        if name == "val" and not self.has_val:
            raise DataError(f"{self.name}: has no validation split (val_fraction 0)")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def with_validation(self, fraction: float, seed: int | None = None,
                        indices: torch.Tensor | None = None) -> "ImageDataset":
        """This data set with a stratified validation split of ``fraction`` carved from its training
        images (:func:`cuba.data.split.stratified_split`), whole tracks at a time where the data set
        has them (:data:`cuba.data.split.VAL_GROUPS`); ``fraction`` 0 returns it unchanged.
        ``indices``: hold out exactly these training images instead of drawing them (a finished
        run's ``split.json``: whatever the current rule draws, a run is judged on what it did not see)."""
        from .split import VAL_GROUPS, VAL_SEED, stratified_split

        if self.y_val is not None:
            raise DataError(f"{self.name}: already has a validation split")
        if indices is not None:
            val = torch.as_tensor(indices, dtype=torch.long).unique()
            if len(val) and int(val.min()) < 0:
                raise DataError(f"{self.name}: a recorded validation index is negative ({int(val.min())})")
            if len(val) and int(val.max()) >= len(self.y_train):
                raise DataError(f"{self.name}: recorded validation indices reach {int(val.max())}, but the training set "
                                f"has {len(self.y_train)} images: the run was trained on another copy of the data set")
            keep = torch.ones(len(self.y_train), dtype=torch.bool)
            keep[val] = False
            rest = keep.nonzero().flatten()
        elif fraction == 0:
            return self
        else:
            rest, val = stratified_split(self.y_train, fraction, VAL_SEED if seed is None else seed,
                                         VAL_GROUPS.get(self.name, 1))
        return ImageDataset(self.name, self.x_train[rest], self.y_train[rest], self.x_test, self.y_test, list(self.classes),
                            self.x_train[val], self.y_train[val], val, len(self.y_train))

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "ImageDataset":
        """A stratified subset (:func:`cuba.data.split.stratified_subset`: every class in proportion,
        none left empty), for small CPU budgets. ``None`` keeps a split whole. The validation split is
        kept as it is: a smaller budget trains on fewer images, it is not judged on fewer."""
        from .split import stratified_subset

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            if n is None or n >= len(y):
                return x, y
            idx = stratified_subset(y, n, seed)
            return x[idx], y[idx]

        xtr, ytr = pick(self.x_train, self.y_train, n_train)
        xte, yte = pick(self.x_test, self.y_test, n_test)
        return ImageDataset(self.name, xtr, ytr, xte, yte, list(self.classes), self.x_val, self.y_val, self.val_indices,
                            self.n_train_full)


def validate_dataset(ds: ImageDataset) -> None:
    """Raise :class:`DataError` naming the first problem found: shapes, dtypes, label range, empty classes."""
    for split in ("train", "test"):
        x = getattr(ds, f"x_{split}")
        y = getattr(ds, f"y_{split}")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            raise DataError(f"{ds.name}: x_{split} must be a uint8 tensor, got {getattr(x, 'dtype', type(x))}")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"{ds.name}: x_{split} must have shape (N, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}")
        if x.shape[2] != x.shape[3]:
            raise DataError(f"{ds.name}: images must be square, got {x.shape[2]}x{x.shape[3]}")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.ndim != 1:
            raise DataError(f"{ds.name}: y_{split} must be a 1-D int64 tensor")
        if len(x) != len(y):
            raise DataError(f"{ds.name}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        if len(y) == 0:
            raise DataError(f"{ds.name}: the {split} split is empty")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= len(ds.classes):
            raise DataError(f"{ds.name}: y_{split} labels must lie in [0, {len(ds.classes)}), found [{lo}, {hi}]")
    if (ds.x_val is None) != (ds.y_val is None):
        raise DataError(f"{ds.name}: x_val and y_val must be given together")
    if ds.x_val is not None and (ds.x_val.dtype != torch.uint8 or ds.x_val.shape[1:] != ds.x_train.shape[1:] or len(ds.x_val) != len(ds.y_val)):
        raise DataError(f"{ds.name}: the validation split must be uint8 images shaped like the training images, one label each")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"{ds.name}: train images {tuple(ds.x_train.shape[1:])} and test images {tuple(ds.x_test.shape[1:])} differ in shape")
    if len(ds.classes) < 2:  # no wrong class to send a backdoor to, and every accuracy is trivially 100%
        raise DataError(f"{ds.name}: a classifier needs at least 2 classes, found {len(ds.classes)}")
    counts = torch.bincount(ds.y_train, minlength=len(ds.classes))
    empty = [ds.classes[i] for i in range(len(ds.classes)) if counts[i] == 0]
    if empty:
        raise DataError(f"{ds.name}: classes with no training image: {', '.join(empty[:10])}")
