"""The untargeted-aware harness (issue 18, point 1): model-level detectors write one verdict shape,
and `cuba defense-table` ranks models by it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuba.defenses.base import model_verdict
from cuba.defenses.model_level import model_auroc
from cuba.defenses.table import defense_tables


def test_model_verdict_shape_and_direction() -> None:
    v = model_verdict(3.2, "high", True, assumes_target_class=True)
    assert v == {"level": "model", "score": 3.2, "score_suspicious": "high", "flagged": True, "assumes_target_class": True}
    assert model_verdict(None, "low", None, False)["score"] is None
    with pytest.raises(ValueError, match="score_suspicious: 'high' or 'low', got 'up'"):
        model_verdict(1.0, "up", False, False)


def _f(score: float | None, flagged: bool | None, suspicious: str = "high", **extra: object) -> dict:
    return {**model_verdict(score, suspicious, flagged, False), **extra}


def test_model_auroc_by_hand() -> None:
    # CUBA scores 3, 1; clean 2, 0: pairs (3>2, 3>0, 1<2, 1>0) -> 3 of 4 ordered right = 0.75
    entries = [("cuba-fra", _f(3, True)), ("cuba-nra2", _f(1, False)), ("clean", _f(2, True)), ("clean", _f(0, False)),
               ("badnets-t0", _f(5, True))]
    assert model_auroc(entries, ("cuba",)) == (0.75, 2, 2)
    # with BadNets among the positives: 5 beats both clean -> (3 + 2) / 6
    assert model_auroc(entries, ("cuba", "other"))[0] == pytest.approx(5 / 6)
    # the same numbers from a detector whose LOW scores are suspicious: the ranking flips
    low = [(s, {**f, "score_suspicious": "low"}) for s, f in entries]
    assert model_auroc(low, ("cuba",))[0] == pytest.approx(0.25)
    # not applicable to a model, or no clean model: left out / no AUROC
    na = entries + [("clean", {**_f(9, True), "applicable": False, "reason": "no BN"})]
    assert model_auroc(na, ("cuba",)) == (0.75, 2, 2)
    assert model_auroc(entries[:2], ("cuba",)) == (None, 2, 0)


def test_defense_table_adds_the_model_level_rows(tmp_path: Path) -> None:
    runs = []
    for name, setting, score, flagged in (("a", "cuba-fra", 0.8, False), ("b", "clean", 1.9, False),
                                          ("c", "badnets-t0", 4.0, True), ("d", "clean", 1.1, False)):
        folder = tmp_path / name / "defenses" / "neural-cleanse"
        folder.mkdir(parents=True)
        f = {"setting": setting, "seconds": 1.0, "anomaly_index": score, "flagged_classes": [0] if flagged else [],
             **model_verdict(score, "high", flagged, True)}
        (folder / "defense.json").write_text(json.dumps(f))
        runs.append(tmp_path / name)
    md = defense_tables(runs)
    row = next(line for line in md.splitlines() if line.startswith("| neural-cleanse | high |"))
    # CUBA 0.8 below both clean (1.9, 1.1): AUROC 0; BadNets above both: any-backdoor AUROC (0 + 2) / 4
    assert row == "| neural-cleanse | high | 0.000 (1 vs 2) | 0.500 (2 vs 2) | 0/1 | 1/1 | 0/2 |"
    # the cost of each defense over the runs: 4 runs of 1 s each
    assert md.splitlines()[-1] == "| neural-cleanse | 4 | 1 | 1 | 4 |"


def _di_run(root: Path, name: str, setting: str, score: float) -> Path:
    """A run folder holding one dispersion-inversion defense.json decided without references."""
    folder = root / name / "defenses" / "dispersion-inversion"
    folder.mkdir(parents=True)
    f = {"setting": setting, "seconds": 2.0, "params": {"margin": 2.0}, "budgets": [1 / 255, 64 / 255], "rows": [],
         "reached": True, "reference_budgets": None, "reference_cutoff": None,
         **model_verdict(score, "low", None, False)}
    (folder / "defense.json").write_text(json.dumps(f))
    return root / name


def test_defense_table_references_decide_the_flag_and_leave_the_scored_runs(tmp_path: Path) -> None:
    from cuba.config import ConfigError

    # references score 0.06 and 0.04: cutoff min / margin = 0.02. CUBA 0.01 < 0.02 flagged, clean 0.03 not
    runs = [_di_run(tmp_path, "cuba", "cuba-fra", 0.01), _di_run(tmp_path, "clean", "clean", 0.03),
            _di_run(tmp_path, "ref1", "clean", 0.06), _di_run(tmp_path, "ref2", "clean", 0.04)]
    md = defense_tables(runs, references=runs[2:])
    table_head = md.splitlines()[0]
    assert table_head.count("|") == 4  # defense + the two scored runs: references are not columns
    row = next(line for line in md.splitlines() if line.startswith("| dispersion-inversion | low |"))
    # one CUBA vs one clean model (not three): the references never enter the AUROC
    assert row == "| dispersion-inversion | low | 1.000 (1 vs 1) | 1.000 (1 vs 1) | 1/1 | – | 0/1 |"
    assert "flagged decided on 2 clean reference model(s)" in md and "(scores 15.3/255, 10.2/255)" in md
    assert "caught" in md.splitlines()[2] and "clear" in md.splitlines()[2]
    # without references the detector cannot decide: no verdict, no flag counts
    plain = defense_tables(runs[:2])
    assert "| dispersion-inversion | low | 1.000 (1 vs 1) | 1.000 (1 vs 1) | 0/1 (1 undecided) | – | 0/1 (1 undecided) |" in plain
    with pytest.raises(ConfigError, match="a reference model must be clean, this one is 'cuba-fra'"):
        defense_tables(runs[1:], references=runs[:1])
    # the folded matrix as a heatmap: `cuba defense-table --plot`, the references deciding the flags
    from cuba.cli import main

    png = tmp_path / "matrix.png"
    assert main(["defense-table", *map(str, runs[:2]), "--reference", *map(str, runs[2:]), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0


def test_model_auroc_keeps_unreached_models_as_least_suspicious() -> None:
    """Trigger inversion writes score null when no budget moved a model (``reached: false``): that
    model resisted hardest, so it ranks below every scored one instead of leaving the AUROC."""
    def ti(score: float | None) -> dict:
        return {**_f(score, None, "low"), "reached": score is not None}

    entries = [("cuba-fra", ti(4.0)), ("cuba-fra", ti(8.0)), ("clean", ti(2.0)), ("clean", ti(None)), ("clean", ti(None))]
    # CUBA 4 and 8 each beat both unreached clean models, lose to clean 2: 4 of 6 pairs
    assert model_auroc(entries, ("cuba",)) == (pytest.approx(4 / 6), 2, 3)
    # a null score without `reached: false` (a detector that abstained) is still left out
    assert model_auroc(entries + [("clean", _f(None, None, "low"))], ("cuba",))[2] == 3


def _write(root: Path, name: str, dataset: str, defense: str, f: dict) -> Path:
    import yaml

    run = root / name
    (run / "defenses" / defense).mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": dataset}, "model": {"model": "simplecnn"}}))
    (run / "defenses" / defense / "defense.json").write_text(json.dumps(f))
    return run


def test_model_level_rows_and_references_stay_within_one_data_set(tmp_path: Path) -> None:
    from cuba.config import ConfigError

    def di(setting: str, score: float, **params: object) -> dict:
        return {"setting": setting, "seconds": 1.0, "params": {"margin": 2.0, "steps": 100, **params}, "budgets": [0.5],
                "rows": [], "reached": True, "reference_budgets": None, "reference_cutoff": None,
                **model_verdict(score, "low", None, False)}

    runs = [_write(tmp_path, "m-cuba", "mnist", "dispersion-inversion", di("cuba-fra", 0.01)),
            _write(tmp_path, "m-clean", "mnist", "dispersion-inversion", di("clean", 0.05)),
            _write(tmp_path, "c-cuba", "cifar10", "dispersion-inversion", di("cuba-fra", 0.2)),
            _write(tmp_path, "c-clean", "cifar10", "dispersion-inversion", di("clean", 0.1))]
    refs = [_write(tmp_path, "m-ref", "mnist", "dispersion-inversion", di("clean", 0.04)),
            _write(tmp_path, "c-ref", "cifar10", "dispersion-inversion", di("clean", 0.5))]
    md = defense_tables(runs, references=refs)
    # one AUROC per data set: pooled, MNIST's CUBA 0.01 and CIFAR's 0.2 against clean 0.05 and 0.1 would read 0.5
    assert "| dispersion-inversion (mnist/simplecnn) | low | 1.000 (1 vs 1) | 1.000 (1 vs 1) | 1/1 | – | 0/1 |" in md
    # CIFAR's cutoff comes from its own reference (0.5 / 2 = 0.25), not MNIST's 0.04 / 2: both flagged
    assert "| dispersion-inversion (cifar10/simplecnn) | low | 0.000 (1 vs 1) | 0.000 (1 vs 1) | 1/1 | – | 1/1 |" in md
    assert "dispersion-inversion (mnist/simplecnn): flagged decided on 1 clean reference model(s)" in md
    odd = _write(tmp_path, "m-ref-odd", "mnist", "dispersion-inversion", di("clean", 0.04, steps=10))
    with pytest.raises(ConfigError, match=r"m-ref-odd: dispersion-inversion ran with other parameters than on .*m-cuba \(steps\)"):
        defense_tables(runs[:2], references=[odd])
    # a parameter resolved at run time (null in params) is compared by the value the detector recorded
    old = _write(tmp_path, "m-ref-old", "mnist", "dispersion-inversion", {**di("clean", 0.04, tau=None), "tau": 0.1})
    new = [_write(tmp_path, "m-new", "mnist", "dispersion-inversion", {**di("cuba-fra", 0.01, tau=0.1), "tau": 0.1})]
    assert "flagged decided on 1 clean reference model(s)" in defense_tables(new, references=[old])
    other = _write(tmp_path, "m-ref-tau", "mnist", "dispersion-inversion", {**di("clean", 0.04, tau=None), "tau": 0.5})
    with pytest.raises(ConfigError, match=r"m-ref-tau: dispersion-inversion ran with other parameters .*\(tau\)"):
        defense_tables(new, references=[other])
    # what a run resolved where it ran ("resolved", e.g. Neural Cleanse's auto precision) must match too
    bf = [_write(tmp_path, "m-bf", "mnist", "dispersion-inversion", {**di("cuba-fra", 0.01), "resolved": {"precision": "bf16"}})]
    fp = _write(tmp_path, "m-ref-fp", "mnist", "dispersion-inversion", {**di("clean", 0.04), "resolved": {"precision": "fp32"}})
    with pytest.raises(ConfigError, match=r"m-ref-fp: dispersion-inversion ran with other parameters .*\(precision as run\)"):
        defense_tables(bf, references=[fp])
    assert "flagged decided on 1 clean reference model(s)" in defense_tables(bf, references=[refs[0]])  # older file: no "resolved"


def test_trigger_inversion_reference_rule() -> None:
    from cuba.defenses import DEFENSES

    ti = DEFENSES["trigger-inversion"]
    f = {"setting": "cuba-fra", "budgets": [1.0, 2.0, 4.0, 8.0], "margin": 2.0, "reference_budget": None, "target": 0.8,
         **model_verdict(1.0, "low", None, False)}
    # reference budget = the smallest reference score (4); cut 2: 1 < 2 flagged; null references are left out
    assert ti.with_references(f, [8.0, 4.0, None]) | {} == {**f, "reference_budget": 4.0, "flagged": True,
                                                                 "reference_scores": [8.0, 4.0, None]}
    assert ti.with_references({**f, "score": 2.0}, [4.0])["flagged"] is False
    # every reference unreached (each needs > 8): under 8 / 2 is flagged for sure, above is undecided
    assert ti.with_references(f, [None])["flagged"] is True
    # ... and its cell says so, never "no reference" beside a decided flag
    assert ti.headline(ti.with_references(f, [None, None])).endswith("; flagged (every reference beyond 8/255, margin 2)")
    assert ti.headline(ti.with_references({**f, "score": 5.0}, [None])).endswith(
        "; undecided (every reference beyond 8/255, margin 2)")
    assert ti.with_references({**f, "score": 5.0}, [None, None])["flagged"] is None
    assert ti.with_references(f, []) is None
    # how the note under the table writes a reference's score: TI in 1/255; DI's censored score as "beyond"
    assert ti.format_score(64.0, f) == "64/255"
    di = DEFENSES["dispersion-inversion"]
    assert di.format_score(32 / 255, {"reached": True}) == "32/255"
    assert di.format_score(128 / 255, {"reached": False, "budgets": [1 / 255, 64 / 255]}) == "> 64/255"
    assert DEFENSES["neural-cleanse"].with_references(f, [1.0]) is None  # no reference rule: untouched


def test_verdict_by_each_detectors_own_rule() -> None:
    """caught / missed on backdoored models, clear / false alarm on clean ones; the input-level bar is
    at most 5% of backdoor inputs let through (FAR <= 0.05, or TPR >= 0.95), inclusive."""
    from cuba.defenses import DEFENSES
    from cuba.defenses.verdict import verdict

    strip, scale_up, nc = DEFENSES["strip"], DEFENSES["scale-up"], DEFENSES["neural-cleanse"]
    assert verdict(strip, {"setting": "cuba-fra", "far_at_frr_1pct": 0.05}) == "caught"
    assert verdict(strip, {"setting": "cuba-fra", "far_at_frr_1pct": 0.0501}) == "missed"
    assert verdict(scale_up, {"setting": "badnets-t0", "tpr_at_fpr_5pct": 0.95}) == "caught"
    assert verdict(scale_up, {"setting": "badnets-t0", "tpr_at_fpr_5pct": 0.94}) == "missed"
    assert verdict(DEFENSES["entropy"], {"setting": "cuba-nra2", "far_at_frr_1pct": 0.0,
                                         "far_at_frr_1pct_two_sided": 0.9}) == "missed"  # its rule is the two-sided one
    assert verdict(strip, {"setting": "cuba-fra", "far_at_frr_1pct": 0.0, "applicable": False, "reason": "x"}) is None
    assert verdict(strip, {"setting": "clean", "far_at_frr_1pct": 0.0}) is None  # nothing to catch on a clean model
    # a run without a validation split: the threshold was fitted on training images, so no verdict
    unheld = {"setting": "cuba-fra", "far_at_frr_1pct": 0.0}
    assert verdict(strip, {**unheld, "calibration": "validation split (142 held-out training images)"}) == "caught"
    assert verdict(strip, {**unheld, "calibration": "training images (this run has no validation split)"}) is None
    assert verdict(DEFENSES["fine-pruning"], {"setting": "cuba-fra", "rows": []}) is None  # no yes/no rule
    assert verdict(strip, {"far_at_frr_1pct": 0.0}) is None  # unknown model kind
    for setting, flagged, word in (("cuba-fra", True, "caught"), ("cuba-fra", False, "missed"),
                                   ("clean", True, "false alarm"), ("clean", False, "clear"), ("clean", None, None)):
        assert verdict(nc, {"setting": setting, **model_verdict(1.0, "high", flagged, True)}) == word

    class Odd:
        name, rule = "odd", ("x", "auc")

    with pytest.raises(ValueError, match="odd.rule: kind must be 'far' or 'tpr', got 'auc'"):
        verdict(Odd, {"setting": "cuba-fra", "x": 0.5})


def test_report_colours_the_detector_cells() -> None:
    from cuba.reproduce.report import _md_table_to_html

    page = _md_table_to_html("| defense | a | b | c | d |\n|---|---|---|---|---|\n"
                             "| strip | caught — AUROC 1 (1 s) | missed — AUROC 0.5 (1 s) | n/a (clean) (1 s) | 3 |")
    assert "<td class='win'>caught — AUROC 1 (1 s)</td>" in page and "<td class='lose'>missed — AUROC 0.5 (1 s)</td>" in page
    assert "<td class='na'>n/a (clean) (1 s)</td>" in page and "<td>3</td>" in page and "<td>strip</td>" in page


def test_an_imported_model_gets_its_folder_as_column_and_no_auroc_rows(tmp_path: Path) -> None:
    run = _write(tmp_path, "suspect", "digits", "neural-cleanse",
                 {"setting": "imported", "seconds": 1.0, "anomaly_index": 3.0, "flagged_classes": [7],
                  **model_verdict(3.0, "high", True, True)})
    md = defense_tables([run])
    assert md.splitlines()[0] == "| defense | suspect (imported) |"
    assert md.splitlines()[2].startswith("| neural-cleanse | flagged — ")
    assert "Model-level detectors" not in md  # nothing of known kind to rank


def test_reference_flag_decides_only_what_censored_budgets_cannot_change() -> None:
    """The inversion detectors' shared rule: flagged when score < min(references) / margin; None
    stands for a budget beyond the schedule's largest (8 here), known only to exceed it."""
    from cuba.defenses.model_level import reference_flag

    assert reference_flag(1.0, [], 2.0, 8.0) == (None, None)  # no reference: no decision
    assert reference_flag(1.0, [4.0, 6.0], 2.0, 8.0) == (True, 2.0)  # 1 < 4 / 2
    assert reference_flag(2.0, [4.0, None], 2.0, 8.0) == (False, 2.0)  # strict; the censored one is > 8 > 4
    assert reference_flag(None, [4.0], 2.0, 8.0) == (False, 2.0)  # the suspect needs > 8, the cut is 2
    assert reference_flag(None, [32.0], 2.0, 8.0) == (None, 16.0)  # needs > 8, cut 16: either side
    # every reference censored: the cut is somewhere beyond 8 / 2 = 4
    assert reference_flag(4.0, [None, None], 2.0, 8.0) == (True, None)
    assert reference_flag(5.0, [None], 2.0, 8.0) == (None, None)
    assert reference_flag(None, [None], 2.0, 8.0) == (None, None)


def test_flag_counts_keep_the_undecided_models_in_view() -> None:
    """One flag among twelve models, eleven undecided, reads 1/12 (11 undecided), never 1/1; the
    folded matrix calls it mixed (no colour of a win) and a clean column of undecided flags 'no verdict'."""
    from cuba.defenses import DEFENSES
    from cuba.defenses.model_level import flag_count
    from cuba.defenses.summary import NO_VERDICT, summary_cell

    di = DEFENSES["dispersion-inversion"]
    cuba = [_f(0.01, True, "low") | {"setting": "cuba-fra"}] + [_f(0.5, None, "low") | {"setting": "cuba-fra"}] * 11
    assert flag_count(cuba) == "1/12 (11 undecided)" and flag_count([]) == "–"
    assert flag_count(cuba[:1] * 2) == "2/2"
    assert summary_cell(di, cuba) == "mixed — caught 1/12, no verdict 11"
    assert summary_cell(di, [_f(0.5, None, "low") | {"setting": "clean"}] * 3) == NO_VERDICT  # ran, undecided: not n/a


def test_a_model_whose_backdoor_did_not_take_is_set_aside(tmp_path: Path) -> None:
    """An attack that never implanted its backdoor (test ASR under 50%: one adaptive seed on MNIST)
    leaves a model with nothing to catch: the tables leave it out, with the reason, instead of
    charging each detector with a miss; a clean model, or one without an ASR, is never left out."""
    from cuba.run_groups import UNTAKEN_ASR, untaken_backdoor

    runs = [_di_run(tmp_path, "mnist-m-cuba-fra-s0", "cuba-fra", 0.01), _di_run(tmp_path, "mnist-m-cuba-fra-s1", "cuba-fra", 0.5),
            _di_run(tmp_path, "mnist-m-clean-s0", "clean", 0.03)]
    for run, asr in zip(runs, (0.999, 0.034, None)):
        (run / "metrics.json").write_text(json.dumps({"ca": 0.98, "asr": asr}))
    assert UNTAKEN_ASR == 0.5 and untaken_backdoor(runs[0], "cuba-fra") is None
    assert untaken_backdoor(runs[1], "cuba-fra") == "its backdoor did not take (test ASR 3.4% < 50%)"
    assert untaken_backdoor(runs[1], "clean") is None and untaken_backdoor(tmp_path, "cuba-fra") is None
    md = defense_tables(runs)
    assert md.splitlines()[0] == "| defense | cuba-fra | clean |"  # two columns: s1 is not among them
    assert "left out: mnist-m-cuba-fra-s1, its backdoor did not take (test ASR 3.4% < 50%); no detector is judged on it." in md
    row = next(line for line in md.splitlines() if line.startswith("| dispersion-inversion | low |"))
    assert "(1 vs 1)" in row  # the AUROC over the two kept models only
    from cuba.config import ConfigError

    with pytest.raises(ConfigError, match="every run given is left out .mnist-m-cuba-fra-s1, its backdoor did not take"):
        defense_tables(runs[1:2])


def test_per_run_cells_say_no_verdict_only_where_there_was_something_to_judge(tmp_path: Path) -> None:
    """A rule that ran on a backdoored model and could not decide reads "no verdict — ..." (grey in
    report.html); STRIP on a clean model scores a probe patch, has nothing to catch, and gets no word."""
    from cuba.reproduce.report import _verdict_class

    runs = []
    for name, setting, extra in (("a", "cuba-fra", {"unresolved_rules": ["1pct"]}), ("b", "clean", {})):
        folder = tmp_path / name / "defenses" / "strip"
        folder.mkdir(parents=True)
        (folder / "defense.json").write_text(json.dumps({"setting": setting, "seconds": 1.0, "auroc": 0.5,
                                                         "far_at_frr_1pct": 0.9, **extra}))
        runs.append(tmp_path / name)
    row = next(line for line in defense_tables(runs).splitlines() if line.startswith("| strip |"))
    cuba_cell, clean_cell = [c.strip() for c in row.strip("|").split("|")[1:]]
    assert cuba_cell.startswith("no verdict — ") and _verdict_class(cuba_cell) == " class='na'"
    assert not clean_cell.startswith("no verdict") and _verdict_class(clean_cell) == ""
