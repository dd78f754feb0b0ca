"""Tests for cuba.data loading of files: .npz files, ImageFolder trees (directory and zip).

Named data sets (digits, MNIST, GTSRB, CIFAR-100, data_dir look-ups) and stratified subsets are in
test_data_named.py, which imports this file's ``write_npz`` and ``RNG``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cuba.data import DataError, ImageDataset, load_dataset

RNG = np.random.default_rng(0)


def write_npz(path: Path, **overrides: object) -> Path:
    """A tiny valid npz (3 classes, 8x8 grayscale); keyword arguments replace or drop (None) arrays."""
    arrays: dict[str, object] = {
        "x_train": RNG.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        "y_train": np.arange(12, dtype=np.int32) % 3,
        "x_test": RNG.integers(0, 256, (6, 8, 8), dtype=np.uint8),
        "y_test": np.arange(6, dtype=np.uint8) % 3,
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_tree(root: Path, size: tuple[int, int] = (8, 8), mode: str = "RGB", test_name: str = "test") -> dict[str, np.ndarray]:
    """ImageFolder tree of PNGs with classes 'cat' and 'ant' (so sorting matters); returns pixels by path."""
    pixels = {}
    for split, n in (("train", 3), (test_name, 2)):
        for cls in ("cat", "ant"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                arr = RNG.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(arr, mode=mode).save(root / split / cls / f"{i}.png")
                pixels[f"{split}/{cls}/{i}.png"] = arr
    return pixels


def zip_tree(src: Path, dest: Path, inner: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, inner + f.relative_to(src).as_posix())
    return dest


# --- .npz files ------------------------------------------------------------------------------

def test_npz_grayscale_hw(tmp_path: Path) -> None:
    ds = load_dataset(str(write_npz(tmp_path / "tiny.npz")))
    assert isinstance(ds, ImageDataset) and ds.name == "tiny"
    assert ds.x_train.shape == (12, 1, 8, 8) and ds.x_test.shape == (6, 1, 8, 8)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert ds.classes == ["0", "1", "2"]


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_hwc_layout(tmp_path: Path, channels: int) -> None:
    x = RNG.integers(0, 256, (12, 8, 8, channels), dtype=np.uint8)
    ds = load_dataset(write_npz(tmp_path / "c.npz", x_train=x, x_test=x[:6], y_test=np.arange(6) % 3))
    assert ds.x_train.shape == (12, channels, 8, 8)
    assert torch.equal(ds.x_train, torch.from_numpy(x).permute(0, 3, 1, 2))


def test_npz_keras_labels_and_class_names(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "k.npz", y_train=(np.arange(12) % 3)[:, None], classes=np.array(["a", "b", "c"]))
    ds = load_dataset(path)
    assert ds.y_train.shape == (12,) and ds.classes == ["a", "b", "c"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"y_test": None, "x_test": None}, r"missing key\(s\) x_test, y_test"),
        ({"x_train": np.zeros((12, 8, 8), np.float32)}, "dtype float32; images must be uint8"),
        ({"x_train": np.zeros((12, 64), np.uint8)}, r"shape \(12, 64\); expected \(N, H, W\)"),
        ({"x_train": np.zeros((12, 3, 8, 8), np.uint8)}, r"expected \(N, H, W\) or \(N, H, W, C\)"),
        ({"y_train": np.zeros(11, np.int64)}, "x_train has 12 images but y_train has 11 labels"),
        ({"y_train": np.zeros(12, np.float64)}, "labels must be integers"),
        ({"x_train": np.zeros((12, 8, 6), np.uint8)}, "images must be square"),
        ({"y_train": np.array(["a"] * 12, dtype=object)}, "object \\(pickled\\) arrays, which are never loaded"),
    ],
)
def test_npz_errors(tmp_path: Path, overrides: dict, message: str) -> None:
    path = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError, match=message):
        load_dataset(path)


def test_npz_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not numpy data at all")
    with pytest.raises(DataError, match="junk.npz: not a valid .npz file"):
        load_dataset(junk)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="not a valid .npz file"):
        load_dataset(empty)


def test_npz_truncated(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "full.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DataError, match="cut.npz: (not a valid|corrupt or truncated) .npz"):
        load_dataset(cut)


def test_single_npy_array_renamed_npz(tmp_path: Path) -> None:
    path = tmp_path / "arr.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match="single array, not an .npz archive"):
        load_dataset(path)


# --- ImageFolder trees -----------------------------------------------------------------------

def test_folder_rgb_pngs(tmp_path: Path) -> None:
    pixels = write_tree(tmp_path / "shapes")
    ds = load_dataset(tmp_path / "shapes")
    assert ds.name == "shapes" and ds.classes == ["ant", "cat"]
    assert ds.x_train.shape == (6, 3, 8, 8) and ds.x_test.shape == (4, 3, 8, 8)
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1] and ds.y_test.tolist() == [0, 0, 1, 1]
    # PNG is lossless: pixels round-trip exactly, in class-then-file-name order.
    assert np.array_equal(ds.x_train[3].permute(1, 2, 0).numpy(), pixels["train/cat/0.png"])


def test_folder_grayscale_nested_and_val_alias(tmp_path: Path) -> None:
    write_tree(tmp_path / "outer" / "inner", mode="L", test_name="val")
    ds = load_dataset(str(tmp_path / "outer"))
    assert ds.x_train.shape == (6, 1, 8, 8) and ds.x_test.shape == (4, 1, 8, 8)


def test_folder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    write_tree(tmp_path / "t")
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "t" / "train" / "ant" / "9.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 40)).save(tmp_path / "t" / "test" / "cat" / "9.png")
    ds = load_dataset(tmp_path / "t")
    assert ds.channels == 3 and ds.x_test[-1, :, 0, 0].tolist() == [10, 20, 30]


def test_zip_matches_directory(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree")
    from_dir = load_dataset(tmp_path / "tree")
    for inner in ("", "tree/"):
        ds = load_dataset(zip_tree(tmp_path / "tree", tmp_path / f"z{len(inner)}.zip", inner))
        assert ds.classes == from_dir.classes
        assert torch.equal(ds.x_train, from_dir.x_train) and torch.equal(ds.y_test, from_dir.y_test)


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "cat" / "0.png")
    with pytest.raises(DataError, match=r"expected train/ and test/ \(or val/\) folders"):
        load_dataset(tmp_path / "flat")

    write_tree(tmp_path / "wide", size=(10, 8))
    with pytest.raises(DataError, match=r"train/ant/0.png is 10x8 pixels; images must be square"):
        load_dataset(tmp_path / "wide")

    write_tree(tmp_path / "mixed")
    Image.new("RGB", (6, 6)).save(tmp_path / "mixed" / "test" / "cat" / "7.png")
    with pytest.raises(DataError, match="test/cat/7.png is 6x6 pixels but .* is 8x8"):
        load_dataset(tmp_path / "mixed")

    write_tree(tmp_path / "extra")
    (tmp_path / "extra" / "test" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "extra" / "test" / "dog" / "0.png")
    with pytest.raises(DataError, match="missing from train/: dog"):
        load_dataset(tmp_path / "extra")

    write_tree(tmp_path / "broken")
    (tmp_path / "broken" / "train" / "ant" / "5.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="train/ant/5.png: not a readable image"):
        load_dataset(tmp_path / "broken")


def test_bad_zip_and_missing_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="bad.zip: not a readable zip archive"):
        load_dataset(bad)
    with pytest.raises(DataError, match=r"no such file or directory, and not a known data set name \([^)]*\)$"):
        load_dataset(str(tmp_path / "nowhere.zip"))  # absolute: no hint
    with pytest.raises(DataError, match="a relative path is read from the working folder: .* pass --data-dir FOLDER"):
        load_dataset("nowhere-relative.npz")
    other = tmp_path / "data.csv"
    other.write_text("1,2")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_dataset(other)
