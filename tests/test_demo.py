"""End to end: `cuba demo` on the bundled digits data reaches the advertised attack levels."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cuba.cli import main


def test_demo_end_to_end(tmp_path: Path, capsys) -> None:
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "clean" in out and "cuba-fra" in out
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    cuba = json.loads((tmp_path / "cuba-fra" / "metrics.json").read_text())
    assert clean["ca"] >= 0.95
    assert cuba["asr"] >= 0.90, cuba
    assert cuba["ds"] >= 0.85, cuba
    assert cuba["ca"] >= clean["ca"] - 0.03, (cuba["ca"], clean["ca"])
    assert cuba["psnr"] >= 20.0
    assert seconds < 300, f"demo took {seconds:.0f} s (budget: 5 minutes on 2 cores)"
    for f in ("figures/triggers.png", "figures/histograms.png", "predictions.npz", "generator.safetensors"):
        assert (tmp_path / "cuba-fra" / f).is_file(), f
