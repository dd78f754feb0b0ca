"""``cuba pack``: one checksummed file per run that evaluate and defend accept like a run folder."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from cuba.cli import main
from cuba.pack import CARD, MANIFEST, is_pack, open_run, read_pack

TINY = ["--dataset", "digits", "--epochs", "2", "--n-train", "256", "--no-progress", "--device", "cpu"]
KEYS = ("ca", "asr", "asr_c", "ds", "ds_min", "d_p", "psnr", "ssim", "linf")


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pack")
    run_dir = root / "cuba-fra"
    assert main(["train", *TINY, "--attack", "cuba", "--out", str(run_dir)]) == 0
    assert main(["pack", str(run_dir), "--out", str(root / "model.cuba")]) == 0
    return run_dir, root / "model.cuba"


def _rewrite(src: Path, dst: Path, change) -> Path:  # noqa: ANN001 -- change(name, bytes) -> bytes
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as w:
        for name in z.namelist():
            w.writestr(name, change(name, z.read(name)))
    return dst


def test_pack_holds_the_run_with_checksums_and_a_model_card(packed: tuple[Path, Path]) -> None:
    run_dir, pack = packed
    assert is_pack(pack) and not is_pack(run_dir)
    members = read_pack(pack)
    for name in ("config.yaml", "metrics.json", "predictions.npz", "classifier.safetensors", "generator.safetensors",
                 "split.json", "targets.json", CARD, MANIFEST):
        assert name in members, name
    assert members["classifier.safetensors"] == (run_dir / "classifier.safetensors").read_bytes()
    manifest = json.loads(members[MANIFEST])
    assert manifest["format"] == "cuba-pack" and manifest["version"] == 1 and "predictions.npz" in manifest["sha256"]
    card = members[CARD].decode()
    assert "may contain a backdoor planted on purpose" in card and "| ASR-C |" in card and "`cuba`" in card


def test_evaluate_a_pack_reproduces_the_runs_metrics_exactly(packed: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    run_dir, pack = packed
    capsys.readouterr()
    assert main(["evaluate", str(pack), "--json", "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    stored = json.loads((run_dir / "metrics.json").read_text())
    for k in KEYS:
        assert m[k] == stored[k], k
    assert open_run(pack).config() == open_run(run_dir).config()


def test_a_pack_is_read_only(packed: tuple[Path, Path], capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    _, pack = packed
    capsys.readouterr()
    assert main(["evaluate", str(pack), "--write"]) == 2
    assert "is a pack (read-only): --write needs a run folder" in capsys.readouterr().err
    assert main(["defend", "strip", str(pack)]) == 2
    assert "is a pack (read-only): give --out FOLDER" in capsys.readouterr().err
    args = ["defend", "strip", str(pack), "--out", str(tmp_path / "d"), "--device", "cpu",
            "--set", "n_overlay=8", "--set", "n_eval=40", "--set", "n_calib=40"]
    assert main(args) == 0
    assert json.loads((tmp_path / "d" / "strip" / "defense.json").read_text())["run"] == str(pack)


@pytest.mark.parametrize(("change", "needle"), [
    (lambda n, b: json.dumps({**json.loads(b), "version": 99}).encode() if n == MANIFEST else b,
     "pack format version 99 is not known to this cuba (it reads version 1)"),
    (lambda n, b: b[:-1] + bytes([b[-1] ^ 1]) if n == "classifier.safetensors" else b,
     "checksum failed for classifier.safetensors; the pack is damaged or was altered"),
])
def test_a_pack_that_fails_its_checks_is_refused_in_one_line(packed: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture, change, needle: str) -> None:  # noqa: ANN001
    bad = _rewrite(packed[1], tmp_path / "bad.cuba", change)
    capsys.readouterr()
    assert main(["evaluate", str(bad), "--from-predictions"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_pack_refuses_an_unfinished_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("dataset: digits\n")
    assert main(["pack", str(tmp_path / "r"), "--out", str(tmp_path / "x.cuba")]) == 2
    assert "is not a finished run folder (no metrics.json, classifier.safetensors)" in capsys.readouterr().err


def test_default_pack_name_keeps_the_whole_run_name_and_never_overwrites(packed: tuple[Path, Path], tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    run = tmp_path / "tau=0.1-s0"  # a sweep's folder name: a dot inside
    shutil.copytree(packed[0], run)
    monkeypatch.chdir(tmp_path)
    assert main(["pack", str(run)]) == 0
    assert is_pack(tmp_path / "tau=0.1-s0.cuba") and not (tmp_path / "tau=0.cuba").exists()
    capsys.readouterr()
    assert main(["pack", str(run)]) == 2
    assert "tau=0.1-s0.cuba exists; remove it first, or give another file name with --out" in capsys.readouterr().err


def test_data_found_by_file_name_under_data_dir(tmp_path: Path) -> None:
    from cuba.data.sources import find_path

    (tmp_path / "mnist.npz").write_bytes(b"x")
    assert find_path("../elsewhere/data/mnist.npz", tmp_path) == tmp_path / "mnist.npz"
    assert find_path("../elsewhere/data/other.npz", tmp_path) is None
