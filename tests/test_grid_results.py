"""benchmarks/grid_results.py: a long grid's result files (no weights) saved and restored across
machines, companions included -- what lets the detector matrix span sessions."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from test_benchmark_scripts import BENCH, _run_script


def test_grid_results_saves_done_cells_without_weights_and_restores(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A done cell's JSON/YAML survive a save/restore and count as done again; weights, figures and
    unfinished cells are not saved; restore never overwrites a file that is there."""
    import yaml

    from cuba.reproduce import expand, is_done, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "datasets": ["digits"], "models": {"digits": "simplecnn"},
                                    "attacks": ["none"], "seeds": [0, 1], "defenses": ["strip"],
                                    "defense_seeds": [0, 1]}))
    done, half = expand(load_grid(grid))
    out, dest, again = tmp_path / "out", tmp_path / "saved", tmp_path / "again"
    for cell, finished in ((done, True), (half, False)):
        d = out / "runs" / cell.name
        (d / "defenses" / "strip").mkdir(parents=True)
        (d / "config.yaml").write_text("seed: 0\n")
        (d / "metrics.json").write_text('{"ca": 0.9}')
        (d / "status.json").write_text(json.dumps({"state": "finished"}))
        (d / "classifier.safetensors").write_bytes(b"weights")
        (d / "defenses" / "strip" / "strip_entropy.png").write_bytes(b"png")
        if finished:
            (d / "defenses" / "strip" / "defense.json").write_text('{"auroc": 0.5}')
    assert _run_script("grid_results.py", ["save", str(grid), str(out), str(dest)], capsys, monkeypatch) == {"saved": [done.name]}
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert kept == [f"runs/{done.name}/{f}" for f in ("config.yaml", "defenses/strip/defense.json", "metrics.json", "status.json")]
    (again / "runs" / done.name).mkdir(parents=True)
    (again / "runs" / done.name / "metrics.json").write_text('{"ca": 0.8}')
    assert _run_script("grid_results.py", ["restore", str(dest), str(again)], capsys, monkeypatch) == {"restored": [done.name]}
    assert is_done(again, done) and not is_done(again, half)
    assert (again / "runs" / done.name / "metrics.json").read_text() == '{"ca": 0.8}'
    monkeypatch.setattr(sys, "argv", ["grid_results.py", "restore", str(tmp_path / "nothing"), str(again)])
    with pytest.raises(SystemExit):
        runpy.run_path(str(BENCH / "grid_results.py"), run_name="__main__")
    assert "no runs/ folder to restore from" in capsys.readouterr().err


def test_grid_results_keeps_companion_grids_in_their_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid with ``also`` saves its companion's done cells into DEST/<name> and restores them into
    OUT/<name>, where one `cuba reproduce` of the grid finds them done."""
    import yaml

    from cuba.reproduce import expand, is_done, load_grid

    spec = {"datasets": ["digits"], "models": {"digits": "simplecnn"}, "attacks": ["none"], "seeds": [0], "defenses": []}
    (tmp_path / "part.yaml").write_text(yaml.safe_dump({**spec, "name": "part", "seeds": [7]}))
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({**spec, "name": "g", "also": ["part.yaml"]}))
    (main_cell,), (part_cell,) = expand(load_grid(grid)), expand(load_grid(tmp_path / "part.yaml"))
    out, dest, again = tmp_path / "out", tmp_path / "saved", tmp_path / "again"
    for folder, cell in ((out, main_cell), (out / "part", part_cell)):
        d = folder / "runs" / cell.name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("seed: 0\n")
        (d / "metrics.json").write_text('{"ca": 0.9}')
        (d / "status.json").write_text(json.dumps({"state": "finished"}))
    saved = _run_script("grid_results.py", ["save", str(grid), str(out), str(dest)], capsys, monkeypatch)["saved"]
    assert saved == [f"part/{part_cell.name}", main_cell.name] and (dest / "part" / "runs" / part_cell.name).is_dir()
    restored = _run_script("grid_results.py", ["restore", str(dest), str(again)], capsys, monkeypatch)["restored"]
    assert sorted(restored) == sorted(saved)
    assert is_done(again, main_cell) and is_done(again / "part", part_cell)
