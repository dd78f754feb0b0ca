"""cuba bench on a tiny case (the real cases are benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest

from cuba import allocator, bench
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
        assert r["cuba_step_speedup"] == pytest.approx(r["engine_cuba_cheap_img_s"] / r["engine_cuba_img_s"], rel=1e-2)
    assert res["cuba_step_speedup"] == min(res[c]["cuba_step_speedup"] for c in ("tiny_rgb", "tiny_gray"))
    assert res["cheap_step"] == {"generator_scale": 2, "backdoor_ratio": 0.5}
    assert res["engine_over_reference"] == min(res[c]["engine_over_reference"] for c in ("tiny_rgb", "tiny_gray"))
    assert res["host_allocator"] == allocator.keep_freed_memory() != "untouched"  # the CPU engine applied it
    assert res["repeats"] == 1 and r["engine_clean_range"][0] == r["engine_clean_range"][1] == r["engine_clean_img_s"]
    assert main(["bench", "--quick", "--device", "cpu", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "CUBA/clean step" in out and "median of 3 interleaved measurements" in out
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats: must be >= 1, got 0" in capsys.readouterr().err


def test_bench_reports_the_median_of_interleaved_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each number is the median of its repeats, and the measurements alternate between the kinds."""
    calls: list[str] = []
    clean = iter([100.0, 300.0, 200.0])

    def fake_engine(model, data, attack, augment, steps, batch, device, **fields):  # noqa: ANN001, ANN003
        kind = "clean" if attack == "none" else ("cheap" if "backdoor_ratio" in fields else "half" if fields else "cuba")
        calls.append(kind)
        return next(clean) if kind == "clean" else 80.0 if kind == "cheap" else 50.0

    monkeypatch.setattr(bench, "CASES", (("tiny", "simplecnn", 1, 16, "none", 2, 2),))
    monkeypatch.setattr(bench, "engine_throughput", fake_engine)
    monkeypatch.setattr(bench, "reference_throughput", lambda *a: calls.append("ref") or 40.0)
    r = bench.run_bench(device="cpu", repeats=3)["tiny"]
    assert calls == ["clean", "cuba", "half", "cheap", "ref"] * 3
    assert r["engine_clean_img_s"] == 200.0 and r["engine_clean_range"] == [100.0, 300.0]
    assert r["cuba_step_over_clean_step"] == 4.0 and r["engine_over_reference"] == 5.0
    assert r["cuba_step_speedup"] == 1.6  # 80 / 50 img/s: the cheap step against the default one
