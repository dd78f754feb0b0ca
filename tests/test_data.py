"""Tests for cuba.data loading: .npz files, ImageFolder trees (directory and zip), named sets."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cuba.data import DATASET_NAMES, DataError, ImageDataset, load_dataset

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
    with pytest.raises(DataError, match="no such file or directory, and not a known data set name"):
        load_dataset(str(tmp_path / "nowhere.zip"))
    other = tmp_path / "data.csv"
    other.write_text("1,2")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_dataset(other)


# --- named data sets -------------------------------------------------------------------------

def test_names() -> None:
    assert DATASET_NAMES == ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "gtsrb")


def test_digits() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 16, 16) and ds.x_test.shape == (360, 1, 16, 16)
    assert ds.classes == [str(i) for i in range(10)]
    assert int(ds.x_train.max()) > 200  # rescaled to 0..255, not left at 0..16
    counts = torch.bincount(ds.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified
    again = load_dataset("Digits")
    assert torch.equal(again.x_test, ds.x_test) and torch.equal(again.y_train, ds.y_train)


def test_named_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar10: not found locally .*cifar10\.npz.*--download.*--data-dir"):
        load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(DataError, match="--download"):
        load_dataset("gtsrb", data_dir=tmp_path / "absent")


def test_named_npz_in_data_dir(tmp_path: Path) -> None:
    y = np.arange(20) % 10
    x = RNG.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    write_npz(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.name == "mnist" and ds.x_train.shape == (20, 1, 28, 28) and ds.num_classes == 10


def test_real_mnist_npz(shared_data: Path) -> None:
    path = shared_data / "mnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ds = load_dataset(str(path))
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.y_train.dtype == torch.int64


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array in the idx format torchvision's MNIST class reads from <root>/MNIST/raw."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_named_from_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x = RNG.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    y = (np.arange(20) % 10).astype(np.uint8)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:n])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y[:n])
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(x)) and ds.y_test.tolist() == list(range(10))
    assert ds.num_classes == 10 and ds.classes[0].startswith("0")


def test_gtsrb_from_torchvision_layout_is_resized(tmp_path: Path) -> None:
    base = tmp_path / "gtsrb" / "GTSRB"
    for k, size in ((0, (40, 36)), (1, (20, 20))):  # photos of varying size, as in the real set
        (base / "Training" / f"{k:05d}").mkdir(parents=True)
        Image.new("RGB", size, (200, 10 * k, 0)).save(base / "Training" / f"{k:05d}" / "a.ppm")
    (base / "Final_Test" / "Images").mkdir(parents=True)
    Image.new("RGB", (50, 60), (0, 0, 255)).save(base / "Final_Test" / "Images" / "00000.ppm")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;1\n")
    ds = load_dataset("gtsrb", data_dir=tmp_path)
    assert ds.x_train.shape == (2, 3, 32, 32) and ds.x_test.shape == (1, 3, 32, 32)
    assert ds.y_train.tolist() == [0, 1] and ds.y_test.tolist() == [1] and ds.classes == ["0", "1"]
    assert ds.x_test[0, :, 5, 5].tolist() == [0, 0, 255]


def test_relative_path_found_under_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cuba.data.sources import dataset_file, find_path

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "set.npz", x_train=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), y_train=np.arange(6) % 2,
             x_test=rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), y_test=np.arange(2))
    monkeypatch.chdir(tmp_path.parent)  # "set.npz" does not exist relative to the working directory
    assert find_path("set.npz") is None and find_path("set.npz", tmp_path) == tmp_path / "set.npz"
    assert len(load_dataset("set.npz", data_dir=tmp_path).y_train) == 6
    assert dataset_file("set.npz", tmp_path) == (tmp_path / "set.npz").resolve()
    with pytest.raises(DataError, match=r"^set.npz: no such file or directory \(nor under data_dir .*\)"):
        load_dataset("set.npz", data_dir=tmp_path / "elsewhere")


# --- CIFAR-100: no offline copy on these machines; the local .npz and --download paths ----------

def _write_cifar100(path: Path) -> Path:
    """A tiny synthetic cifar100.npz: 100 classes, 32x32 RGB, 2 training and 1 test image each."""
    y = np.arange(200) % 100
    return write_npz(path, x_train=RNG.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), y_train=y,
                     x_test=RNG.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), y_test=y[:100])


def test_local_cifar100_npz_is_loaded_without_a_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cifar100.npz in data_dir is what --dataset cifar100 reads, even with --download: local first."""
    from cuba.data import sources

    _write_cifar100(tmp_path / "cifar100.npz")
    monkeypatch.setattr(sources, "_from_torchvision", lambda *a, **k: pytest.fail("torchvision must not be asked"))
    for download in (False, True):
        ds = load_dataset("cifar100", data_dir=tmp_path, download=download)
        assert ds.name == "cifar100" and ds.num_classes == 100 and ds.x_train.shape == (200, 3, 32, 32)
    assert sources.missing_copy("cifar100", tmp_path) is None


def test_cifar100_download_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a local copy, torchvision is asked for its files (download=False) and nothing else,
    unless download=True; the download itself is faked here (no test may need the network)."""
    from cuba.data import sources

    calls: list[bool] = []

    def fake(name: str, root: Path, download: bool) -> ImageDataset:
        calls.append(download)
        if not download:
            raise RuntimeError("Dataset not found or corrupted")
        x = torch.zeros((100, 3, 32, 32), dtype=torch.uint8)
        return ImageDataset(name, x, torch.arange(100), x[:10], torch.arange(10), [str(i) for i in range(100)])

    monkeypatch.setattr(sources, "_from_torchvision", fake)
    with pytest.raises(DataError, match=r"^cifar100: not found locally .*cifar100\.npz.*pass --download"):
        load_dataset("cifar100", data_dir=tmp_path)
    assert calls == [False]
    assert load_dataset("cifar100", data_dir=tmp_path, download=True).num_classes == 100
    assert calls == [False, False, True]
    # what cuba reproduce marks blocked: named sets with no local copy and no --download
    assert sources.missing_copy("cifar100", tmp_path) == (
        "no local copy of cifar100 (pass --download on a machine with a network, or put cifar100.npz in --data-dir)")
    assert sources.missing_copy("cifar100", tmp_path, download=True) is None
    (tmp_path / "cifar-100-python").mkdir()  # torchvision's own folder counts as a local copy
    assert sources.missing_copy("cifar100", tmp_path) is None
    assert sources.missing_copy("digits", tmp_path / "absent") is None  # ships with scikit-learn


def test_cifar100_npz_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cuba train --dataset cifar100 --data-dir DIR` finds DIR/cifar100.npz (a tiny clean run)."""
    import json

    from cuba.cli import main

    _write_cifar100(tmp_path / "cifar100.npz")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar100", "--data-dir", str(tmp_path), "--model", "simplecnn", "--attack", "none",
                 "--epochs", "1", "--batch-size", "100", "--device", "cpu", "--precision", "fp32", "--out", str(out),
                 "--no-progress", "--set", "val_fraction=0", "--set", "channels_last=false"]) == 0
    assert "using the cifar100 preset" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "cifar100" and metrics["num_classes"] == 100 and metrics["n_train"] == 200


# --- GTSRB: the shared copy and the gtsrb-cpu preset --------------------------------------------

GTSRB_CPU = Path(__file__).resolve().parents[1] / "src" / "cuba" / "configs" / "gtsrb-cpu.yaml"


def test_gtsrb_cpu_preset_loads_the_shared_gtsrb(shared_data: Path) -> None:
    """The gtsrb-cpu preset validates for every Table II setting and finds ../shared/data/gtsrb.npz
    by name: 43 classes, 39,209 training and 12,630 test images, 32x32 RGB."""
    from cuba.config import load_config_file, make_config

    if not (shared_data / "gtsrb.npz").is_file():
        pytest.skip(f"{shared_data / 'gtsrb.npz'} not present")
    preset = load_config_file(GTSRB_CPU)
    assert preset["model"] == "preactresnet18" and preset["augment"] == "crop"  # the paper's model; no flip
    for extra in ({"variant": "fra"}, {"variant": "nra-5"}, {"variant": "nra-2"}, {"attack": "none"}):
        cfg = make_config({**preset, "data_dir": str(shared_data), **extra})
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    assert ds.name == "gtsrb" and ds.num_classes == 43 and len(ds.y_train) == 39209 and len(ds.y_test) == 12630
    assert ds.x_train.shape[1:] == (3, 32, 32)


@pytest.mark.slow  # PreActResNet18 steps and a 392-image validation pass on 2 CPU cores
def test_gtsrb_cpu_preset_trains_a_few_steps(shared_data: Path, tmp_path: Path) -> None:
    """Smoke test, not a result: a few CUBA FRA steps of the preset on the real GTSRB end to end."""
    import json

    from cuba.cli import main

    if not (shared_data / "gtsrb.npz").is_file():
        pytest.skip(f"{shared_data / 'gtsrb.npz'} not present")
    out = tmp_path / "run"
    # 1,024 training images: a random 256 can miss GTSRB's rarest classes, which the loader refuses
    assert main(["train", "--config", str(GTSRB_CPU), "--data-dir", str(shared_data), "--variant", "fra",
                 "--n-train", "1024", "--n-test", "128", "--epochs", "0.05", "--device", "cpu", "--no-progress",
                 "--set", "val_fraction=0.01", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 43 and metrics["n_test"] == 128 and metrics["setting"] == "cuba-fra"


def test_stratified_subset_keeps_every_class_in_proportion() -> None:
    from cuba.data.split import stratified_subset

    # a GTSRB-like long tail: class c has 10 * (c + 1) images, two rare classes with 3 images
    y = torch.cat([torch.full((10 * (c + 1),), c) for c in range(8)] + [torch.full((3,), 8), torch.full((3,), 9)])
    idx = stratified_subset(y, 30, seed=0)
    counts = torch.bincount(y[idx], minlength=10)
    assert len(idx) == 30 and (counts >= 1).all()  # the random draw this replaced left rare classes empty
    assert idx.equal(idx.sort().values) and len(set(idx.tolist())) == 30
    assert counts[7] > counts[0]  # proportional: the big class keeps more
    assert idx.equal(stratified_subset(y, 30, seed=0)) and not idx.equal(stratified_subset(y, 30, seed=1))
    assert len(stratified_subset(y, 5, seed=0)) == 5  # fewer rows than classes: exact size, no floor
    assert stratified_subset(y, 10_000).equal(torch.arange(len(y)))
    with pytest.raises(ValueError, match="n >= 0"):
        stratified_subset(y, -1)


def test_subset_of_a_long_tailed_set_leaves_no_class_empty() -> None:
    from cuba.data.base import validate_dataset

    y = torch.cat([torch.zeros(500, dtype=torch.long), torch.arange(1, 43).repeat_interleave(2)])
    x = torch.zeros(len(y), 3, 8, 8, dtype=torch.uint8)
    ds = ImageDataset("longtail", x, y, x[:43], torch.arange(43), [str(c) for c in range(43)])
    small = ds.subset(n_train=64, seed=0)
    assert len(small.y_train) == 64 and torch.unique(small.y_train).numel() == 43
    validate_dataset(small)
