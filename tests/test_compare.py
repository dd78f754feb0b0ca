"""cuba compare / cuba sweep on hand-made run folders (no training), with hand-computed mean ± std."""

from __future__ import annotations

import csv
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


def test_fig8_titles_carry_ds(tmp_path: Path) -> None:
    from cuba.figures import plot_source_class_comparison

    y = np.array([1, 1, 1, 1])
    t = fra_targets(3)
    p = plot_source_class_comparison([("a", y, np.array([0, 0, 2, 2]), t, True)], 1, tmp_path / "f.png")
    assert p.is_file() and torch.is_tensor(t)
