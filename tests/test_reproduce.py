"""cuba reproduce on a tiny digits grid: expansion and its errors, skipping finished cells, submitit's
local executor, table2, and a kill-and-rerun that finishes the grid without redoing cells."""

from __future__ import annotations

import json
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


def test_paper_values_only_beside_the_papers_model() -> None:
    from cuba.reproduce.tables import table2_rows

    class R:  # the fields of cuba.compare.Run that table2_rows reads
        def __init__(self, model: str, label: str) -> None:
            self.config, self.label = {"dataset": "mnist", "model": model}, label
            self.metrics = {"dataset": "mnist", "asr": 1.0, "ds": 0.9, "ca": 0.99}

    same = table2_rows([R("simplecnn", "cuba-fra"), R("simplecnn", "clean")])
    assert same[0]["paper"] == (99.99, 90.74, 99.45) and same[0]["paper_clean"] == 99.58
    other = table2_rows([R("resnet18", "cuba-fra")])
    assert other[0]["paper"] is None and other[0]["paper_clean"] is None


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


def test_table3_marks_asr_of_models_left_at_chance() -> None:
    """A repair that destroys the model (CA 10% of 10 classes) must not read as a surviving backdoor."""
    from cuba.defenses.base import at_chance
    from cuba.reproduce.report import AT_CHANCE_NOTE, table3_markdown

    rows = [{"run": "r", "setting": "cuba-fra", "defense": "nad", "step": 0, "ca": 0.72, "asr": 0.996, "asr_c": 0.995, "num_classes": 10},
            {"run": "r", "setting": "cuba-fra", "defense": "nad", "step": 2, "ca": 0.10, "asr": 0.90, "asr_c": 0.0, "num_classes": 10}]
    md = table3_markdown(rows)
    assert "| r | ASR | 99.60 | 90.00 ‡ |" in md and md.endswith(AT_CHANCE_NOTE)
    assert "| r | ASR-C (headline) | 99.50 | 0.00 |" in md  # ASR-C does not count the broken model's mistakes
    assert "| r | CA | 72.00 | 10.00 |" in md
    assert at_chance(0.19, 10) and not at_chance(0.21, 10) and not at_chance(0.1, None)
    rows[1]["ca"] = 0.5  # a working model: no mark, no note
    assert "‡" not in table3_markdown(rows)


def test_removal_headline_says_when_the_last_model_is_at_chance() -> None:
    from cuba.defenses.base import removal_headline

    rows = [{"epoch": 0, "ca": 0.72, "asr": 0.996}, {"epoch": 10, "ca": 0.10, "asr": 0.90}]
    assert removal_headline(rows, "epoch", 10).endswith("CA at chance level (K=10): ASR not meaningful")
    assert "chance" not in removal_headline(rows, "epoch")  # defense.json files from before the field
    rows[1]["ca"] = 0.6
    assert "chance" not in removal_headline(rows, "epoch", 10)


def test_table2_ds_scale_and_degenerate_flags(tmp_path: Path) -> None:
    """Table II carries DS floor / DS uniform / effective classes, "–" for runs made before those
    keys, and "n/a (degenerate)" for a setting at chance or far below its clean CA (md, csv, tex, html)."""
    import csv
    import io

    from cuba.config import make_config
    from cuba.reproduce.tables import finished_runs, table2_csv, table2_latex, table2_markdown, table2_rows
    from cuba.runs import save_config, write_json

    def run(name: str, metrics: dict, **cfg) -> None:
        c = make_config({"dataset": "digits", "model": "simplecnn", **cfg})
        save_config(tmp_path / "runs" / name, c)
        write_json(tmp_path / "runs" / name / "metrics.json", {"dataset": "digits", "num_classes": 10, **metrics})

    scale = {"ds_floor": 0.7, "ds_uniform": 0.941, "effective_classes": 8.5}
    run("fra-s0", {"ca": 0.97, "asr": 1.0, "ds": 0.93, **scale}, seed=0)
    run("fra-s1", {"ca": 0.95, "asr": 1.0, "ds": 0.95, **scale}, seed=1)
    run("nra2-s0", {"ca": 0.96, "asr": 0.99, "ds": 0.9}, variant="nra", k=2)  # an old run: no scale keys
    run("nra5-s0", {"ca": 0.12, "asr": 0.95, "ds": 0.9, **scale, "degenerate": True,
                    "degenerate_reason": "CA 12.00% is at chance level (< 2/K = 20.0%): the classifier did not learn"},
        variant="nra", k=5)
    run("bn-s0", {"ca": 0.80, "asr": 1.0, "ds": 0.75, **scale}, attack="badnets")  # 16 points under clean
    run("clean-s0", {"ca": 0.96}, attack="none")
    rows = {r["setting"]: r for r in table2_rows(finished_runs(tmp_path))}
    assert rows["cuba-fra"]["ds_uniform"][:2] == pytest.approx((94.1, 0.0)) and rows["cuba-fra"]["degenerate"] is None
    assert rows["cuba-nra5"]["degenerate"].startswith("CA 12.00%") and rows["badnets-t0"]["degenerate"] == "CA far below clean reference"
    md = table2_markdown(list(rows.values()))
    assert "| DS floor | DS uniform | eff. classes |" in md.splitlines()[0]
    assert "| cuba-fra | not a paper data set | 2 | 100.00 ± 0.00 | 94.00 ± 1.41 | 96.00 ± 1.41 | 96.00 | 70.00 ± 0.00 | 94.10 ± 0.00 | 8.50 ± 0.00 |" in md
    assert "| cuba-nra2 | not a paper data set | 1 | 99.00 | 90.00 | 96.00 | 96.00 | – | – | – |" in md
    na = "n/a (degenerate)"
    assert f"| cuba-nra5 (degenerate: CA at chance) | not a paper data set | 1 | {na} | {na} | 12.00 | 96.00 | {na} | {na} | {na} |" in md
    assert f"| badnets-t0 (degenerate: CA far below clean reference) | not a paper data set | 1 | {na} | {na} | 80.00 |" in md
    table = {r["setting"]: r for r in csv.DictReader(io.StringIO(table2_csv(list(rows.values()))))}
    assert table["cuba-fra"]["ds_uniform_mean"] == "94.1000" and table["cuba-fra"]["effective_classes_mean"] == "8.5000"
    assert table["cuba-nra5"]["asr_mean"] == "" and table["cuba-nra5"]["ca_mean"] == "12.0000"
    assert table["cuba-nra5"]["degenerate"].startswith("CA 12.00%") and table["cuba-nra2"]["ds_floor_mean"] == ""
    tex = table2_latex(list(rows.values()))
    assert "DS floor (\\%) & DS uniform (\\%) & Eff.\\ classes" in tex and "n/a (degenerate)" in tex
    page = write_report(tmp_path).read_text()
    assert "cuba-nra5 (degenerate: CA at chance)" in page and "DS uniform" in page and "DS floor: the DS of total collapse" in page


def test_table3_headline_is_asr_c_for_untargeted_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Table III: untargeted runs get an ASR-C row marked as the headline (and a note saying so); the
    targeted controls keep ASR; a defense.json from before ASR-C falls back to ASR, marked †; the CSV
    and TeX carry ASR-C and which one is the headline."""
    import csv
    import io

    from cuba.reproduce.report import FALLBACK_NOTE, HEADLINE_NOTE, table3_markdown

    def row(run: str, setting: str, step: float, ca: float, asr: float, asr_c: float | None = None, **kw: object) -> dict:
        r = {"run": run, "setting": setting, "defense": "fine-pruning", "step": step, "ca": ca, "asr": asr, "num_classes": 10, **kw}
        return r if asr_c is None else {**r, "asr_c": asr_c}

    rows = [row("u", "cuba-fra", 0.0, 0.98, 0.99, 0.99, headline="asr_c"), row("u", "cuba-fra", 0.9, 0.6, 0.41, 0.02, headline="asr_c"),
            row("t", "badnets-t0", 0.0, 0.98, 1.0, 1.0, headline="asr"), row("o", "push-away-fra", 0.0, 0.9, 0.5)]
    md = table3_markdown(rows)
    assert "| u | ASR | 99.00 | 41.00 |" in md and "| u | ASR-C (headline) | 99.00 | 2.00 |" in md
    assert "| t | ASR | 100.00 |  |" in md and "| t | ASR-C" not in md
    assert "| o | ASR † (headline) | 50.00 |  |" in md and HEADLINE_NOTE in md and FALLBACK_NOTE in md

    # write_table3 reads the defense.json files: old ones (no asr_c, no asr_headline_key) still tabulate
    from cuba.reproduce import report

    runs = []
    for name, label, rs, extra in (("u", "cuba-fra", [{"prune_ratio": 0.0, "ca": 0.6, "asr": 0.41, "asr_c": 0.02}], {"asr_headline_key": "asr_c"}),
                                   ("o", "cuba-fra", [{"prune_ratio": 0.0, "ca": 0.6, "asr": 0.41}], {})):
        d = tmp_path / "runs" / name / "defenses" / "fine-pruning"
        d.mkdir(parents=True)
        (d / "defense.json").write_text(json.dumps({"rows": rs, **extra}))
        runs.append(type("R", (), {"path": tmp_path / "runs" / name, "label": label, "metrics": {"num_classes": 10}})())
    monkeypatch.setattr(report, "finished_runs", lambda out: runs)
    report.write_table3(tmp_path)
    got = list(csv.DictReader(io.StringIO((tmp_path / "table3.csv").read_text())))
    assert [(r["run"], r["asr_c"], r["headline_asr"]) for r in got] == [("u", "0.02", "asr_c"), ("o", "", "asr (asr_c not recorded)")]
    tex = (tmp_path / "table3.tex").read_text()
    assert "u & fine-pruning & 0 & 60.00 & 41.00 & \\textbf{2.00}" in tex and "o & fine-pruning & 0 & 60.00 & \\textbf{41.00} & --" in tex


# --- the gpu grid: Table II's RGB rows, blocked data sets, the protocol column --------------------

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


def test_protocol_says_paper_model_and_schedule_or_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Table II row says whether it ran with the paper's model and schedule, a reduced one, a
    stand-in model or a stand-in copy of the data (md, csv, tex, html); paper values stand only
    beside the paper's model, the JPEG copy of CIFAR-10 included (its protocol names the copy)."""
    import csv
    import io

    from cuba.config import make_config
    from cuba.reproduce.tables import BLOCKED, blocked_settings, finished_runs, protocol, table2_csv, table2_latex, table2_rows
    from cuba.runs import save_config, write_json

    def run(name: str, dataset: str, **cfg) -> None:  # metrics' dataset is what a run is grouped by
        save_config(tmp_path / "runs" / name, make_config({"dataset": "digits", **cfg}))
        write_json(tmp_path / "runs" / name / "metrics.json", {"dataset": dataset, "num_classes": 10, "ca": 0.9, "asr": 1.0, "ds": 0.9})

    run("g-paper", "gtsrb", model="preactresnet18", epochs=50)
    run("g-cpu", "gtsrb", model="preactresnet18", epochs=6, variant="nra-5")
    run("c10-jpeg", "cifar10-jpeg", model="simplecnn", epochs=6)
    run("c10-jpeg-r18", "cifar10-jpeg", model="resnet18", epochs=8, variant="nra-2")
    run("m", "mnist", model="simplecnn", epochs=10, n_train=1000)
    run("d", "digits", model="simplecnn", epochs=3)
    cells = expand(load_grid_gpu(tmp_path))
    rows = {(r["dataset"], r["setting"]): r for r in table2_rows(finished_runs(tmp_path), blocked_settings(cells))}
    jpeg = "data: cifar10-jpeg, a lossy JPEG copy, not CIFAR-10"
    assert {k: r["protocol"] for k, r in rows.items()} == {
        ("gtsrb", "cuba-fra"): "paper model, paper schedule",
        ("gtsrb", "cuba-nra5"): "paper model, reduced schedule (6 of 50 epochs)",
        ("cifar10-jpeg", "cuba-fra"): f"stand-in model (simplecnn for resnet18), reduced schedule (6 of 100 epochs), {jpeg}",
        ("cifar10-jpeg", "cuba-nra2"): f"paper model, reduced schedule (8 of 100 epochs), {jpeg}",
        ("mnist", "cuba-fra"): "paper model, paper schedule on 1000 training images",
        ("digits", "cuba-fra"): "not a paper data set",
        **{("cifar100", s): BLOCKED for s in ("cuba-fra", "cuba-nra5", "cuba-nra2")},
    }  # gtsrb and cifar10 cells of the grid are not blocked: their files are in its data_dir
    assert rows[("cifar10-jpeg", "cuba-nra2")]["paper"] == (99.71, 98.39, 93.87)  # the paper's model on a copy
    assert rows[("cifar10-jpeg", "cuba-fra")]["paper"] is None  # a stand-in model: nothing beside it
    assert rows[("cifar100", "cuba-fra")]["paper"] == (98.84, 97.06, 74.60) and rows[("cifar100", "cuba-fra")]["n"] == 0
    assert protocol("gtsrb", "preactresnet18", {}) == "paper model, schedule not recorded"
    table = list(csv.DictReader(io.StringIO(table2_csv(list(rows.values())))))
    assert {r["protocol"] for r in table} >= {"paper model, paper schedule", BLOCKED}
    assert "Setting & Protocol & ASR" in table2_latex(list(rows.values()))
    # a blocked setting that has runs after all (trained elsewhere, copied in) is shown by its runs
    copied = [{"dataset": "gtsrb", "model": "preactresnet18", "setting": "cuba-fra", "epochs": 50, "reason": "x"}]
    assert [r["protocol"] for r in table2_rows(finished_runs(tmp_path), copied) if r["dataset"] == "gtsrb"] == [
        "paper model, paper schedule", "paper model, reduced schedule (6 of 50 epochs)"]
    from cuba.reproduce import report

    monkeypatch.setattr(report, "collect_figures", lambda out: [])  # fake runs have no predictions to draw
    page = write_report(tmp_path, blocked=blocked_settings(cells)).read_text()
    assert f"<td>stand-in model (simplecnn for resnet18), reduced schedule (6 of 100 epochs), {jpeg}</td>" in page
    assert f"blocked: {BLOCKED_C100}" in page and "protocol: whether a row ran with the paper" in page


def load_grid_gpu(data_dir: Path) -> dict:
    """The shipped gpu grid with GTSRB and the CIFAR-10 JPEG copy present in ``data_dir`` (empty files)."""
    from cuba.reproduce import load_grid

    for name in ("gtsrb.npz", "cifar10-jpeg.zip"):
        (data_dir / name).touch()
    return load_grid("gpu") | {"data_dir": str(data_dir)}


def test_named_settings_of_one_attack_become_cells_of_their_own() -> None:
    from cuba.reproduce import expand, load_grid

    cells = {c.name: c for c in expand(load_grid("detectors"))}
    w1, w5 = cells["mnist-simplecnn-cuba-adaptive-fra-w1-s0"], cells["mnist-simplecnn-cuba-adaptive-fra-w5-s0"]
    assert (w1.values["adaptive_weight"], w5.values["adaptive_weight"]) == (1, 5)
    assert "entropy" in w1.defenses and len(cells) == 33
    raw = {"datasets": ["digits"], "attacks": ["cuba"], "per_attack": {"cuba": {"settings": {"bad name!": {"tau": 1}}}}}
    with pytest.raises(ConfigError, match="settings must map short names"):
        expand(raw)
    raw["per_attack"]["cuba"]["settings"] = {"t": {"nope": 1}}
    with pytest.raises(ConfigError, match="grid cell digits/simplecnn/cuba/fra/seed 0: unknown config field"):
        expand(raw)
    digits = expand(load_grid("detectors-digits"))
    assert sum(c.values["attack"] == "none" for c in digits) >= 10 and sum(c.values["attack"] == "cuba" for c in digits) >= 10
