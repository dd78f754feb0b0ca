"""cuba reproduce's tables and report on hand-made run folders and rows (no training): Table II's
paper values, DS scale, degenerate flags and protocol column; Table III's at-chance marks and ASR-C
headline; removal headlines. Split from test_reproduce.py (grids: expansion and running), whose
``BLOCKED_C100`` it uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuba.reproduce import expand, write_report

from test_reproduce import BLOCKED_C100

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_table3_marks_asr_of_models_left_at_chance() -> None:
    """A repair that destroys the model (CA 10% of 10 classes) must not read as a surviving backdoor."""
    from cuba.defenses.base import at_chance
    from cuba.reproduce.report import AT_CHANCE_NOTE, table3_markdown

    rows = [{"run": "r", "setting": "cuba-fra", "defense": "nad", "step": 0, "ca": 0.72, "asr": 0.996, "asr_c": 0.995, "num_classes": 10},
            {"run": "r", "setting": "cuba-fra", "defense": "nad", "step": 2, "ca": 0.10, "asr": 0.90, "asr_c": 0.0, "num_classes": 10}]
    md = table3_markdown(rows)
    assert "| r | ASR | 99.60 | 90.00 ‡ |" in md and md.endswith(AT_CHANCE_NOTE)
    # ASR-C does not count the broken model's mistakes, but rests on the few images it still gets right: marked too
    assert "| r | ASR-C (headline) | 99.50 | 0.00 ‡ |" in md
    assert "| paper (CIFAR-10 / ResNet18) |" not in md  # the paper's NAD rows only beside its model
    assert "| paper (CIFAR-10 / ResNet18) | CA |  | 93.61 |" in table3_markdown([{**r, "paper_model": True} for r in rows])
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


def test_table2_keeps_settings_that_share_a_label_apart(tmp_path: Path) -> None:
    """The adaptive attacker at two weights shares the label cuba-adaptive-fra: two rows, named by the
    field that differs, not one row averaging them as seeds; seeds of one setting still fold."""
    from cuba.config import make_config
    from cuba.reproduce.tables import finished_runs, table2_rows
    from cuba.runs import save_config, write_json

    def run(name: str, ds: float, **cfg) -> None:
        c = make_config({"dataset": "digits", "model": "simplecnn", **cfg})
        save_config(tmp_path / "runs" / name, c)
        write_json(tmp_path / "runs" / name / "metrics.json", {"dataset": "digits", "num_classes": 10, "ca": 0.97,
                                                                "asr": 1.0, "ds": ds})

    run("w1-s0", 0.72, attack="cuba-adaptive", adaptive_weight=1.0, seed=0)
    run("w1-s1", 0.74, attack="cuba-adaptive", adaptive_weight=1.0, seed=1)
    run("w5-s0", 0.70, attack="cuba-adaptive", adaptive_weight=5.0, seed=0)
    run("clean-s0", None, attack="none")
    rows = {r["setting"]: r for r in table2_rows(finished_runs(tmp_path))}
    assert set(rows) == {"cuba-adaptive-fra (adaptive_weight=1)", "cuba-adaptive-fra (adaptive_weight=5)"}
    assert rows["cuba-adaptive-fra (adaptive_weight=1)"]["n"] == 2
    assert rows["cuba-adaptive-fra (adaptive_weight=1)"]["ds"][:2] == pytest.approx((73.0, 1.41421356))
    assert rows["cuba-adaptive-fra (adaptive_weight=5)"]["ds"][0] == pytest.approx(70.0)
    assert rows["cuba-adaptive-fra (adaptive_weight=5)"]["clean_ca"][0] == pytest.approx(97.0)


def test_report_keeps_reference_models_out_of_the_scored_runs(tmp_path: Path) -> None:
    """A grid's reference models decide the inversion detectors' flag in defenses.md / report.html
    and are not columns of the matrix nor models of the AUROC; the model-level table reaches the report."""
    from cuba.config import make_config
    from cuba.defenses.base import model_verdict
    from cuba.runs import save_config, write_json

    for name, attack, score in (("clean-s0", "none", 0.03), ("clean-s1", "none", 0.08), ("fra-s0", "cuba", 0.01)):
        save_config(tmp_path / "runs" / name, make_config({"dataset": "digits", "model": "simplecnn", "attack": attack}))
        write_json(tmp_path / "runs" / name / "metrics.json", {"dataset": "digits", "num_classes": 10, "ca": 0.97})
        setting = "clean" if attack == "none" else "cuba-fra"
        write_json(tmp_path / "runs" / name / "defenses" / "dispersion-inversion" / "defense.json",
                   {"setting": setting, "seconds": 1.0, "params": {"margin": 2.0}, "budgets": [0.1], "rows": [],
                    "reached": True, "reference_budgets": None, "reference_cutoff": None,
                    **model_verdict(score, "low", None, False)})
    page = write_report(tmp_path, references=["clean-s1"]).read_text()
    md = (tmp_path / "defenses.md").read_text()
    assert md.splitlines()[0] == "| defense | clean-s0 | fra-s0 |"
    # cutoff 0.08 / 2 = 0.04: the CUBA model (0.01) is caught, the scored clean one (0.03) a false alarm
    assert "| dispersion-inversion | low | 1.000 (1 vs 1) | 1.000 (1 vs 1) | 1/1 | – | 1/1 |" in md
    assert "flagged decided on 1 clean reference model(s)" in page and "Model-level detectors over these runs" in page
    assert "false alarm" in page and "caught" in page
    assert "Wall seconds per defense" in page and "| dispersion-inversion | 2 | 1 | 1 | 2 |" in md  # references not counted


def test_report_sets_groups_against_the_grids_baseline(tmp_path: Path) -> None:
    """The grid's ``compare`` reaches defenses.md and report.html: the adaptive group against CUBA FRA,
    and a line (not a crash) while the baseline group has not finished."""
    from cuba.config import make_config
    from cuba.runs import save_config, write_json

    def run(name: str, attack: str, setting: str, far: float, auroc: float) -> None:
        save_config(tmp_path / "runs" / name, make_config({"dataset": "digits", "model": "simplecnn", "attack": attack}))
        write_json(tmp_path / "runs" / name / "metrics.json", {"dataset": "digits", "num_classes": 10, "ca": 0.97})
        write_json(tmp_path / "runs" / name / "defenses" / "near-tie" / "defense.json",
                   {"setting": setting, "seconds": 1.0, "auroc": auroc, "far_at_frr_1pct": far})

    run("digits-simplecnn-cuba-adaptive-fra-w1-s0", "cuba-adaptive", "cuba-adaptive-fra", 0.9, 0.3)
    compare = {"baseline": "cuba-fra", "against": "cuba-adaptive"}
    write_report(tmp_path, compare=compare)
    assert "Against cuba-fra: not yet (no group 'cuba-fra' among the finished runs)" in (tmp_path / "defenses.md").read_text()
    run("digits-simplecnn-cuba-fra-s0", "cuba", "cuba-fra", 0.0, 1.0)
    # every run a CUBA model: the shown groups lose "cuba-" too (fra, adaptive-fra-w1), the baseline still matches
    page = write_report(tmp_path, compare=compare).read_text()
    md = (tmp_path / "defenses.md").read_text()
    assert "| detector | adaptive-fra-w1 |" in md
    assert "| near-tie | caught 1/1 → 0/1; AUROC 1.000 → 0.300 (-0.700); FAR@FRR 1% 0.000 → 0.900 |" in md
    assert "<td>caught 1/1 → 0/1; AUROC 1.000 → 0.300 (-0.700); FAR@FRR 1% 0.000 → 0.900</td>" in page
    # the folded matrix as a heatmap, embedded under the tables
    assert (tmp_path / "figures" / "detector-matrix.png").stat().st_size > 0
    assert "alt='The detector matrix folded over seeds" in page


def test_table2_holds_each_setting_against_the_nearest_clean_runs(tmp_path: Path) -> None:
    """Clean runs of another schedule are not folded into an attacked row's clean reference: clean at
    10 epochs (CA 99) and at 1 epoch (CA 60) beside an attack at 10 epochs read clean CA 99.00, not 79.50."""
    from cuba.config import make_config
    from cuba.reproduce.tables import finished_runs, table2_rows
    from cuba.runs import save_config, write_json

    def run(name: str, ca: float, **cfg) -> None:
        save_config(tmp_path / "runs" / name, make_config({"dataset": "digits", "model": "simplecnn", **cfg}))
        write_json(tmp_path / "runs" / name / "metrics.json", {"dataset": "digits", "num_classes": 10, "ca": ca,
                                                                "asr": 1.0, "ds": 0.9})

    run("clean-e10", 0.99, attack="none", epochs=10)
    run("clean-e1", 0.60, attack="none", epochs=1)
    run("fra-e10", 0.985, attack="cuba", epochs=10)
    rows = table2_rows(finished_runs(tmp_path))
    assert [r["setting"] for r in rows] == ["cuba-fra"]  # the split clean groups are references, not rows
    assert rows[0]["clean_ca"][0] == pytest.approx(99.0) and rows[0]["degenerate"] is None
