"""Tests for cuba.data's named data sets: digits, MNIST, GTSRB and CIFAR-100 found by name (local
.npz, torchvision's layout, --download), paths under data_dir, the gtsrb-cpu preset, and stratified
subsets. Split from test_data.py (file formats), whose ``write_npz`` and ``RNG`` it uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cuba.data import DATASET_NAMES, DataError, ImageDataset, load_dataset

from test_data import RNG, write_npz

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


def test_validation_split_image_by_image_is_unchanged_by_groups() -> None:
    from cuba.data.split import indices_hash, stratified_split

    # pinned from the split as drawn before groups existed: every ungrouped data set (MNIST, digits,
    # CIFAR) must keep holding out the same images, or old runs' validation numbers stop comparing
    y = torch.arange(500) % 7
    y[:3] = 6
    rest, val = stratified_split(y, 0.1)
    assert indices_hash(val) == "4ded0dd755fc76175b183916d73b363712d57ae0784630c1958e54d77631b127"
    assert len(rest) + len(val) == 500 and not set(rest.tolist()) & set(val.tolist())
    with pytest.raises(ValueError, match="group_size must be a positive number of images, got 0"):
        stratified_split(y, 0.1, group_size=0)


def test_grouped_validation_split_holds_out_whole_tracks() -> None:
    from cuba.data.split import stratified_split

    # GTSRB-like: classes stored one after another in tracks of 30 frames; class 2 ends on a short track
    sizes = [300, 90, 59, 30]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    rest, val = stratified_split(y, 0.1, group_size=30)
    assert len(rest) + len(val) == len(y) and not set(rest.tolist()) & set(val.tolist())
    start = 0
    for c, n in enumerate(sizes):
        pos = [i - start for i in val.tolist() if start <= i < start + n]
        tracks = {p // 30 for p in pos}
        # whole tracks only: every frame of a chosen track is held out, none of the others
        assert sorted(pos) == [p for p in range(n) if p // 30 in tracks]
        expected = {300: 1, 90: 1, 59: 1, 30: 0}[n]  # round(0.1 * 10) = 1; at least one; never a class's only track
        assert len(tracks) == expected, (c, tracks)
        start += n


def test_gtsrb_validation_split_is_grouped_by_track_and_others_are_not() -> None:
    y = torch.arange(120) // 60  # two classes of 60 images: two tracks each
    x = torch.zeros(120, 3, 4, 4, dtype=torch.uint8)
    gtsrb = ImageDataset("gtsrb", x, y, x[:2], y[:2] * 0, ["a", "b"]).with_validation(0.3)
    idx = gtsrb.val_indices.tolist()
    tracks = sorted({i // 30 for i in idx})  # one of each class's two tracks, whole
    assert len(tracks) == 2 and tracks[0] in (0, 1) and tracks[1] in (2, 3)
    assert idx == [i for i in range(120) if i // 30 in tracks]
    plain = ImageDataset("digits", x, y, x[:2], y[:2] * 0, ["a", "b"]).with_validation(0.3)
    assert len(plain.val_indices) == 36  # round(0.3 * 60) images per class, drawn one by one
