"""Load ImageFolder-style trees, from a directory or straight out of a ``.zip`` archive.

Layout: ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>`` (``val`` is accepted
in place of ``test``), where ``<root>`` is the directory or archive itself or its single
top-level folder (archives are usually made by zipping one folder). Class indices follow the
sorted class folder names of ``train/``, as torchvision's ``ImageFolder`` does, so a model
trained here and one trained on the same tree with torchvision agree on label numbers.

Archives are read member by member with :mod:`zipfile` and decoded in memory: extracting 60,000
small files to disk would cost more than decoding them and would leave litter behind.
Images are never resized: a tree whose images differ in size, or are not square, is rejected
with the name of an offending file, since silently rescaling part of a data set would make
results hard to trust.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from cuba.data.base import DataError, ImageDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEST_FOLDER_NAMES = ("test", "val")
_GRAY_MODES = ("L", "1", "LA")  # decoded to one channel; every other mode becomes RGB


def load_image_folder(path: str | Path) -> ImageDataset:
    """Load a directory or ``.zip`` archive laid out as ImageFolder train/test trees.

    The data set is named after the directory or the archive (without ``.zip``).
    """
    path = Path(path)
    if path.is_dir():
        files = _list_directory(path)
        return _build(path.name, str(path), files, lambda rel: (path / rel).read_bytes())
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e})") from e
    with archive:
        files = [info.filename for info in archive.infolist() if not info.is_dir()]
        return _build(path.stem, str(path), files, archive.read)


def _hidden(rel: str) -> bool:
    """Dot files and macOS ``__MACOSX`` resource forks are not part of the data set."""
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _list_directory(root: Path) -> list[str]:
    """Every file below ``root`` as a '/'-separated path relative to it (same form as zip names)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        stem = "" if rel_dir == "." else rel_dir + "/"
        out.extend(stem + name for name in filenames)
    return out


def _subfolders(files: list[str], prefix: str) -> set[str]:
    """Names of the folders directly under ``prefix`` that hold at least one file."""
    n = len(prefix)
    return {f[n:].split("/", 1)[0] for f in files if f.startswith(prefix) and "/" in f[n:]}


def _locate_splits(files: list[str], where: str) -> tuple[str, str]:
    """Return (prefix of the tree root, name of the test folder), looking one level deep at most."""
    top = _subfolders(files, "")
    candidates = [""] + ([f"{next(iter(top))}/"] if len(top) == 1 else [])
    for prefix in candidates:
        sub = top if prefix == "" else _subfolders(files, prefix)
        test = next((t for t in TEST_FOLDER_NAMES if t in sub), None)
        if "train" in sub and test is not None:
            return prefix, test
    found = ", ".join(sorted(top)[:6]) or "no folders"
    raise DataError(
        f"{where}: expected train/ and test/ (or val/) folders with one subfolder per class, "
        f"at the top or inside a single folder; found {found}"
    )


def _decode(data: bytes, where: str) -> np.ndarray:
    """Decode one image to uint8 (H, W) for grayscale or (H, W, 3) for everything else."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in _GRAY_MODES:
                im = im if im.mode == "L" else im.convert("L")
            elif im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: not a readable image ({e})") from e


def _build(name: str, where: str, files: list[str], read: Callable[[str], bytes]) -> ImageDataset:
    """Group files into splits and classes, decode them, check sizes and stack into tensors."""
    prefix, test_folder = _locate_splits([f for f in files if not _hidden(f)], where)
    split_of = {"train": "train", test_folder: "test"}
    members: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}  # split -> (class, file)
    for f in files:
        if not f.startswith(prefix) or _hidden(f) or not f.lower().endswith(IMAGE_EXTENSIONS):
            continue
        parts = f[len(prefix):].split("/")
        if len(parts) >= 3 and parts[0] in split_of:  # <split>/<class>/[subfolders/]<image>
            members[split_of[parts[0]]].append((parts[1], f))

    classes = sorted({c for c, _ in members["train"]})
    if not classes:
        raise DataError(f"{where}: {prefix}train/ holds no images in class folders (expected train/<class>/<image>.png)")
    if not members["test"]:
        raise DataError(f"{where}: {prefix}{test_folder}/ holds no images in class folders")
    extra = sorted({c for c, _ in members["test"]} - set(classes))
    if extra:
        raise DataError(f"{where}: {prefix}{test_folder}/ has class folder(s) missing from train/: {', '.join(extra[:5])}")
    index = {c: i for i, c in enumerate(classes)}

    size: tuple[int, int] | None = None
    first = ""
    decoded: dict[str, list[np.ndarray]] = {}
    labels: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        items = sorted(members[split], key=lambda m: (index[m[0]], m[1]))
        arrays = []
        for _, f in items:
            try:
                data = read(f)
            except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as e:
                raise DataError(f"{where}: cannot read {f} ({e})") from e
            arr = _decode(data, f"{where}: {f}")
            h, w = arr.shape[:2]
            if h != w:
                raise DataError(f"{where}: {f} is {w}x{h} pixels; images must be square (resize the data set first)")
            if size is None:
                size, first = (h, w), f
            elif (h, w) != size:
                raise DataError(
                    f"{where}: {f} is {w}x{h} pixels but {first} is {size[1]}x{size[0]}; all images must share one size"
                )
            arrays.append(arr)
        decoded[split] = arrays
        labels[split] = torch.tensor([index[c] for c, _ in items], dtype=torch.int64)

    # One colour image makes the whole set RGB: real trees often hold a few grayscale files.
    channels = 3 if any(a.ndim == 3 for arrays in decoded.values() for a in arrays) else 1
    assert size is not None
    tensors = {}
    for split, arrays in decoded.items():
        x = np.empty((len(arrays), size[0], size[1], channels), dtype=np.uint8)
        for i, a in enumerate(arrays):
            x[i] = a if a.ndim == 3 else a[..., None]
        tensors[split] = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(name, tensors["train"], labels["train"], tensors["test"], labels["test"], classes)
