"""cuba compare / cuba sweep on hand-made run folders (no training), with hand-computed mean ± std."""

from __future__ import annotations

import csv
import re
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cuba.attack import all_to_one_targets, fra_targets
from cuba.cli import main
from cuba.compare import compare, find_runs, group_runs, load_run, summarize, table_rows, to_csv
from cuba.config import ConfigError, make_config
from cuba.evaluate import Predictions
from cuba.runs import save_config, save_predictions, write_json
from cuba.sweep import plan_cells, run_sweep


def fake_run(root: Path, name: str, metrics: dict, y_bd: list[int] | None = None, **cfg_fields) -> Path:
    cfg = make_config({"dataset": "digits", **cfg_fields})
    d = root / name
    save_config(d, cfg)
    write_json(d / "metrics.json", metrics)
    y = np.array([0, 0, 1, 1, 2, 2])
    if y_bd is not None:
        k = 3
        t = all_to_one_targets(k, cfg.target_class) if cfg.attack in ("targeted", "badnets") else fra_targets(k)
        save_predictions(d, Predictions(y, y.copy(), np.array(y_bd), None, None, None), t)
    return d


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    fake_run(tmp_path, "fra-s0", {"ca": 0.99, "asr": 1.0, "ds": 0.90}, [1, 2, 2, 0, 0, 1], seed=0)
    fake_run(tmp_path, "fra-s1", {"ca": 0.97, "asr": 0.98, "ds": 0.94}, [1, 2, 2, 0, 0, 1], seed=1)
    fake_run(tmp_path, "bn-s0", {"ca": 0.98, "asr": 0.99, "ds": 0.70}, [2, 2, 2, 2, 2, 2], attack="badnets", target_class=2)
    fake_run(tmp_path, "clean-s0", {"ca": 0.995, "asr": None}, attack="none")
    return tmp_path


def test_groups_fold_seeds_and_name_settings(runs: Path) -> None:
    paths = find_runs([runs])
    assert len(paths) == 4
    groups = group_runs([load_run(p) for p in paths])
    names = sorted(g.name for g in groups)
    assert names == ["badnets-t2", "clean", "cuba-fra"]
    fra = next(g for g in groups if g.name == "cuba-fra")
    mean, std = summarize(fra, "ca", 100.0)
    assert mean == pytest.approx(98.0) and std == pytest.approx(math.sqrt(2.0))  # (99, 97): sample std sqrt(2)
    bn = next(g for g in groups if g.name == "badnets-t2")
    assert math.isnan(summarize(bn, "ca", 100.0)[1])  # one seed: no spread
    clean = next(g for g in groups if g.name == "clean")
    assert all(math.isnan(x) for x in summarize(clean, "asr", 100.0))  # null in metrics.json


def test_differing_fields_appear_in_the_name(tmp_path: Path) -> None:
    fake_run(tmp_path, "a", {"ca": 0.9}, tau=0.1)
    fake_run(tmp_path, "b", {"ca": 0.8}, tau=0.04)
    rows = table_rows(group_runs([load_run(p) for p in find_runs([tmp_path])]), by="tau")
    assert [r["setting"] for r in rows] == ["cuba-fra (tau=0.04)", "cuba-fra (tau=0.1)"]  # sorted by tau
    table = list(csv.DictReader(io.StringIO(to_csv(rows, by="tau"))))
    assert table[0]["tau"] == "0.04" and table[0]["ca_mean"] == "80" and table[0]["ca_std"] == ""
    assert rows[0]["ca_values"] == [80.0] and rows[1]["ca_values"] == [90.0]  # per seed, for the sweep plot's dots
    from cuba.figures import plot_sweep

    assert plot_sweep(rows, "tau", tmp_path / "sweep.png").stat().st_size > 1000


def test_compare_writes_markdown_csv_and_fig8(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    md, files = compare([runs], out=out, name="t", source_class=1)
    assert "| cuba-fra | 2 | 98.00 ± 1.41 | 99.00 ± 1.41 |" in md
    assert "| clean | 1 | 99.50 | – |" in md
    assert {f.name for f in files} == {"t.md", "t.csv", "t-source1.png"}
    assert (out / "t-source1.png").stat().st_size > 1000


def test_compare_cli_and_errors(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(runs / "fra-s0"), str(runs / "fra-s1"), "--out", str(tmp_path / "o")]) == 0
    assert "cuba-fra | 2 |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "holds no finished run" in capsys.readouterr().err
    assert main(["compare", str(runs), "--by", "colour", "--out", str(tmp_path / "o")]) == 2
    assert "--by: unknown config field 'colour'" in capsys.readouterr().err
    assert main(["compare", str(runs), "--source-class", "7", "--out", str(tmp_path / "o")]) == 2
    assert "--source-class: must lie in [0, 3), got 7" in capsys.readouterr().err
    assert main(["compare", str(runs), "--source-class", "-1", "--out", str(tmp_path / "o2")]) == 2
    assert "--source-class: must lie in [0, 3), got -1" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # refused before anything was written


def test_sweep_plans_validates_and_skips_finished_cells(tmp_path: Path) -> None:
    cells = plan_cells({"dataset": "digits"}, "gamma", [1, 5], [0, 1], tmp_path)
    assert [(c.gamma, c.seed) for c in cells] == [(1, 0), (1, 1), (5, 0), (5, 1)]
    with pytest.raises(ConfigError, match=r"^tau: must be a number > 0, got -1"):
        plan_cells({"dataset": "digits"}, "tau", [0.1, -1], [0], tmp_path)  # fails before anything trains
    with pytest.raises(ConfigError, match="unknown config field 'colour'"):
        plan_cells({}, "colour", [1], [0], tmp_path)
    trained = []

    def runner(cfg) -> None:  # stands in for run_training: writes a finished run folder
        trained.append((cfg.gamma, cfg.seed))
        save_config(Path(cfg.out), cfg)
        write_json(Path(cfg.out) / "metrics.json", {"ca": 0.9 + 0.01 * cfg.seed, "ds": cfg.gamma / 10})

    run_sweep({"dataset": "digits"}, "gamma", [1, 5], [0, 1], tmp_path, runner=runner, log=lambda s: None)
    assert len(trained) == 4
    md, files = run_sweep({"dataset": "digits"}, "gamma", [1, 5], [0, 1], tmp_path, runner=runner, log=lambda s: None)
    assert len(trained) == 4  # all four cells were finished: nothing retrained
    assert "| cuba-fra (gamma=5) | 5 | 2 | 90.50 ± 0.71 |" in md
    assert {f.name for f in files} == {"sweep-gamma.md", "sweep-gamma.csv", "sweep-gamma.png"}


def test_sweep_cli_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "tau", "0.1", "--dataset", "digits"]) == 2
    assert "--out FOLDER is required" in capsys.readouterr().err
    assert main(["sweep", "eps", "0.05", "--dataset", "digits", "--out", "x", "--within", "-2"]) == 2
    assert "--within must be >= 0 percentage points, got -2.0" in capsys.readouterr().err


def test_fig8_titles_carry_ds(tmp_path: Path) -> None:
    from cuba.figures import plot_source_class_comparison

    y = np.array([1, 1, 1, 1])
    t = fra_targets(3)
    p = plot_source_class_comparison([("a", y, np.array([0, 0, 2, 2]), t, True)], 1, tmp_path / "f.png")
    assert p.is_file() and torch.is_tensor(t)


# --- DS on its own scale, validation columns, degenerate runs ------------------------------------

from cuba.compare import (  # noqa: E402
    NA, REASON_CHANCE, REASON_CLEAN_GAP, columns, degenerate_reason, flagged, metric_value, short_reason,
)
from cuba.sweep import best_on_validation, rank_by_validation, ranking_markdown  # noqa: E402


def test_degenerate_reason_rules() -> None:
    # a run's own verdict wins, in both directions
    long = "CA 9.80% is at chance level (< 2/K = 20.0%): the classifier did not learn"
    assert degenerate_reason({"ca": 0.098, "degenerate": True, "degenerate_reason": long}) == long
    assert degenerate_reason({"ca": 0.5, "degenerate": True}) == REASON_CHANCE
    assert degenerate_reason({"ca": 0.05, "num_classes": 10, "degenerate": False}) is None
    # an old run: CA < 2/K
    assert degenerate_reason({"ca": 0.19, "num_classes": 10}) == REASON_CHANCE
    assert degenerate_reason({"ca": 0.20, "num_classes": 10}) is None
    assert degenerate_reason({"ca": 0.03, "num_classes": 100}) is None  # 2/K = 0.02
    assert degenerate_reason({"ca": 0.19}, num_classes=10) == REASON_CHANCE  # a val block: K given apart
    assert degenerate_reason({"ca": 0.01}) is None  # no K known: the chance rule cannot be applied
    assert degenerate_reason({"ca": None, "num_classes": 10}) is None and degenerate_reason({}) is None
    # the clean reference: more than 10 points under it
    assert degenerate_reason({"ca": 0.85, "num_classes": 10}, clean_ca=0.99) == REASON_CLEAN_GAP
    assert degenerate_reason({"ca": 0.80}, clean_ca=0.90) is None  # ten points exactly: not more than ten
    assert degenerate_reason({"ca": 0.85, "degenerate": False}, clean_ca=0.99) == REASON_CLEAN_GAP
    assert degenerate_reason({"ca": float("nan")}, clean_ca=0.99) is None


@pytest.mark.parametrize(("metrics", "kw", "err", "msg"), [
    ([0.1], {}, TypeError, "metrics must be a mapping (a metrics.json dict), got list"),
    ({"ca": 97.0}, {}, ValueError, "ca must be a rate in [0, 1], got 97"),
    ({"ca": 0.9}, {"clean_ca": 99.5}, ValueError, "clean_ca must be a rate in [0, 1], got 99.5"),
    ({"ca": "high"}, {}, TypeError, "ca must be a number, got str"),
    ({"ca": 0.9, "num_classes": 1}, {}, ValueError, "num_classes must be a whole number >= 2, got 1"),
    ({"ca": 0.9}, {"num_classes": 2.5}, ValueError, "num_classes must be a whole number >= 2, got 2.5"),
])
def test_degenerate_reason_bad_inputs(metrics, kw: dict, err: type, msg: str) -> None:
    with pytest.raises(err, match="^degenerate_reason: " + re.escape(msg) + "$"):
        degenerate_reason(metrics, **kw)


def test_flagged_names() -> None:
    assert flagged("cuba-fra", None) == "cuba-fra"
    assert flagged("cuba-fra", REASON_CHANCE) == "cuba-fra (degenerate: CA at chance)"
    assert flagged("x", "CA 9.80% is at chance level (< 2/K = 20.0%)") == "x (degenerate: CA at chance)"
    assert flagged("x", "degenerate generator") == "x (degenerate generator)"
    assert short_reason(REASON_CLEAN_GAP) == REASON_CLEAN_GAP


def test_metric_value_reads_nested_and_missing_keys() -> None:
    m = {"ds": 0.9, "val": {"ds": 0.8, "asr": None}, "degenerate": True}
    assert metric_value(m, "ds") == 0.9 and metric_value(m, "val.ds") == 0.8
    assert all(math.isnan(metric_value(m, k)) for k in ("val.asr", "val.ca", "ds_uniform", "degenerate", "ds.x"))
    assert [k for k, _, _ in columns(True)][:6] == ["ca", "val.ca", "asr", "val.asr", "asr_c", "ds"]
    assert "val.ds" not in [k for k, _, _ in columns()]


def scale_metrics(ca: float, ds: float, **extra) -> dict:
    return {"ca": ca, "asr": 1.0, "asr_c": 1.0, "ds": ds, "ds_floor": 0.7, "ds_uniform": 0.941,
            "effective_classes": 6.5, "num_classes": 3, **extra}


def test_compare_shows_ds_scale_val_and_old_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    val = {"ca": 0.96, "asr": 0.99, "ds": 0.88}
    fake_run(tmp_path, "new-s0", scale_metrics(0.98, 0.90, val=val), seed=0)
    fake_run(tmp_path, "new-s1", scale_metrics(0.96, 0.92, val={**val, "ds": 0.90}), seed=1)
    fake_run(tmp_path, "old-s0", {"ca": 0.97, "asr": 1.0, "ds": 0.9}, tau=0.5)  # made before the new keys
    md, files = compare([tmp_path], out=tmp_path / "o", name="t")
    head = md.splitlines()[0]
    assert "| DS %" in head and "| DS floor % | DS unif. % | eff. classes |" in head and "val" not in head
    assert ("| cuba-fra (tau=0.1) | 2 | 97.00 ± 1.41 | 100.00 ± 0.00 | 100.00 ± 0.00 | 91.00 ± 1.41 | – | 70.00 ± 0.00 "
            "| 94.10 ± 0.00 | 6.50 ± 0.00 |") in md
    assert "| cuba-fra (tau=0.5) | 1 | 97.00 | 100.00 | – | 90.00 | – | – | – | – |" in md
    table = list(csv.DictReader(io.StringIO((tmp_path / "o" / "t.csv").read_text())))
    assert table[0]["ds_uniform_mean"] == "94.1" and table[0]["val_ds_mean"] == "89" and table[0]["degenerate"] == ""
    assert table[1]["val_ds_mean"] == "" and table[1]["effective_classes_mean"] == ""
    # --val: each validation column right after its test twin
    assert main(["compare", str(tmp_path), "--val", "--out", str(tmp_path / "o2")]) == 0
    out = capsys.readouterr().out
    assert "| CA % | val CA % | ASR % | val ASR % | ASR-C % | DS % | val DS % |" in out
    assert ("| cuba-fra (tau=0.1) | 2 | 97.00 ± 1.41 | 96.00 ± 0.00 | 100.00 ± 0.00 | 99.00 ± 0.00 | 100.00 ± 0.00 "
            "| 91.00 ± 1.41 | 89.00 ± 1.41 |") in out
    assert "| cuba-fra (tau=0.5) | 1 | 97.00 | – | 100.00 | – |" in out


def test_compare_flags_degenerate_runs_and_groups(tmp_path: Path) -> None:
    # a stored verdict; an old run at chance (CA < 2/3); one seed of two at chance; far below clean
    fake_run(tmp_path, "stored", scale_metrics(0.30, 0.9, degenerate=True,
                                               degenerate_reason="CA 30.00% is at chance level (< 2/K = 66.7%)"), tau=0.2)
    fake_run(tmp_path, "old", {"ca": 0.40, "asr": 0.9, "ds": 0.8, "num_classes": 3}, tau=0.3)
    fake_run(tmp_path, "half-s0", scale_metrics(0.99, 0.90), tau=0.4, seed=0)
    fake_run(tmp_path, "half-s1", scale_metrics(0.99, 0.95), tau=0.4, seed=1)
    fake_run(tmp_path, "half-s2", scale_metrics(0.60, 0.70, val={"ca": 0.6, "asr": 1.0, "ds": 0.7}), tau=0.4, seed=2)
    fake_run(tmp_path, "far", scale_metrics(0.80, 0.9), tau=0.6)
    fake_run(tmp_path, "clean", {"ca": 0.95, "num_classes": 3}, attack="none")
    md, _ = compare([tmp_path], out=tmp_path / "o", name="t", val=True)
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in md.splitlines()[2:]}
    for name in ("cuba-fra (tau=0.2) (degenerate: CA at chance)", "cuba-fra (tau=0.3) (degenerate: CA at chance)",
                 "cuba-fra (tau=0.6) (degenerate: CA far below clean reference)"):
        assert name in rows, md
        # setting, n, CA, val CA, ASR, val ASR, ASR-C, DS, val DS, DS-min, ...: CA stays, ASR / DS go
        cells = rows[name].strip("| ").split(" | ")
        assert cells[2] not in (NA, "–") and [cells[i] for i in (4, 5, 6, 7, 8, 9)] == [NA] * 6
    # one of three seeds at chance: left out of the backdoor means only (mean CA 86 is within 10 of 95)
    half = rows["cuba-fra (tau=0.4) (1/3 seeds degenerate: CA at chance; left out of ASR/DS)"]
    assert "| 86.00 ± 22.52 |" in half and "| 92.50 ± 3.54 |" in half and NA not in half
    cells = half.strip("| ").split(" | ")
    assert cells[3] == "60.00" and cells[8] == "–"  # the one val block was at chance: val CA shown, no val DS
    assert "clean (tau=0.1)" in rows and NA not in rows["clean (tau=0.1)"]
    table = {r["setting"]: r for r in csv.DictReader(io.StringIO((tmp_path / "o" / "t.csv").read_text()))}
    stored = table["cuba-fra (tau=0.2) (degenerate: CA at chance)"]
    assert stored["degenerate"].startswith("CA 30.00% is at chance") and stored["ds_mean"] == "" and stored["ca_mean"] == "30"


def write_sweep_run(cfg, val: dict | None, test: dict) -> None:
    save_config(Path(cfg.out), cfg)
    write_json(Path(cfg.out) / "metrics.json", {"num_classes": 10, **test, **({"val": val} if val is not None else {})})


def test_sweep_ranks_on_validation_only(tmp_path: Path) -> None:
    # gamma=1 is best on the TEST set but worst on validation; gamma=9 has the top val DS but
    # fires too rarely; gamma=7 is at chance on validation; gamma=3 must win
    val = {1: {"ca": 0.9, "asr": 0.95, "ds": 0.80}, 3: {"ca": 0.9, "asr": 0.97, "ds": 0.90},
           5: {"ca": 0.9, "asr": 1.0, "ds": 0.85}, 7: {"ca": 0.1, "asr": 1.0, "ds": 0.99},
           9: {"ca": 0.9, "asr": 0.5, "ds": 0.97}}

    def runner(cfg) -> None:
        write_sweep_run(cfg, val[cfg.gamma], {"ca": 0.9, "asr": 1.0, "ds": 0.99 if cfg.gamma == 1 else 0.8})

    md, files = run_sweep({"dataset": "digits"}, "gamma", [1, 3, 5, 7, 9], [0], tmp_path, runner=runner, log=lambda s: None)
    assert md.rstrip().endswith("best on validation: gamma=3")
    ranking = md[md.index("Ranking by validation DS"):]
    order = [ln.split(" | ")[1] for ln in ranking.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert order == ["3", "5", "1", "7", "9"]
    assert "| 4 | 7 | cuba-fra (gamma=7) | 99.00 | 100.00 | 10.00 | ranked last: degenerate on validation: CA at chance (seed 0) |" in ranking
    assert "| 5 | 9 | cuba-fra (gamma=9) | 97.00 | 50.00 | 90.00 | ranked last: val ASR 50.00% < 90% |" in ranking
    assert "| val CA % |" in md.splitlines()[0]  # the table shows validation beside test
    assert "| cuba-fra (gamma=7) | 7 | 1 | 90.00 | 10.00 | 100.00 | n/a (degenerate) |" in md  # val CA at chance
    assert "best on validation: gamma=3" in (tmp_path / "sweep-gamma.md").read_text()
    assert {f.name for f in files} == {"sweep-gamma.md", "sweep-gamma.csv", "sweep-gamma.png"}


def test_sweep_ranking_without_validation_or_winner(tmp_path: Path) -> None:
    for tau, v in ((0.1, None), (0.2, {"ca": 0.9, "asr": 0.2, "ds": 0.9})):
        write_sweep_run(make_config({"dataset": "digits", "tau": tau, "out": str(tmp_path / f"t{tau}")}), v, {"ca": 0.9})
    groups = group_runs([load_run(p) for p in find_runs([tmp_path])])
    ranked = rank_by_validation(groups, "tau")
    assert [e["value"] for e in ranked] == [0.2, 0.1]  # both ineligible: val DS orders them, missing last
    assert ranked[1]["why"] == "no validation metrics (seed 0): run made without a val split"
    assert best_on_validation(ranked, "tau").startswith("best on validation: none (every setting is degenerate")
    assert "| 2 | 0.1 | cuba-fra (tau=0.1) | – | – | – | ranked last: no validation metrics" in ranking_markdown(ranked, "tau")
    assert best_on_validation([], "tau").startswith("best on validation: none")


def test_sweep_within_prefers_the_first_listed_value_close_to_the_top(tmp_path: Path) -> None:
    # eps listed smallest first: 0.02 is 3 points below the top (0.1), 0.05 is 0.5 below;
    # within 1 point the stealthier 0.05 wins, without --within the top val DS (0.1) wins
    val = {0.02: 0.90, 0.05: 0.925, 0.1: 0.93}

    def runner(cfg) -> None:
        write_sweep_run(cfg, {"ca": 0.98, "asr": 1.0, "ds": val[cfg.eps]}, {"ca": 0.98, "asr": 1.0, "ds": 0.5})

    md, _ = run_sweep({"dataset": "digits"}, "eps", [0.02, 0.05, 0.1], [0], tmp_path, runner=runner, log=lambda s: None, within=1.0)
    assert md.rstrip().endswith("best on validation: eps=0.05 (first as listed within 1 points of the top val DS)")
    md, _ = run_sweep({"dataset": "digits"}, "eps", [0.02, 0.05, 0.1], [0], tmp_path, runner=runner, log=lambda s: None)
    assert md.rstrip().endswith("best on validation: eps=0.1")
    md, _ = run_sweep({"dataset": "digits"}, "eps", [0.02, 0.05, 0.1], [0], tmp_path, runner=runner, log=lambda s: None, within=5)
    assert md.rstrip().endswith("best on validation: eps=0.02 (first as listed within 5 points of the top val DS)")
    with pytest.raises(ConfigError, match="--within must be >= 0"):
        run_sweep({"dataset": "digits"}, "eps", [0.02], [0], tmp_path, runner=runner, log=lambda s: None, within=-1)


def test_a_seed_far_under_the_clean_ca_leaves_the_backdoor_means() -> None:
    """Seeds at CA 99 / 99 / 75 against a clean 99: the mean (91) is within 10 points, but the 75-seed
    wrecked its classifier, so its ASR/DS are not a result; CA keeps every seed."""
    from pathlib import Path

    from cuba.run_groups import Run, group_degeneracy

    runs = [Run(Path(f"r{i}"), {"seed": i}, {"ca": ca, "num_classes": 10, "ds": 0.9}, "cuba-fra")
            for i, ca in enumerate((0.99, 0.99, 0.75))]
    deg = group_degeneracy(runs, clean_ca=0.99)
    assert deg.reason is None and [r.seed for r in deg.kept] == [0, 1] and [r.seed for r, _ in deg.dropped] == [2]
    assert deg.suffix("cuba-fra").startswith("cuba-fra (1/3 seeds degenerate: CA far below clean reference")
    assert group_degeneracy(runs, clean_ca=0.99, attacked=False).dropped == []  # a clean group is its own reference
