"""End to end: `cuba demo` on the bundled digits data reaches the advertised attack levels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuba.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys) -> None:
    # its wall time (README: 40 s on a bf16 CPU, about 100 s on an AVX2 one) is a benchmark
    # figure in BENCHMARKS.md, not an assertion: it depends on the machine
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "clean" in out and "cuba-fra" in out
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    cuba = json.loads((tmp_path / "cuba-fra" / "metrics.json").read_text())
    assert clean["ca"] >= 0.95
    assert cuba["asr"] >= 0.90, cuba
    assert cuba["ds"] >= 0.85, cuba
    assert cuba["ca"] >= clean["ca"] - 0.03, (cuba["ca"], clean["ca"])
    assert cuba["psnr"] >= 20.0
    for f in ("figures/triggers.png", "figures/histograms.png", "predictions.npz", "generator.safetensors"):
        assert (tmp_path / "cuba-fra" / f).is_file(), f
