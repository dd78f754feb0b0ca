"""Property-based fuzzing (hypothesis): bad configs and corrupted files end as one clear error, never a crash.

800 generated cases in all (>= 500 asked for): make_config on 300 arbitrary mappings; the CLI
on 150 arbitrary config files; 100 .npz files with arbitrary array shapes/dtypes/labels; 125
corrupted .npz and 125 corrupted ImageFolder .zip files (truncated and byte-flipped).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuba.cli import main
from cuba.config import FIELDS, ConfigError, make_config
from cuba.data import DataError
from cuba.data.folders import load_image_folder
from cuba.data.sources import load_npz

VALUES = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=12) | st.lists(st.integers(-3, 12), max_size=3)
          | st.dictionaries(st.text(max_size=3), st.integers(-3, 12), max_size=2))
KEYS = st.sampled_from(sorted(FIELDS)) | st.text(min_size=1, max_size=8)


def fuzz(n: int) -> settings:
    """n cases, derandomized (the same cases on every run: CI never flakes), no example database on disk."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@fuzz(300)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_make_config_accepts_or_names_the_field(values: dict) -> None:
    try:
        make_config(values)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and ":" in msg  # one line, "field: what is wrong"


@fuzz(150)
@given(st.dictionaries(KEYS, VALUES, max_size=5) | st.text(max_size=60))
def test_cli_train_with_any_config_file_exits_2(tmp_path: Path, content) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    # --epochs -1 makes every config invalid, so no case ever starts a training
    assert main(["train", "--config", str(path), "--epochs", "-1", "--no-progress"]) == 2


def _npz_bytes(n: int = 6, size: int = 8) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez_compressed(buf, x_train=rng.integers(0, 255, (n, size, size), dtype=np.uint8), y_train=np.arange(n) % 3,
                        x_test=rng.integers(0, 255, (n, size, size), dtype=np.uint8), y_test=np.arange(n) % 3)
    return buf.getvalue()


GOOD_NPZ = _npz_bytes()


def _corrupt(good: bytes, cut: int, flips: list, path: Path) -> Path:
    """Write ``good`` truncated at ``cut`` with the byte ``flips`` applied."""
    data = bytearray(good[:cut])
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    path.write_bytes(bytes(data))
    return path


ARRAYS = st.sampled_from([np.uint8, np.int64, np.float32, np.bool_]).flatmap(
    lambda dt: st.lists(st.integers(0, 6), min_size=0, max_size=5).map(lambda shape: np.zeros(shape, dtype=dt)))
LABELS = st.lists(st.integers(-5, 300), max_size=8).map(np.array) | ARRAYS


@fuzz(100)
@given(ARRAYS, LABELS, ARRAYS, LABELS)
def test_npz_with_any_arrays_is_loaded_or_refused(tmp_path: Path, xtr, ytr, xte, yte) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    try:
        ds = load_npz(path)
    except DataError:
        return
    assert len(ds.x_train) == len(ds.y_train) and ds.y_train.min() >= 0


def _zip_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("train", "test"):
            for c in ("a", "b"):
                img = io.BytesIO()
                Image.fromarray(np.full((8, 8), 40 if c == "a" else 200, dtype=np.uint8)).save(img, format="PNG")
                z.writestr(f"{split}/{c}/0.png", img.getvalue())
    return buf.getvalue()


GOOD_ZIP = _zip_bytes()


FRACTION = st.floats(0.0, 1.0)


@pytest.mark.parametrize("kind", ["npz", "zip"])
@fuzz(125)  # x 2 kinds
@given(FRACTION, st.lists(st.tuples(FRACTION, st.integers(0, 255)), max_size=8))
def test_corrupted_files_are_data_errors(tmp_path: Path, kind: str, cut: float, flips: list) -> None:
    good, load = (GOOD_NPZ, load_npz) if kind == "npz" else (GOOD_ZIP, load_image_folder)
    n = len(good)
    path = _corrupt(good, round(cut * n), [(min(n - 1, int(f * n)), v) for f, v in flips], tmp_path / f"d.{kind}")
    try:
        load(path)
    except DataError:
        pass


def test_the_good_files_load() -> None:
    """The fuzzers corrupt files that are valid to begin with (else they would prove little)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "g.npz").write_bytes(GOOD_NPZ)
        (Path(d) / "g.zip").write_bytes(GOOD_ZIP)
        assert len(load_npz(Path(d) / "g.npz").y_train) == 6
        assert load_image_folder(Path(d) / "g.zip").num_classes == 2
    with pytest.raises(ConfigError, match=r"^epochs: must be a number > 0, got inf"):
        make_config({"epochs": float("inf")})
