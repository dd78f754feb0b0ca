"""The scripts in benchmarks/ still run (tiny sizes): they back numbers in BENCHMARKS.md."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_script(name: str, args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(BENCH / name), run_name="__main__")
    return json.loads(capsys.readouterr().out)


def test_step_breakdown_splits_the_step_and_profiles_the_passes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = _run_script("step_breakdown.py", ["--steps", "1", "--repeats", "1", "--profile", "--json"], capsys, monkeypatch)
    assert out["model"] == "simplecnn" and out["clean_steps"]["clean step"] == 1.0
    assert len(out["ms"]) == 8 and all(v > 0 for v in out["ms"].values())
    # the full-resolution U-Net has more multiply-adds than SimpleCNN: the reason its ratio is far above 2
    macs = out["forward_mmacs_per_image"]
    assert macs["unet scale 1 width 16"] > macs["simplecnn"] > macs["unet scale 2 width 16"]
    # which aten ops the profiler lists depends on the CPU's kernels (oneDNN fuses differently on
    # AVX2 and AMX machines) and on torch's version: only the table's shape is pinned here
    prof = out["profile_ms_per_step"]
    assert prof and all(len(v) == 2 and all(t >= 0 for t in v) for v in prof.values())


def test_nc_scaling_times_each_number_of_classes_per_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from cuba.config import make_config
    from cuba.pipeline import run_training

    run = tmp_path / "run"
    run_training(make_config({"dataset": "digits", "attack": "badnets", "epochs": 1, "batch_size": 64, "progress": False,
                              "device": "cpu", "precision": "fp32", "out": str(run)}))
    capsys.readouterr()
    out = _run_script("nc_batched.py", [str(run), "--scaling", "--epochs", "1"], capsys, monkeypatch)
    assert [k for k in out if k.endswith("_per_pass")] == ["1_classes_per_pass", "2_classes_per_pass", "5_classes_per_pass", "10_classes_per_pass"]
    assert out["10_classes_per_pass"]["images_per_pass"] == 10 * out["batch_size_per_class"]
    assert out["best_speedup_from_batching"] >= 1.0  # the 1-class case is among those compared
