"""Turn a data set spec (a known name or a path) into an in-memory :class:`ImageDataset`.

Named sets are looked for locally first, because the machines this project is developed on
cannot reach the internet: ``<data_dir>/<name>.npz``, then torchvision's own files under
``data_dir``, and only when asked (``download=True``) a torchvision download. Any other spec is
a path: an ``.npz`` file, an ImageFolder directory, or a ``.zip`` of one (see
:mod:`cuba.data.folders`). Every failure is a one-line :class:`DataError` that says what was
tried, so a command-line user can fix the call without a traceback.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cuba.data.base import DataError, ImageDataset
from cuba.data.folders import load_image_folder
from cuba.formatting import first_line

DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "gtsrb")
DEFAULT_DATA_DIR = Path("data")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
GTSRB_SIZE = 32  # GTSRB photos range from 15 to 250 pixels a side; 32x32 is the usual choice

# torchvision class name and the folder its files live in, relative to data_dir.
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    "gtsrb": ("GTSRB", "gtsrb"),
}
# torchvision reads CIFAR-10's names from the downloaded meta file; an .npz copy has none.
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_dataset(spec: str | Path, data_dir: str | Path | None = None, download: bool = False) -> ImageDataset:
    """Load a data set by name (one of :data:`DATASET_NAMES`) or from a path.

    Names win over paths (write ``./mnist`` to mean a folder called ``mnist``); they are matched
    case-insensitively with ``_`` read as ``-``. ``data_dir`` (default ``./data``) and
    ``download`` only matter for named sets other than ``digits``, which ships with scikit-learn.
    """
    key = str(spec).strip().lower().replace("_", "-")
    if isinstance(spec, str) and key in DATASET_NAMES:
        if key == "digits":
            return load_digits()
        root = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR
        return _load_named(key, root, download)
    path = find_path(spec, data_dir)
    if path is None:
        where = f" (nor under data_dir {data_dir})" if data_dir is not None else ""
        # a run stores its data set path as it was typed: from another folder a relative one is not found
        hint = ("; a relative path is read from the working folder: run from where it was made, or pass "
                "--data-dir FOLDER (the folder that holds it)") if not Path(str(spec)).expanduser().is_absolute() else ""
        raise DataError(f"{spec}: no such file or directory{where}, and not a known data set name "
                        f"({', '.join(DATASET_NAMES)}){hint}")
    if path.is_dir() or path.suffix.lower() == ".zip":
        return load_image_folder(path)
    if path.suffix.lower() == ".npz":
        return load_npz(path)
    raise DataError(f"{spec}: unsupported file type {path.suffix or '(none)'!r}; expected .npz, .zip or a directory")


def find_path(spec: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """A data set path as given, else the same relative path under ``data_dir``, else its file name
    under ``data_dir``; None if none exists.

    Why the fallbacks: grids and presets name files by where they live among the user's data
    (``cifar10-jpeg.zip`` with ``--data-dir ../shared/data``), not by the working directory; and a
    run made elsewhere (a pack from a colleague) names ``../their/data/mnist.npz``, which the
    reader finds as ``mnist.npz`` in their own ``--data-dir``.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        for candidate in ([root / path] if not path.is_absolute() else []) + [root / path.name]:
            if candidate.exists():
                return candidate
    return None


def dataset_file(spec: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """The local file or folder that :func:`load_dataset` would read for ``spec``, resolved, or
    None (``digits``, a torchvision folder, a download, a missing path).

    Why: a run trained on ``--dataset ../shared/data/mnist.npz`` and a grid cell that names
    ``mnist`` with ``data_dir=../shared/data`` train on the same bytes; comparing settings by
    this file lets such a run be adopted into a grid instead of being trained again.
    """
    key = str(spec).strip().lower().replace("_", "-")
    if isinstance(spec, str) and key in DATASET_NAMES:
        if key == "digits":
            return None
        root = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR
        path = root / f"{key}.npz"
        return path.resolve() if path.exists() else None
    found = find_path(spec, data_dir)
    return found.resolve() if found is not None else None


def missing_copy(spec: str | Path, data_dir: str | Path | None = None, download: bool = False) -> str | None:
    """Why ``spec`` cannot be loaded on this machine without a network, or None when it can.

    Why: a grid spans data sets that are not all everywhere (CIFAR-100 has no offline copy here,
    and a GPU machine without a network gets only what was carried to it). Knowing before a
    cell trains lets ``cuba reproduce`` mark that data set's cells blocked and run the others,
    instead of stopping at the first missing file. Only the files are checked, not their
    contents: a copy that is there but broken still fails its own cell with a DataError.
    """
    key = str(spec).strip().lower().replace("_", "-")
    if isinstance(spec, str) and key in DATASET_NAMES:
        if key == "digits" or download:
            return None
        root = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR
        if (root / f"{key}.npz").is_file() or (root / _TORCHVISION[key][1]).is_dir():
            return None
        return (f"no local copy of {key} (pass --download on a machine with a network, "
                f"or put {key}.npz in --data-dir)")
    return None if find_path(spec, data_dir) is not None else f"no such file or directory {spec}"


def load_digits() -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), as 16x16 uint8 with a fixed 80/20 split.

    The 0..16 intensities are scaled to 0..255 (``v * 255 // 16``), then upsampled 8x8 -> 16x16
    with bilinear interpolation (``align_corners=False``) and rounded back to uint8. Why: 8x8 is
    too small for the models here; two conv+pool stages would leave 2x2 maps and a U-Net trigger
    generator could not downsample at all. The split is stratified with ``random_state=0`` so
    every run and every machine sees the same 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    scaled = (bunch.images.astype(np.int64) * 255 // 16).astype(np.float32)
    x = F.interpolate(torch.from_numpy(scaled).unsqueeze(1), size=(16, 16), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=0, stratify=bunch.target
    )
    tr, te = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    return ImageDataset("digits", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)])


def load_npz(path: str | Path, name: str | None = None, classes: list[str] | None = None) -> ImageDataset:
    """Load an ``.npz`` with uint8 images ``x_train``/``x_test`` and integer labels ``y_train``/``y_test``.

    Images are (N, H, W) for grayscale or (N, H, W, C) with C in {1, 3}; labels (N,) or (N, 1)
    (the Keras layout). An optional string array ``classes`` names the classes and takes
    precedence over the ``classes`` argument. Loaded with ``allow_pickle=False``: an .npz from elsewhere must
    not be able to run code.
    """
    path = Path(path)
    arrays = _read_npz(path)
    x_train = _images(arrays["x_train"], "x_train", path)
    x_test = _images(arrays["x_test"], "x_test", path)
    y_train = _labels(arrays["y_train"], "y_train", path, len(x_train), "x_train")
    y_test = _labels(arrays["y_test"], "y_test", path, len(x_test), "x_test")
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].reshape(-1).tolist()]
    elif classes is not None:
        top = int(max(y_train.max(), y_test.max())) + 1
        classes = classes if len(classes) == top else None  # e.g. a small fake "mnist": keep numbers
    return ImageDataset(name or path.stem, x_train, y_train, x_test, y_test, list(classes or []))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read the four arrays (and ``classes`` if present), mapping every failure to a DataError."""
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except unreadable as e:
        raise DataError(f"{path}: not a valid .npz file ({first_line(e)})") from e
    if not hasattr(loaded, "files"):
        raise DataError(f"{path}: holds a single array, not an .npz archive with keys {', '.join(NPZ_KEYS)}")
    with loaded:
        missing = [k for k in NPZ_KEYS if k not in loaded.files]
        if missing:
            found = ", ".join(loaded.files) or "none"
            raise DataError(f"{path}: missing key(s) {', '.join(missing)} (found: {found})")
        keys = [*NPZ_KEYS, *(["classes"] if "classes" in loaded.files else [])]
        try:
            return {k: loaded[k] for k in keys}
        except unreadable as e:
            if "allow_pickle" in str(e):
                raise DataError(f"{path}: holds object (pickled) arrays, which are never loaded; save plain arrays") from e
            raise DataError(f"{path}: corrupt or truncated .npz file ({first_line(e)})") from e


def _images(x: np.ndarray, key: str, path: Path) -> torch.Tensor:
    """Check one image array and return it as a (N, C, H, W) uint8 tensor."""
    if x.dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {x.dtype}; images must be uint8 (0-255)")
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{path}: {key} has shape {x.shape}; expected (N, H, W) or (N, H, W, C) with C = 1 or 3")
    if x.shape[1] != x.shape[2]:
        raise DataError(f"{path}: {key} images are {x.shape[1]}x{x.shape[2]} (HxW); images must be square")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _labels(y: np.ndarray, key: str, path: Path, n_images: int, x_key: str) -> torch.Tensor:
    """Check one label array against its images and return it as an int64 tensor."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {y.dtype}; labels must be integers")
    if y.ndim != 1:
        raise DataError(f"{path}: {key} has shape {y.shape}; expected (N,)")
    if len(y) != n_images:
        raise DataError(f"{path}: {x_key} has {n_images} images but {key} has {len(y)} labels")
    return torch.from_numpy(y.astype(np.int64))


def _load_named(name: str, data_dir: Path, download: bool) -> ImageDataset:
    """Local .npz, then torchvision's files, then (if allowed) a torchvision download."""
    tv_class, tv_folder = _TORCHVISION[name]
    npz = data_dir / f"{name}.npz"
    if npz.is_file():
        return load_npz(npz, name=name, classes=_known_classes(name))
    if data_dir.is_dir():
        try:
            return _from_torchvision(name, data_dir, download=False)
        except (RuntimeError, OSError):
            pass  # torchvision's way of saying "not found or incomplete"; fall through
    if download:
        try:
            return _from_torchvision(name, data_dir, download=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(f"{name}: download into {data_dir} failed ({first_line(e)})") from e
    raise DataError(
        f"{name}: not found locally (looked for {npz} and torchvision's {tv_class} files in "
        f"{data_dir / tv_folder}); pass --download to fetch it, or --data-dir to point at a folder that has it"
    )


def _known_classes(name: str) -> list[str] | None:
    """Class names for an .npz copy of a named set, matching what the torchvision path gives."""
    if name == "cifar10":
        return list(_CIFAR10_CLASSES)
    if name in ("mnist", "fashion-mnist"):
        import torchvision.datasets as tvd

        return list(getattr(tvd, _TORCHVISION[name][0]).classes)
    return None  # CIFAR-100 and GTSRB names come only from torchvision's files


def _from_torchvision(name: str, root: Path, download: bool) -> ImageDataset:
    """Build the data set through torchvision's dataset class (raises RuntimeError if missing)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION[name][0])
    if name == "gtsrb":
        train, test = (cls(str(root), split=s, download=download) for s in ("train", "test"))
    else:
        train, test = (cls(str(root), train=t, download=download) for t in (True, False))
    x_train, y_train = _torchvision_arrays(name, train)
    x_test, y_test = _torchvision_arrays(name, test)
    classes = [str(c) for c in getattr(train, "classes", None) or []]
    return ImageDataset(name, x_train, y_train, x_test, y_test, classes)


def _torchvision_arrays(name: str, ds: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Pull uint8 (N, C, H, W) images and int64 labels out of a torchvision dataset object."""
    if name in ("mnist", "fashion-mnist"):
        return ds.data.to(torch.uint8).unsqueeze(1).contiguous(), ds.targets.to(torch.int64)  # type: ignore[attr-defined]
    if name in ("cifar10", "cifar100"):
        x = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # type: ignore[attr-defined]
        return torch.from_numpy(x), torch.as_tensor(ds.targets, dtype=torch.int64)  # type: ignore[attr-defined]
    # GTSRB: photos of many sizes, decoded one by one and resized (the only set resized here).
    from PIL import Image

    n = len(ds)  # type: ignore[arg-type]
    x = np.empty((n, GTSRB_SIZE, GTSRB_SIZE, 3), dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        image, label = ds[i]  # type: ignore[index]
        x[i] = np.asarray(image.convert("RGB").resize((GTSRB_SIZE, GTSRB_SIZE), Image.Resampling.BILINEAR))
        y[i] = label
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def data_for(cfg: Any, val_indices: Any = None) -> "ImageDataset":
    """A run's data (``cfg``: a :class:`cuba.config.TrainConfig`): the validation split is carved
    from the full training set first (a fixed seed of its own; or exactly ``val_indices``, a
    finished run's recorded split: :meth:`cuba.runs.RunFolder.data`), then ``n_train`` /
    ``n_test`` subsets are drawn with the run's seed. The one way training, evaluation, the
    defenses and import-model get a run's images, so all of them see the same split."""
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    if val_indices is not None and len(val_indices):
        data = data.with_validation(cfg.val_fraction, indices=val_indices)
    elif cfg.val_fraction > 0:
        data = data.with_validation(cfg.val_fraction)
    if cfg.n_train or cfg.n_test:
        data = data.subset(cfg.n_train, cfg.n_test, seed=cfg.seed)
    return data
