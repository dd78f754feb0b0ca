"""cuba bench on a tiny case (the real cases are benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest

from cuba import bench
from cuba.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_json_has_the_ratios(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "CASES", (("tiny_rgb", "simplecnn", 3, 16, "crop+flip", 3, 3), ("tiny_gray", "simplecnn", 1, 16, "none", 3, 3)))
    assert main(["bench", "--quick", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    for case in ("tiny_rgb", "tiny_gray"):
        r = res[case]
        assert r["engine_clean_img_s"] > 0 and r["reference_img_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["cuba_step_over_clean_step"] == pytest.approx(r["engine_clean_img_s"] / r["engine_cuba_img_s"], rel=1e-2)
        assert r["cuba_step_over_clean_step"] > 1.0  # a CUBA step does strictly more work
        assert r["cuba_half_res_step_over_clean_step"] == pytest.approx(r["engine_clean_img_s"] / r["engine_cuba_half_res_img_s"], rel=1e-2)
    assert res["engine_over_reference"] == min(res[c]["engine_over_reference"] for c in ("tiny_rgb", "tiny_gray"))
    assert main(["bench", "--quick", "--device", "cpu"]) == 0
    assert "CUBA/clean step" in capsys.readouterr().out
