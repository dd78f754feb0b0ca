"""cuba reproduce on a tiny digits grid: expansion and its errors, skipping finished cells, submitit's
local executor, table2, and a kill-and-rerun that finishes the grid without redoing cells; the gpu
grid's expansion, blocked data sets and a CPU run of it. Table II / Table III / report.html built
from hand-made run folders are in test_reproduce_tables.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cuba.config import ConfigError
from cuba.reproduce import cell_state, expand, is_done, run_grid, write_report, write_table2

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"datasets": ["digits"], "models": {"digits": "simplecnn"}, "attacks": ["none", "cuba"], "variants": ["fra"],
        "seeds": [0, 1], "defenses": ["fine-pruning"], "defense_seeds": [0],
        "set": {"epochs": 1, "generator_width": 4, "device": "cpu", "precision": "fp32", "channels_last": False}}


def test_expand_names_and_validates_cells() -> None:
    cells = expand(TINY)
    assert [c.name for c in cells] == ["digits-simplecnn-clean-s0", "digits-simplecnn-clean-s1",
                                       "digits-simplecnn-cuba-fra-s0", "digits-simplecnn-cuba-fra-s1"]
    assert [c.defenses for c in cells] == [["fine-pruning"], [], ["fine-pruning"], []]
    nra = expand({**TINY, "variants": ["fra", "nra-2"], "attacks": ["cuba", "badnets"], "seeds": [0]})
    assert [c.name for c in nra] == ["digits-simplecnn-cuba-fra-s0", "digits-simplecnn-cuba-nra2-s0", "digits-simplecnn-badnets-t0-s0"]
    with pytest.raises(ConfigError, match=r"^grid: unknown key\(s\) 'colour'"):
        expand({**TINY, "colour": 1})
    assert len(expand({**TINY, "compare": {"baseline": "cuba-fra", "against": "cuba-adaptive"}})) == 4
    with pytest.raises(ConfigError, match=r"^grid: compare must be \{baseline: <group>, against: <name prefix>\}"):
        expand({**TINY, "compare": {"against": "cuba"}})
    with pytest.raises(ConfigError, match=r"^grid: unknown defense\(s\) spectral"):
        expand({**TINY, "defenses": ["spectral"]})
    bad = {**TINY, "overrides": [{"match": {"attack": "cuba", "seed": 1}, "set": {"tau": -1}}]}
    with pytest.raises(ConfigError, match=r"^grid cell digits/simplecnn/cuba/fra/seed 1: tau: must be a number > 0"):
        expand(bad)
    with pytest.raises(ConfigError, match="cells repeat"):
        expand({**TINY, "seeds": [0, 0]})


def test_per_dataset_attacks_and_per_attack_seeds_variants() -> None:
    """attacks / variants may be {data set: list}; per_attack gives some attacks their own seeds and variants."""
    grid = {**TINY, "attacks": {"digits": ["cuba", "push-away"]}, "variants": {"digits": ["fra", "nra-2"]},
            "per_attack": {"push-away": {"seeds": [1], "variants": ["fra"]}}}
    assert [c.name for c in expand(grid)] == [
        "digits-simplecnn-cuba-fra-s0", "digits-simplecnn-cuba-nra2-s0", "digits-simplecnn-cuba-fra-s1",
        "digits-simplecnn-cuba-nra2-s1", "digits-simplecnn-push-away-fra-s1"]
    with pytest.raises(ConfigError, match=r"^grid: per_attack must map attacks of the grid .* got 'badnets'"):
        expand({**grid, "per_attack": {"badnets": {"seeds": [0]}}})
    with pytest.raises(ConfigError, match=r"^grid: per_attack .* got 'cuba': \{'epochs': 2\}"):
        expand({**grid, "per_attack": {"cuba": {"epochs": 2}}})
    with pytest.raises(ConfigError, match=r"^grid: per_attack .* got None: None"):
        expand({**grid, "per_attack": [1]})


def test_grid_runs_skips_and_aggregates(tmp_path: Path) -> None:
    cells = expand(TINY)
    assert len(run_grid(cells, tmp_path, log=lambda s: None)) == 4
    assert all(is_done(tmp_path, c) for c in cells)
    assert (tmp_path / "runs" / "digits-simplecnn-cuba-fra-s0" / "defenses" / "fine-pruning" / "defense.json").is_file()
    assert run_grid(cells, tmp_path, log=lambda s: None) == []  # everything done: nothing re-runs
    md = write_table2(tmp_path)[0].read_text()
    # a 1-epoch model may be flagged degenerate (CA at chance): the row is there either way
    assert re.search(r"\| digits / simplecnn \| cuba-fra( \(degenerate: [^)]*\))? \| not a paper data set \| 2 \|", md)
    assert (tmp_path / "table2.tex").is_file()
    page = write_report(tmp_path).read_text()
    assert "<h2>Table III" in page and "fine-pruning" in page and "<details><summary>digits-simplecnn-clean-s1" in page
    assert "<h2>Defenses: each one's headline numbers" in page
    dmd = (tmp_path / "defenses.md").read_text()  # the defended (seed-0) runs only
    assert dmd.startswith("| defense | digits-simplecnn-clean-s0 | digits-simplecnn-cuba-fra-s0 |")
    assert "| fine-pruning | prune_ratio 0: " in dmd
    assert page.count("data:image/png;base64,") >= 2  # Fig. 4 and Fig. 5 of the CUBA run, embedded
    assert "src='http" not in page  # nothing fetched from outside: viewable offline
    t3 = (tmp_path / "table3.md").read_text()
    assert "| fine-pruning | prune ratio → | 0 | 0.2 | 0.4 | 0.6 | 0.8 | 0.9 |" in t3
    assert "| digits-simplecnn-cuba-fra-s0 | ASR | " in t3 and "| digits-simplecnn-clean-s0 | ASR | – | – |" in t3
    # the grid edited after the run (same cell names, another learning rate): refused, not reused
    edited = expand({**TINY, "set": {**TINY.get("set", {}), "lr": 0.0123}})
    with pytest.raises(ConfigError, match=r"^cell digits-simplecnn-clean-s0: .* holds a run of a different setting \(lr: "):
        run_grid(edited, tmp_path, log=lambda s: None)
    # a defense added to the grid later: the trained cells only owe that defense
    more = expand({**TINY, "defenses": ["fine-pruning", "scale-up"]})
    assert [cell_state(tmp_path, c) for c in more] == ["trained; defenses to run: scale-up", "done",
                                                        "trained; defenses to run: scale-up", "done"]
    assert len(run_grid(more, tmp_path, log=lambda s: None)) == 2 and all(is_done(tmp_path, c) for c in more)


@pytest.mark.slow  # submitit's local executor starts worker processes
def test_submitit_local_executor(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    cells = expand({**TINY, "attacks": ["none"], "defenses": []})
    run_grid(cells, tmp_path, executor="local", jobs=2, log=lambda s: None)
    assert all(is_done(tmp_path, c) for c in cells)
    assert (tmp_path / "submitit").is_dir()


def test_parallel_executor_without_submitit_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    cells = expand({**TINY, "attacks": ["none"], "defenses": []})
    with pytest.raises(ConfigError, match=r"--executor local needs submitit: pip install -e \"\.\[cluster\]\""):
        run_grid(cells, tmp_path, executor="local", jobs=2, log=lambda s: None)
    assert not any(is_done(tmp_path, c) for c in cells)


@pytest.mark.slow  # a grid killed and re-run in subprocesses
def test_killed_reproduce_finishes_without_redoing_cells(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**TINY, "defenses": []}))
    cmd = [sys.executable, "-m", "cuba", "reproduce", str(grid), "--out", str(tmp_path / "o")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = tmp_path / "o" / "runs" / "digits-simplecnn-clean-s0" / "metrics.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not first.is_file():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stamp = first.stat().st_mtime_ns
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "4 cells, " in res.stdout and first.stat().st_mtime_ns == stamp  # the finished cell was not redone
    assert all(is_done(tmp_path / "o", c) for c in expand(TINY) if not c.defenses)


def test_reference_seeds_mark_clean_cells_that_get_the_defenses() -> None:
    """reference_seeds: clean models the defender trains; they run the defenses that need references
    whatever defense_seeds says (their scores calibrate the inversion detectors), and only clean cells can be one."""
    grid = {**TINY, "per_attack": {"none": {"seeds": [0, 1, 2]}}, "reference_seeds": [2]}
    cells = expand(grid)
    assert [(c.name, c.reference, bool(c.defenses)) for c in cells] == [
        ("digits-simplecnn-clean-s0", False, True), ("digits-simplecnn-clean-s1", False, False),
        ("digits-simplecnn-clean-s2", True, False), ("digits-simplecnn-cuba-fra-s0", False, True),
        ("digits-simplecnn-cuba-fra-s1", False, False)]
    assert not any(c.reference for c in expand(TINY))
    # outside defense_seeds a reference runs only the detectors that need references
    both = expand({**grid, "defenses": ["fine-pruning", "dispersion-inversion", "trigger-inversion"]})
    assert both[2].defenses == ["dispersion-inversion", "trigger-inversion"]
    assert both[0].defenses == ["fine-pruning", "dispersion-inversion", "trigger-inversion"] and both[1].defenses == []
    with pytest.raises(ConfigError, match=r"^grid: reference_seeds \[5\] of digits are not seeds of its clean cells "
                                          r"\(\[0, 1\]\)"):
        expand({**TINY, "reference_seeds": [5]})


def test_shipped_grids_expand() -> None:
    from cuba.reproduce import load_grid

    paper = expand(load_grid("paper"))
    # 4 data sets x 3 seeds x (clean + 3 generator attacks x 3 variants + ubw-p + badnets + targeted)
    assert len(paper) == 4 * 3 * (1 + 3 * 3 + 3)
    assert {c.values["model"] for c in paper} == {"simplecnn", "preactresnet18", "resnet18"}
    cpu = expand(load_grid("cpu") | {"data_dir": None, "datasets": ["mnist"]})
    # clean + FRA / NRA-5 / NRA-2 x 3 seeds, the two untargeted baselines (FRA, seed 0) for Fig. 8 and
    # the BadNets positive control (seed 0)
    assert len(cpu) == 15 and sum(bool(c.defenses) for c in cpu) == 7  # defenses on seed 0
    assert {c.name for c in cpu} >= {"mnist-simplecnn-untargeted-ce-fra-s0", "mnist-simplecnn-push-away-fra-s0",
                                     "mnist-simplecnn-badnets-t0-s0"}
    digits = expand(load_grid("detectors-digits") | {"data_dir": None})
    # 12 clean + 12 CUBA scored models, and 3 clean references the defense table keeps apart
    assert len(digits) == 27 and [c.values["seed"] for c in digits if c.reference] == [12, 13, 14]
    assert all(c.defenses for c in digits)
    with pytest.raises(ConfigError, match="neither a file nor a shipped grid"):
        load_grid("nonexistent")


def test_per_dataset_seeds_and_paths_under_data_dir(tmp_path: Path) -> None:
    """seeds / defense_seeds / epochs may be {data set: value}; a relative data set path that is not
    found as given is looked up under data_dir, and the cell is named after the file's stem."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x_train=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(20) % 2, x_test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), y_test=np.arange(4) % 2)
    grid = {**TINY, "datasets": ["digits", "rgb.npz"], "models": {"digits": "simplecnn", "rgb.npz": "simplecnn"},
            "seeds": {"digits": [0, 1], "rgb.npz": [3]}, "epochs": {"rgb.npz": 2}, "data_dir": str(tmp_path)}
    cells = expand(grid)
    assert [c.name for c in cells if c.name.startswith("rgb")] == ["rgb-simplecnn-clean-s3", "rgb-simplecnn-cuba-fra-s3"]
    assert [c.defenses for c in cells if c.name.startswith("rgb")] == [[], []]  # defense_seeds [0]: not seed 3
    assert all(c.values["epochs"] == 2 for c in cells if c.name.startswith("rgb"))
    assert len(expand({**grid, "defense_seeds": {"digits": [0], "rgb.npz": [3]}})[-1].defenses) == 1
    with pytest.raises(ConfigError, match=r"got 'rgb.npz'"):
        expand({**grid, "data_dir": None})
    with pytest.raises(ConfigError, match="no seeds for data set 'rgb.npz'"):
        expand({**grid, "seeds": {"digits": [0]}})


def test_only_and_dry_run_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--only runs one part of a grid; --dry-run marks each cell done or to run."""
    from cuba.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**TINY, "defenses": []}))
    assert main(["reproduce", str(grid), "--out", str(tmp_path / "o"), "--only", "*-clean-s1"]) == 0
    capsys.readouterr()
    assert main(["reproduce", str(grid), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "digits-simplecnn-clean-s1  defenses: -  [done]" in lines
    assert "digits-simplecnn-clean-s0  defenses: -  [to run]" in lines and lines[-1] == "4 cells"
    assert main(["reproduce", str(grid), "--out", str(tmp_path / "o"), "--only", "nothing*"]) == 2
    assert "--only nothing*: no cell of grid" in capsys.readouterr().err


def test_companion_grids_run_by_the_same_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``also``: the detector matrix's digits part is a grid of its own recipe, run by the same command
    into OUT/<its name>; its cells are checked with the main grid's, --only reaches them."""
    from cuba.cli import main

    part = tmp_path / "part.yaml"
    part.write_text(yaml.safe_dump({**TINY, "name": "part", "attacks": ["none"], "seeds": [5], "defenses": []}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**TINY, "defenses": [], "seeds": [0], "also": [str(part)]}))
    out = tmp_path / "o"
    assert main(["reproduce", str(grid), "--out", str(out), "--only", "*-clean-*"]) == 0
    assert (out / "runs" / "digits-simplecnn-clean-s0" / "metrics.json").is_file()
    assert (out / "part" / "runs" / "digits-simplecnn-clean-s5" / "metrics.json").is_file()
    assert not (out / "runs" / "digits-simplecnn-clean-s5").exists()  # each grid in its own folder
    assert (out / "part" / "report.html").is_file()
    assert "<a href='part/report.html'>part</a>" in (out / "report.html").read_text()  # the main report links it
    capsys.readouterr()
    assert main(["reproduce", str(grid), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"grid {grid} -> {out}" and f"grid {part} -> {out / 'part'}" in lines
    assert "digits-simplecnn-clean-s5  defenses: -  [done]" in lines and "digits-simplecnn-cuba-fra-s0  defenses: -  [to run]" in lines
    # a companion of a companion, a bad also, a bad companion cell: refused before anything trains
    part.write_text(yaml.safe_dump({**TINY, "also": [str(grid)]}))
    assert main(["reproduce", str(grid), "--out", str(out), "--dry-run"]) == 2
    assert "cannot have companions" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="also must be a list of grid names or files"):
        expand({**TINY, "also": "part.yaml"})
    grid.write_text(yaml.safe_dump({**TINY, "also": "part.yaml"}))  # refused before any grid is loaded
    assert main(["reproduce", str(grid), "--out", str(out), "--dry-run"]) == 2
    assert "also must be a list" in capsys.readouterr().err
    # a companion's folder must not be the grid's own runs/ or another companion's
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump({**TINY, "name": "runs"}))
    grid.write_text(yaml.safe_dump({**TINY, "also": ["runs.yaml"]}))  # relative to the grid file's folder
    assert main(["reproduce", str(grid), "--out", str(out), "--dry-run"]) == 2
    assert "its folder OUT/runs is taken" in capsys.readouterr().err
    part.write_text(yaml.safe_dump({**TINY, "name": "part"}))
    grid.write_text(yaml.safe_dump({**TINY, "also": ["part.yaml", str(part)]}))
    assert main(["reproduce", str(grid), "--out", str(out), "--dry-run"]) == 2
    assert "its folder OUT/part is taken" in capsys.readouterr().err
    part.write_text(yaml.safe_dump({**TINY, "attacks": ["nope"]}))
    assert main(["reproduce", str(grid), "--out", str(tmp_path / "never"), "--only", "*-clean-*"]) == 2
    assert not (tmp_path / "never").exists()


# --- the gpu grid: Table II's RGB rows, blocked data sets (its protocol column: test_reproduce_tables.py)

BLOCKED_C100 = ("no local copy of cifar100 (pass --download on a machine with a network, "
                "or put cifar100.npz in --data-dir)")


def _gtsrb_like(path: Path, size: int = 16) -> Path:
    """A tiny synthetic stand-in named like GTSRB: 43 classes, RGB, 2 training and 1 test image each."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.arange(86) % 43
    np.savez(path, x_train=rng.integers(0, 256, (86, size, size, 3), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (43, size, size, 3), dtype=np.uint8), y_test=y[:43])
    return path


def test_gpu_grid_expands_every_rgb_cell(tmp_path: Path) -> None:
    """gpu: GTSRB / PreActResNet18, CIFAR-10 / ResNet18 (the cifar10-jpeg copy when no CIFAR-10 is
    local), CIFAR-100 / ResNet18; FRA, NRA-5, NRA-2, clean; seed 0; the presets' paper epochs; cuda
    bf16; a data set with no local copy is blocked, not an error."""
    from cuba.reproduce import load_grid

    (tmp_path / "gtsrb.npz").touch()  # only the files' presence matters to the expansion
    (tmp_path / "cifar10-jpeg.zip").touch()
    cells = expand(load_grid("gpu") | {"data_dir": str(tmp_path)})
    assert [c.name for c in cells] == [f"{d}-{m}-{s}-s0" for d, m in (("gtsrb", "preactresnet18"), ("cifar10-jpeg", "resnet18"),
                                                                    ("cifar100", "resnet18"))
                                       for s in ("cuba-fra", "cuba-nra5", "cuba-nra2", "clean")]
    assert {(c.values["dataset"], c.values["model"], c.values["epochs"]) for c in cells} == {
        ("gtsrb", "preactresnet18", 50), ("cifar10-jpeg.zip", "resnet18", 100), ("cifar100", "resnet18", 100)}
    assert all(c.values["device"] == "cuda" and c.values["precision"] == "bf16" and c.values["seed"] == 0
               and not c.defenses for c in cells)
    assert [c.blocked for c in cells] == [None] * 8 + [BLOCKED_C100] * 4
    assert [cell_state(tmp_path / "o", c) for c in cells[-2:]] == [f"blocked: {BLOCKED_C100}"] * 2
    # a real CIFAR-10 copy wins over the JPEG stand-in; --download unblocks every named set
    (tmp_path / "cifar10.npz").touch()
    assert expand(load_grid("gpu") | {"data_dir": str(tmp_path)})[4].name == "cifar10-resnet18-cuba-fra-s0"
    fetched = expand(load_grid("gpu") | {"data_dir": str(tmp_path / "absent"), "set": {"device": "cuda", "download": True}})
    assert not any(c.blocked for c in fetched) and fetched[4].values["dataset"] == "cifar10"
    nothing = expand(load_grid("gpu") | {"data_dir": str(tmp_path / "absent")})
    assert nothing[4].blocked == ("no local copy of cifar10 (pass --download on a machine with a network, "
                                  "or put cifar10.npz or cifar10-jpeg.zip in --data-dir)")
    with pytest.raises(ConfigError, match=r"^grid: fallback names data set\(s\) not in datasets: mnist$"):
        expand({**TINY, "fallback": {"mnist": "x.npz"}})
    with pytest.raises(ConfigError, match=r"^grid: fallback must map data sets to another data set"):
        expand({**TINY, "fallback": ["digits"]})


def test_gpu_grid_dry_run_names_blocked_cells(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cuba.cli import main

    assert main(["reproduce", "gpu", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"cifar100-resnet18-cuba-nra2-s0  defenses: -  [blocked: {BLOCKED_C100}]" in lines
    assert lines[-1] == "12 cells, 12 blocked (no local data)"


def test_gpu_grid_runs_on_cpu_with_a_tiny_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The gpu grid end to end on CPU: one GTSRB-named cell (PreActResNet18, a fraction of an
    epoch) trains; CIFAR-10 and CIFAR-100, absent, are blocked rows of table2 and report.html; a
    finished cell says its protocol (the paper's model on a reduced schedule)."""
    import csv

    from cuba.cli import main

    data = tmp_path / "data"
    data.mkdir()
    _gtsrb_like(data / "gtsrb.npz")
    tiny = ["device=cpu", "precision=fp32", "epochs=0.2", "batch_size=16", "val_fraction=0",
            "generator_width=4", "channels_last=false"]
    args = ["reproduce", "gpu", "--out", str(tmp_path / "o"), "--data-dir", str(data), "--only", "gtsrb-*-cuba-fra-s0",
            *(a for kv in tiny for a in ("--set", kv))]
    assert main(args) == 0
    md = (tmp_path / "o" / "table2.md").read_text()
    assert re.search(r"\| gtsrb / preactresnet18 \| cuba-fra( \(degenerate: [^)]*\))? \| paper model, reduced schedule "
                     r"\(0\.2 of 50 epochs\) \| 1 \|", md)
    for ds, setting in (("cifar10", "cuba-nra5"), ("cifar100", "cuba-fra")):
        assert f"| {ds} / resnet18 | {setting} | blocked (no local data) | 0 | – |" in md
    assert f"blocked: {BLOCKED_C100}" in md.splitlines()
    rows = {(r["dataset"], r["setting"]): r for r in csv.DictReader((tmp_path / "o" / "table2.csv").open())}
    assert rows[("cifar100", "cuba-nra2")]["blocked"] == BLOCKED_C100 and rows[("cifar100", "cuba-nra2")]["paper_epochs"] == "100"
    assert rows[("gtsrb", "cuba-fra")]["epochs"] == "0.2" and rows[("gtsrb", "cuba-fra")]["blocked"] == ""
    page = (tmp_path / "o" / "report.html").read_text()
    assert f"blocked: {BLOCKED_C100}" in page and "paper model, reduced schedule (0.2 of 50 epochs)" in page
    assert page.count("<td>blocked (no local data)</td>") == 6
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0 and "[done]" in capsys.readouterr().out


def test_interrupted_grid_writes_its_tables_and_restores_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A spent time budget (SIGTERM from `timeout`) stops `cuba reproduce` cleanly: exit 130, the
    finished cells' table2 / report.html written, blocked rows included; the handler is put back."""
    import signal

    import cuba.reproduce as reproduce
    from cuba.cli import main

    def budget_spent(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this frame before the sleep ends
        pytest.fail("SIGTERM did not stop the grid")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(reproduce, "run_grid", budget_spent)
    assert main(["reproduce", "gpu", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)]) == 130
    assert "interrupted; the running cell resumes from its last checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert "| cifar100 / resnet18 | cuba-fra | blocked (no local data) |" in (tmp_path / "o" / "table2.md").read_text()
    assert (tmp_path / "o" / "report.html").is_file()


def test_named_settings_of_one_attack_become_cells_of_their_own() -> None:
    from cuba.reproduce import expand, load_grid

    cells = {c.name: c for c in expand(load_grid("detectors"))}
    w1, w5 = cells["mnist-simplecnn-cuba-adaptive-fra-w1-s0"], cells["mnist-simplecnn-cuba-adaptive-fra-w5-s0"]
    assert (w1.values["adaptive_weight"], w5.values["adaptive_weight"]) == (1, 5)
    assert all(c.values["n_train"] == 20000 and c.values["epochs"] == 3 and c.values["eps"] == 0.02 for c in cells.values())
    # 39 scored models + 2 clean references (seeds 3, 4), which run only the inversion detectors
    assert "entropy" in w1.defenses and len(cells) == 41 and cells["mnist-simplecnn-cuba-adaptive-set-fra-w5-s2"].values["adaptive_weight"] == 5
    raw = {"datasets": ["digits"], "attacks": ["cuba"], "per_attack": {"cuba": {"settings": {"bad name!": {"tau": 1}}}}}
    with pytest.raises(ConfigError, match="settings must map short names"):
        expand(raw)
    raw["per_attack"]["cuba"]["settings"] = {"t": {"nope": 1}}
    with pytest.raises(ConfigError, match="grid cell digits/simplecnn/cuba/fra/seed 0: unknown config field"):
        expand(raw)
    digits = expand(load_grid("detectors-digits"))
    assert sum(c.values["attack"] == "none" and not c.reference for c in digits) >= 10 and sum(c.values["attack"] == "cuba" for c in digits) >= 10
