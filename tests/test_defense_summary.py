"""The detector matrix folded over seeds (cuba.defenses.summary): grouping, the cell's verdict
counts and means, and which rows are shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuba.defenses import DEFENSES
from cuba.config import ConfigError
from cuba.defenses.summary import (MIXED, NO_VERDICT, change_cell, change_table, group_names, rule_label,
                                    heat_cell, summary_cell, summary_table, win_shares)

STRIP = DEFENSES["strip"]


def strip_fields(setting: str, far: float, auroc: float, **extra: object) -> dict:
    return {"setting": setting, "far_at_frr_1pct": far, "auroc": auroc, **extra}


def model_fields(setting: str, flagged: bool | None) -> dict:
    return {"setting": setting, "level": "model", "score": 1.0, "score_suspicious": "high", "flagged": flagged}


def test_group_names_drop_the_seed_and_the_shared_prefix() -> None:
    runs = [Path(f"/x/mnist-simplecnn-{s}") for s in ("clean-s0", "clean-s12", "cuba-fra-s1", "cuba-adaptive-fra-w5-s2")]
    assert group_names(runs) == ["clean", "clean", "cuba-fra", "cuba-adaptive-fra-w5"]
    assert group_names([Path("mnist-m-clean-s0"), Path("mnist-m-clean-s1")]) == ["clean", "clean"]
    # no prefix up to a dash in common: nothing to drop
    assert group_names([Path("clean-s0"), Path("cuba-fra-s0")]) == ["clean", "cuba-fra"]


@pytest.mark.parametrize("key, label", [
    ("far_at_frr_1pct", "FAR@FRR 1%"), ("far_at_frr_1pct_two_sided", "FAR@FRR 1% two-sided"),
    ("tpr_at_fpr_5pct", "TPR@FPR 5%"), ("score", "score")])
def test_rule_label(key: str, label: str) -> None:
    assert rule_label(key) == label


def test_unanimous_input_level_cell_counts_and_averages() -> None:
    cell = summary_cell(STRIP, [strip_fields("cuba-fra", 0.0, 1.0), strip_fields("cuba-fra", 0.04, 0.98)])
    assert cell == "caught — 2/2; AUROC 0.990; FAR@FRR 1% 0.020"


def test_mixed_cell_names_the_defenders_wins() -> None:
    # 0.05 is still caught (the bar is inclusive), 0.2 is not
    cell = summary_cell(STRIP, [strip_fields("cuba-fra", 0.05, 0.9), strip_fields("cuba-fra", 0.2, 0.5),
                                strip_fields("cuba-fra", 0.3, 0.4)])
    assert cell == f"{MIXED} — caught 1/3; AUROC 0.600; FAR@FRR 1% 0.183"


def test_model_level_cells_on_clean_and_backdoored_models() -> None:
    md = DEFENSES["mm-bd"]
    assert summary_cell(md, [model_fields("clean", False)] * 3) == "clear — 3/3"
    assert summary_cell(md, [model_fields("cuba-fra", True), model_fields("cuba-fra", False)]) == f"{MIXED} — caught 1/2"
    assert summary_cell(md, [model_fields("cuba-fra", None)]) == NO_VERDICT  # no reference decided the flag


def test_placeholders() -> None:
    assert summary_cell(STRIP, []) == "–"
    assert summary_cell(STRIP, [strip_fields("clean", 0.0, 0.5)]) == "n/a"  # nothing to catch on a clean model
    na = {"setting": "cuba-fra", "applicable": False, "reason": "needs BatchNorm"}
    assert summary_cell(DEFENSES["ibd-psc"], [na, na]) == "n/a"
    # a rule too fine for its calibration set: no verdict, the numbers still shown
    unresolved = strip_fields("cuba-fra", 0.0, 0.99, unresolved_rules=["1pct"])
    assert summary_cell(STRIP, [unresolved]) == f"{NO_VERDICT}; AUROC 0.990; FAR@FRR 1% 0.000"


def test_summary_table_puts_clean_first_and_drops_rows_of_placeholders() -> None:
    res = [(Path(f"r/mnist-m-{g}-s{i}"), {"strip": strip_fields(s, far, 0.9), "fine-pruning": {"setting": s}})
           for i, (g, s, far) in enumerate([("cuba-fra", "cuba-fra", 0.0), ("clean", "clean", 0.0),
                                            ("cuba-fra", "cuba-fra", 0.5)])]
    lines = summary_table(res, ["strip", "fine-pruning"], DEFENSES)
    assert lines[3] == "| detector | clean (1) | cuba-fra (2) |"
    assert lines[5].startswith(f"| strip | n/a | {MIXED} — caught 1/2;")
    assert len(lines) == 6  # fine-pruning repairs, it has no rule: no row
    assert summary_table(res, ["fine-pruning"], DEFENSES) == []


def test_report_colours_a_mixed_cell_amber() -> None:
    from cuba.reproduce.report import _verdict_class

    assert _verdict_class(f"{MIXED} — caught 1/3; AUROC 0.600") == " class='mixed'"
    assert _verdict_class("caught — 3/3") == " class='win'"
    assert _verdict_class("missed — 3/3") == " class='lose'"


def _groups_res() -> list:
    """Two CUBA FRA seeds (one caught by STRIP's rule, one not) and two adaptive seeds (both missed),
    with an MM-BD flag on each, plus a clean model."""
    mm = lambda s, flag: {"setting": s, "level": "model", "score": 1.0, "score_suspicious": "high", "flagged": flag}  # noqa: E731
    runs = [("cuba-fra-s0", "cuba-fra", 0.0, 1.0, False), ("cuba-fra-s1", "cuba-fra", 0.5, 0.9, True),
            ("cuba-adaptive-fra-w1-s0", "cuba-adaptive-fra-w1", 0.9, 0.4, True),
            ("cuba-adaptive-fra-w1-s1", "cuba-adaptive-fra-w1", 1.0, 0.3, True), ("clean-s0", "clean", 0.0, 0.5, False)]
    return [(Path(f"r/mnist-m-{n}"), {"strip": strip_fields(s, far, auroc), "mm-bd": mm(s, flag),
                                       "fine-pruning": {"setting": s}}) for n, s, far, auroc, flag in runs]


def test_change_cell_counts_and_means_against_the_baseline() -> None:
    base = [strip_fields("cuba-fra", 0.0, 1.0), strip_fields("cuba-fra", 0.5, 0.9)]
    other = [strip_fields("cuba-adaptive-fra-w1", 0.9, 0.4), strip_fields("cuba-adaptive-fra-w1", 1.0, 0.3)]
    # by hand: AUROC (1.0 + 0.9) / 2 = 0.95 -> (0.4 + 0.3) / 2 = 0.35, change -0.600; FAR 0.25 -> 0.95
    assert change_cell(STRIP, base, other) == "caught 1/2 → 0/2; AUROC 0.950 → 0.350 (-0.600); FAR@FRR 1% 0.250 → 0.950"
    assert change_cell(STRIP, base, []) == "–"
    # a rule too fine for its calibration set judges nothing: "no verdict", its numbers still shown
    unresolved = [strip_fields("cuba-fra", 0.0, 1.0, unresolved_rules=["1pct"])]
    assert change_cell(STRIP, unresolved, other).startswith("no verdict → caught 0/2; AUROC 1.000 → 0.350")
    assert change_cell(STRIP, other, unresolved).startswith("caught 0/2 → no verdict; AUROC 0.350 → 1.000")
    # a detector that applies to neither group (IBD-PSC without BatchNorm) says so once
    na = {"setting": "cuba-fra", "applicable": False, "reason": "no BatchNorm"}
    assert change_cell(STRIP, [na], [{**na, "setting": "cuba-adaptive-fra-w1"}]) == "n/a"
    assert change_cell(STRIP, [na], other).startswith("n/a → caught 0/2")


def test_change_table_rows_columns_and_errors() -> None:
    res = _groups_res()
    lines = change_table(res, ["strip", "mm-bd", "fine-pruning"], DEFENSES, "cuba-fra", "cuba-adaptive")
    assert lines[3] == "| detector | cuba-adaptive-fra-w1 |"
    assert lines[5] == "| the attack itself: CA / ASR / DS %, effective classes | – → – |"  # no metrics.json here
    assert lines[6].startswith("| strip | caught 1/2 → 0/2; AUROC 0.950 → 0.350")
    assert lines[7] == "| mm-bd | caught 1/2 → 2/2 |"  # model-level: the flags its rule raised
    assert len(lines) == 8  # fine-pruning has no rule and no model-level flag: no row
    # without a prefix every backdoored group except the baseline is a column; clean never is
    assert change_table(res, ["strip"], DEFENSES, "cuba-fra")[3] == "| detector | cuba-adaptive-fra-w1 |"
    with pytest.raises(ConfigError, match=r"no group 'cuba-nra2'; the groups are cuba-fra, cuba-adaptive-fra-w1, clean"):
        change_table(res, ["strip"], DEFENSES, "cuba-nra2")
    with pytest.raises(ConfigError, match=r"no group matches 'ubw'"):
        change_table(res, ["strip"], DEFENSES, "cuba-fra", "ubw")
    # a grid still running: a line, not an error
    assert change_table(res, ["strip"], DEFENSES, "cuba-nra2", strict=False)[-1].startswith("Against cuba-nra2: not yet")


def test_summary_table_keeps_a_detector_that_ran_without_deciding() -> None:
    """Dispersion inversion undecided on every model (censored budgets) is a row of "no verdict", not
    dropped: the reader must see that it ran and could not decide."""
    res = [(Path(f"r/mnist-m-{g}-s0"), {"dispersion-inversion": model_fields(s, None)})
           for g, s in (("clean", "clean"), ("cuba-fra", "cuba-fra"))]
    lines = summary_table(res, ["dispersion-inversion"], DEFENSES)
    assert lines[-1] == f"| dispersion-inversion | {NO_VERDICT} | {NO_VERDICT} |"


def test_summary_table_keeps_a_detector_that_applied_to_no_model() -> None:
    """IBD-PSC on a model without BatchNorm: a row of n/a (the matrix has every detector on every
    model), where a detector that never ran on the runs has no row."""
    na = lambda s: {"setting": s, "applicable": False, "reason": "no BatchNorm layer"}  # noqa: E731
    res = [(Path(f"r/mnist-m-{g}-s0"), {"ibd-psc": na(g)}) for g in ("clean", "cuba-fra")]
    assert summary_table(res, ["ibd-psc"], DEFENSES)[-1] == "| ibd-psc | n/a | n/a |"
    assert summary_table(res, ["strip"], DEFENSES) == []
    rows, _, share, text = win_shares(res, ["ibd-psc"], DEFENSES)
    assert rows == ["ibd-psc"] and share == [[None, None]] and text == [["n/a", "n/a"]]


def test_win_shares_of_the_folded_matrix() -> None:
    rows, cols, share, text = win_shares(_groups_res(), ["strip", "mm-bd", "fine-pruning"], DEFENSES)
    assert rows == ["strip", "mm-bd"]  # fine-pruning has no rule: no row
    assert cols == ["clean", "cuba-fra", "cuba-adaptive-fra-w1"]
    # STRIP: nothing to catch on the clean model; caught 1 of 2 FRA seeds (FAR 0.0 and 0.5), mean AUROC
    # (1.0 + 0.9) / 2; missed both adaptive seeds, mean AUROC (0.4 + 0.3) / 2
    assert share[0] == [None, 0.5, 0.0]
    assert text[0] == ["n/a", "won 1/2\nAUROC 0.95", "won 0/2\nAUROC 0.35"]
    # MM-BD: cleared the clean model, flagged 1 of 2 FRA and 2 of 2 adaptive models
    assert share[1] == [1.0, 0.5, 1.0] and text[1] == ["won 1/1", "won 1/2", "won 2/2"]


def test_heat_cell_undecided_and_imported_models() -> None:
    md = DEFENSES["mm-bd"]
    assert heat_cell(md, [model_fields("cuba-fra", None)]) == (None, NO_VERDICT)
    # 1 missed, 2 undecided: the share is over the decided model (a loss), the text counts the others
    # -- the table calls this cell mixed, the figure hatches it
    assert heat_cell(md, [model_fields("cuba-fra", False)] + [model_fields("cuba-fra", None)] * 2) == (
        0.0, f"won 0/3\n{NO_VERDICT} 2")
    assert heat_cell(md, [model_fields("cuba-fra", True), model_fields("cuba-fra", None)])[0] == 1.0
    # an imported model: nobody knows the truth, so no colour of a win or a loss
    assert heat_cell(md, [model_fields("imported", True), model_fields("imported", False)]) == (None, "flagged 1/2")
    assert heat_cell(STRIP, []) == (None, "–")


def test_matrix_figure_hatches_the_undecided(tmp_path: Path) -> None:
    from cuba.defenses.plots import plot_detector_matrix

    path = plot_detector_matrix(["mm-bd"], ["clean", "cuba-fra"], [[1.0, 0.0]], [["won 1/1", f"won 0/3\n{NO_VERDICT} 2"]],
                                tmp_path / "m.png")
    assert path.stat().st_size > 0


def test_cells_say_how_many_models_a_detector_did_not_apply_to() -> None:
    md = DEFENSES["mm-bd"]
    na = {"setting": "cuba-fra", "level": "model", "applicable": False, "reason": "a class statistic <= 0"}
    fields = [model_fields("cuba-fra", True), model_fields("cuba-fra", True), na]
    # caught 2 of 3 is not "every model": the third was n/a, and the cell says so
    assert summary_cell(md, fields) == "caught — 2/3, n/a 1"
    assert summary_cell(md, [model_fields("cuba-fra", True), model_fields("cuba-fra", None), na]) == (
        f"{MIXED} — caught 1/3, {NO_VERDICT} 1, n/a 1")
    # the heatmap: the colour is over the decided models, the text counts the rest
    assert heat_cell(md, fields) == (1.0, "won 2/3\nn/a 1")


def test_change_table_baseline_must_name_one_group() -> None:
    two_models = [(Path(f"r/mnist-{m}-{g}-s{s}"), {"strip": strip_fields(g, 0.0, 1.0)})
                  for m in ("simplecnn", "resnet18") for g in ("clean", "cuba-fra", "cuba-adaptive-fra-w1") for s in (0, 1)]
    with pytest.raises(ConfigError, match=r"--baseline 'cuba-fra' matches 2 groups \(mnist-simplecnn-cuba-fra, "
                                          r"mnist-resnet18-cuba-fra\); name one of them whole"):
        change_table(two_models, ["strip"], DEFENSES, "cuba-fra")
    lines = change_table(two_models, ["strip"], DEFENSES, "simplecnn-cuba-fra")
    # neither model's clean group is a column; the baseline holds the two simplecnn seeds only
    assert lines[3] == "| detector | simplecnn-cuba-adaptive-fra-w1 | resnet18-cuba-fra | resnet18-cuba-adaptive-fra-w1 |"
    assert lines[6].startswith("| strip | caught 2/2 → 2/2")
    res = _groups_res() + [(Path("r/mnist-m-push-away-fra-s0"), {"strip": strip_fields("push-away-fra", 0.0, 1.0)})]
    with pytest.raises(ConfigError, match=r"--baseline 'fra' matches 2 groups \(mnist-m-cuba-fra, mnist-m-push-away-fra\)"):
        change_table(res, ["strip"], DEFENSES, "fra")


def test_model_level_table_never_reads_a_folder_name_as_a_setting(tmp_path: Path) -> None:
    from cuba.defenses.model_level import model_level_table

    # hand-made files without "setting": a clean folder name must not count as a backdoor
    runs = [(tmp_path / f"mnist-m-{g}-s{s}", {"mm-bd": {k: v for k, v in model_fields(g, g != "clean").items()
                                                         if k != "setting"}})
            for g in ("clean", "cuba-fra") for s in (0, 1)]
    assert model_level_table(runs) == []  # no known setting: nothing to rank


def test_model_level_table_says_when_runs_of_a_detector_ran_with_other_parameters(tmp_path: Path) -> None:
    """An AUROC ranks scores against each other: runs scored with another setting (NC's early stop) get
    a note under the table; a different seed or reference budget does not."""
    from cuba.defenses.model_level import model_level_table

    def nc(setting: str, seed: int, early_stop: int | None) -> dict:
        return {**model_fields(setting, setting != "clean"), "params": {"seed": seed, "early_stop": early_stop}}

    same = [(tmp_path / f"mnist-m-{g}-s{s}", {"neural-cleanse": nc(g, s, None)}) for g in ("clean", "cuba-fra") for s in (0, 1)]
    lines = model_level_table(same)
    assert lines[5].startswith("| neural-cleanse | high | 0.500 (2 vs 2)") and not any("parameters" in x for x in lines)
    mixed = same + [(tmp_path / "mnist-m-cuba-fra-s2", {"neural-cleanse": nc("cuba-fra", 2, 10)})]
    assert model_level_table(mixed)[-1] == ("neural-cleanse: the scored runs ran it with different parameters (early_stop); "
                                            "its AUROC pools scores that are not on one scale")
    # "auto" precision is one parameter but two settings: what it resolved to where it ran counts too
    ran = [(r, {"neural-cleanse": {**d["neural-cleanse"], "resolved": {"precision": p}}})
           for (r, d), p in zip(same, ("bf16", "fp32", "bf16", "bf16"))]
    assert "(precision as run)" in model_level_table(ran)[-1]
    assert not any("parameters" in x for x in model_level_table(ran[:1] + ran[2:]))


def test_attack_numbers_are_the_means_of_the_runs_metrics(tmp_path: Path) -> None:
    """The adaptive trade's other side: CA / ASR / DS (%) and effective classes, means by hand."""
    import json

    from cuba.defenses.summary import attack_numbers

    runs = []
    for i, (ca, asr, ds, k) in enumerate(((0.98, 1.0, 0.93, 7.5), (0.96, 0.8, 0.7, 1.0))):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "metrics.json").write_text(json.dumps({"ca": ca, "asr": asr, "ds": ds, "effective_classes": k}))
        runs.append(tmp_path / f"s{i}")
    assert attack_numbers(runs) == "97.0 / 90.0 / 81.5, 4.25"  # (98 + 96) / 2, (100 + 80) / 2, (93 + 70) / 2, 8.5 / 2
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "metrics.json").write_text(json.dumps({"ca": 0.99, "asr": None, "ds": None}))
    assert attack_numbers([tmp_path / "clean"]) == "99.0 / – / –, –"
    assert attack_numbers([tmp_path / "nothing"]) == "–"
