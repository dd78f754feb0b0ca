"""The defenses end to end: the registry, then each defense on a tiny digits BadNets run (the positive
control), the ``cuba defend`` / ``cuba defense-table`` commands and the tables.

The hand-computed pieces live beside this file: the thresholds, error rates and headlines in
test_defenses_rules.py, the scores and repairs of single defenses in test_defenses_units.py.
``_Const`` and the module-scoped ``badnets_run`` fixture stay here: the detector test modules
import them from this one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cuba.cli import main
from cuba.config import ConfigError
from cuba.defenses import DEFENSES, load_attack_run, run_defense
from cuba.defenses.fine_pruning import FinePruning
from cuba.defenses.neural_cleanse import NeuralCleanse, anomaly_indices
from cuba.defenses.scale_up import ScaleUp
from cuba.defenses.strip import Strip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_has_the_paper_defenses_then_the_newer_detectors() -> None:
    assert list(DEFENSES) == ["strip", "neural-cleanse", "sentinet", "fine-pruning", "nad", "scale-up", "entropy", "mm-bd",
                              "cognitive-distillation", "trigger-inversion", "ibd-psc", "dispersion-inversion", "near-tie"]


class _Const(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_mitigation_rows_report_asr_c(badnets_run: Path) -> None:
    """A repaired model that ignores the trigger still 'succeeds' under FRA on every clean mistake:
    ASR = its error rate on attacked images, while ASR-C (over images it gets right) is 0."""
    import dataclasses

    run = load_attack_run(badnets_run, device="cpu")
    k = run.num_classes
    fra = dataclasses.replace(run, targets=~torch.eye(k, dtype=torch.bool), _bd_cache=None)
    keep = 1.0 - run.trigger.mask  # blind to the patch ...
    keep[..., :9, :] = 0.0  # ... and to the top half of the digit, so it makes clean mistakes

    class Blind(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return run.classifier(x * keep)

    m = fra.repair_metrics(Blind())
    x, y = fra.attacked_test()
    err = float((Blind()(x).argmax(1) != y).float().mean())
    assert 0.05 < err < 0.95 and m["asr"] == pytest.approx(err) and m["asr_c"] == 0.0
    assert m["ca"] == pytest.approx(1 - err)  # FRA attacks every class: the attacked images are the test set
    assert fra.ca_asr(Blind()) == (m["ca"], m["asr"])


@pytest.fixture(scope="module")
def badnets_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits BadNets model (target 0) that has learned its patch: the positive control."""
    from cuba.config import make_config
    from cuba.pipeline import run_training

    out = tmp_path_factory.mktemp("bn") / "run"
    cfg = make_config({"dataset": "digits", "attack": "badnets", "epochs": 8, "batch_size": 64, "lr": 0.05,
                       "progress": False, "device": "cpu", "precision": "fp32", "out": str(out)})
    _, m = run_training(cfg)
    assert m["asr"] > 0.9
    return out


def test_neural_cleanse_flags_the_badnets_target(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    kw = dict(epochs=25, batches_per_epoch=5, batch_size=16, n_pool=300, early_stop=10)  # the budget option: fast here
    run_defense("neural-cleanse", run, tmp_path, **kw)
    f = json.loads((tmp_path / "neural-cleanse" / "defense.json").read_text())
    assert f["flagged_classes"] == [0] and f["anomaly_index"] > 2, f["l1_norms"]
    assert len(f["l1_norms"]) == 10 and (tmp_path / "neural-cleanse" / "neural_cleanse.png").is_file()
    from cuba.engine import make_engine  # what "auto" became here, written beside the parameters

    assert f["resolved"] == {"precision": "bf16" if make_engine("cpu", "auto").bf16 else "fp32", "batched": False}
    with pytest.raises(ConfigError, match=r"^precision: must be auto or fp32 or bf16, got 'fp16'"):
        NeuralCleanse(precision="fp16")


@pytest.mark.slow  # two more full reversals (about 17 s of 2 cores): the slow tier, not the README's
def test_neural_cleanse_batched_equals_one_by_one_in_fp32(badnets_run: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    kw = dict(epochs=25, batches_per_epoch=5, batch_size=16, n_pool=300, early_stop=10)
    # in fp32, batched and one-by-one follow the same per-class trajectories (same mini-batches,
    # element-wise Adam, per-class early stop): equal up to summation order
    one = NeuralCleanse(batched=False, precision="fp32", **kw).reverse(run)
    together = NeuralCleanse(batched=True, precision="fp32", **kw).reverse(run)
    assert np.allclose(one["norm"].numpy(), together["norm"].numpy(), rtol=1e-3, atol=1e-3)
    assert anomaly_indices(one["norm"])[2] == [0]  # the default (bf16 where native) gives the fp32 verdict


def test_neural_cleanse_batches_by_device(badnets_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cuba.defenses import neural_cleanse

    calls: list[list[int]] = []
    real = neural_cleanse.reverse_engineer
    monkeypatch.setattr(neural_cleanse, "reverse_engineer", lambda run, classes, *a, **k: (calls.append(classes), real(run, classes, *a, **k))[1])
    run = load_attack_run(badnets_run, device="cpu")
    kw = dict(epochs=1, batches_per_epoch=1, batch_size=4, n_pool=20)
    assert len(NeuralCleanse(**kw).reverse(run)["norm"]) == 10
    assert calls == [[c] for c in range(10)]  # auto on a CPU: one class at a time (faster there)
    calls.clear()
    NeuralCleanse(batched=True, **kw).reverse(run)
    assert calls == [list(range(10))]


def test_input_detectors_catch_the_badnets_positive_control(badnets_run: Path, tmp_path: Path) -> None:
    """BadNets on digits is what every input detector should catch. Measured here (seed 0, 1 thread):
    STRIP AUROC 1.000 with FAR@FRR1% 0.04 (test FRR 0.00), SentiNet AUROC 0.836, SCALE-UP AUROC 0.818;
    the bounds leave a margin (SentiNet's AUROC on 40 inputs moves between 0.70 and 0.98 with the seed)."""
    run = load_attack_run(badnets_run, device="cpu")
    s = run_defense("strip", run, tmp_path, n_overlay=20, n_eval=100, n_calib=100).fields
    assert s["applicable"] and s["calibration"].startswith("validation split") and s["n_calib_used"] == 100
    assert s["auroc"] > 0.95 and s["far_at_frr_1pct"] < 0.2 and s["frr_at_frr_1pct"] < 0.1
    assert s["far_at_frr_1pct_two_sided"] < 0.3 and s["far_at_frr_5pct_two_sided"] < 0.2
    assert {"auroc_high_entropy", "frr_measured"}.isdisjoint(s) and len(s["entropy_clean"]) == 100
    lo, hi = s["thresholds"]["1pct_two_sided"]
    assert s["frr_at_frr_1pct_two_sided"] == pytest.approx(np.mean([(e < lo) or (e > hi) for e in s["entropy_clean"]]), abs=0.011)
    assert Strip.headline(s).startswith(f"AUROC {s['auroc']:.3f}, FAR@FRR1% ") and "two-sided" in Strip.headline(s)

    t = run_defense("sentinet", run, tmp_path, n_eval=40, n_calib=40, n_holdout=20).fields
    assert t["applicable"] and t["auroc"] > 0.65 and t["calibration"].startswith("validation split")
    assert len(t["points_backdoor"]) == 40 and len(t["points_calib"]) == 40 and t["flat_cam_share"] < 0.5
    assert t["test_fpr_at_fpr_5pct"] == pytest.approx(np.mean(np.array(t["points_clean"])[:, 1] - np.polyval(
        t["boundary"], np.array(t["points_clean"])[:, 0]) > t["threshold_at_fpr_5pct"]), abs=0.03)
    assert {p.name for p in (tmp_path / "sentinet").iterdir()} == {"defense.json", "sentinet_scatter.png", "sentinet_gradcam.png"}

    f = run_defense("scale-up", run, tmp_path, n_eval=100).fields
    assert f["applicable"] and f["auroc"] > 0.7 and f["calibration"].startswith("validation split")
    assert len(f["spc_clean"]) == len(f["spc_backdoor"]) == 100 and "auroc_low_spc" not in f
    assert set(f["spc_backdoor"]) <= {0.0, 0.2, 0.4, 0.6, 0.8, 1.0}
    assert f["flagged_backdoor"] == pytest.approx(float(np.mean(np.array(f["spc_backdoor"]) > 0.5)))
    # the 5%-FPR rule is the validation quantile: it flags at most 5% of the validation inputs
    assert np.mean(np.array(f["spc_val"]) > f["threshold_at_fpr_5pct"]) <= 0.05
    assert (tmp_path / "scale-up" / "scale_up_spc.png").is_file()
    z = run_defense("scale-up", run, tmp_path / "z", n_eval=100, n_ref=200, standardize=True).fields
    assert z["spc_backdoor"] == f["spc_backdoor"] and z["applicable"]  # raw SPC kept; the score is the z-score
    # the per-class reference images are not calibration images: 142 validation images split 200 : 1000
    assert (f["n_calib_used"], z["n_calib_used"]) == (142, 142 - round(142 * 200 / 1200))
    assert ScaleUp.headline(f).startswith(f"AUROC {f['auroc']:.3f}, TPR@FPR5% ")


def test_detectors_say_when_they_do_not_apply(badnets_run: Path, tmp_path: Path) -> None:
    """A constant classifier: every STRIP entropy is log2(K) (std 0), every SPC is 1, and it has no
    feature stages for SentiNet and Fine-pruning. Each says n/a with its reason, never a number."""
    import dataclasses

    run = dataclasses.replace(load_attack_run(badnets_run, device="cpu"), classifier=_Const([0.0] * 10), _bd_cache=None)
    s = run_defense("strip", run, tmp_path, n_overlay=5, n_eval=20, n_calib=20).fields
    assert s["applicable"] is False and "bits (< 0.001)" in s["reason"] and Strip.headline(s) == f"n/a ({s['reason']})"
    assert "far_at_frr_1pct" in s  # the raw numbers stay for inspection
    u = run_defense("scale-up", run, tmp_path, n_eval=20, n_calib=20).fields
    assert u["applicable"] is False and "same score (1)" in u["reason"] and u["auroc"] == 0.5
    t = run_defense("sentinet", run, tmp_path, n_eval=4, n_calib=4, n_holdout=4).fields
    assert t["applicable"] is False and "no feature stages" in t["reason"]
    fp = run_defense("fine-pruning", run, tmp_path).fields
    assert fp["applicable"] is False and fp["rows"] == [] and FinePruning.headline(fp).startswith("n/a (")


def test_fine_pruning_and_nad_rows(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    fp = run_defense("fine-pruning", run, tmp_path, finetune_epochs=1, ratios=[0.0, 0.5]).fields
    assert [r["prune_ratio"] for r in fp["rows"]] == [0.0, 0.5] and fp["asr_headline_key"] == "asr"  # BadNets: targeted
    m0 = run.repair_metrics()
    assert {k: fp["rows"][0][k] for k in ("ca", "asr", "asr_c")} == pytest.approx(m0)
    assert fp["rows"][-1]["pruned_channels"] == int(0.5 * fp["channels"])
    assert {"ca_ft", "asr_ft", "asr_c_ft"} <= set(fp["rows"][-1])
    nad = run_defense("nad", run, tmp_path, epochs=4, teacher_epochs=2, clean_fraction=0.2).fields
    assert [r["epoch"] for r in nad["rows"]] == [0, 2, 4] and nad["stages"] == 2
    assert set(nad["teacher"]) == {"ca", "asr", "asr_c"} and all("asr_c" in r for r in nad["rows"])


def test_defend_cli_errors(badnets_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["defend", "spectral", str(badnets_run)]) == 2
    assert "defense: must be one of" in capsys.readouterr().err
    assert main(["defend", "strip", str(tmp_path)]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err
    assert main(["defend", "strip", str(badnets_run), "--set", "colour=1"]) == 2
    assert "--set: strip has no parameter colour" in capsys.readouterr().err
    # a local variable of Strip.__init__ is not a parameter (co_varnames listed it: failed on the old check)
    assert main(["defend", "strip", str(badnets_run), "--set", "v=1"]) == 2
    assert "--set: strip has no parameter v" in capsys.readouterr().err


def test_clean_model_gets_a_probe_patch(tmp_path: Path) -> None:
    from cuba.config import make_config
    from cuba.pipeline import run_training

    cfg = make_config({"dataset": "digits", "attack": "none", "epochs": 2, "progress": False, "device": "cpu",
                       "precision": "fp32", "out": str(tmp_path / "clean")})
    run_training(cfg)
    run = load_attack_run(tmp_path / "clean", device="cpu")
    assert run.trigger is None and run.ca_asr()[1] is None
    f = run_defense("strip", run, tmp_path, n_overlay=10, n_eval=50, n_calib=50).fields
    assert f["trigger"].startswith("probe patch")


def test_defend_cli_then_defense_table(badnets_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["defend", "fine-pruning", str(badnets_run), "--set", "ratios=[0.0, 0.5]"]) == 0
    assert "fine-pruning    prune_ratio 0: " in capsys.readouterr().out
    f = json.loads((badnets_run / "defenses" / "fine-pruning" / "defense.json").read_text())
    assert f["setting"] == "badnets-t0" and [r["prune_ratio"] for r in f["rows"]] == [0.0, 0.5] and f["seconds"] >= 0
    assert main(["defense-table", str(badnets_run), "--names", "BadNets", "--out", str(tmp_path / "t.md")]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "| fine-pruning | prune_ratio 0: " in md and "| 0.5 | " in md
    assert "| strip |" not in md  # a defense that ran on none of the runs gets no row of dashes
    assert "| prune_ratio | BadNets (CA / ASR) |" in md  # a targeted control: plain ASR, and the title says so
    assert main(["defense-table", str(badnets_run), "--plot", str(tmp_path / "m.png")]) == 0
    assert "--plot: no detector's rule judged these runs; no figure written" in capsys.readouterr().out  # repairs only
    assert not (tmp_path / "m.png").exists()
    assert main(["defense-table", str(badnets_run), "--plot", str(tmp_path / "m.txt")]) == 2  # one line, no traceback
    assert "--plot " in capsys.readouterr().err
    assert main(["defense-table", str(tmp_path)]) == 2
    assert "has no defenses/<defense>/defense.json" in capsys.readouterr().err
    assert main(["defense-table", str(badnets_run), "--against", "cuba"]) == 2
    assert "--against: needs --baseline" in capsys.readouterr().err
    assert main(["defense-table", str(badnets_run), "--baseline", "cuba-fra"]) == 2  # a typo is an error, naming the groups
    assert "defense-table: no group 'cuba-fra'; the groups are " in capsys.readouterr().err


def test_defense_table_headline_asr_and_not_applicable(tmp_path: Path) -> None:
    """defense-table: untargeted runs show CA / ASR-C and say so; a defense.json from before ASR-C
    falls back to ASR marked †; a non-applicable detector reads n/a (reason); old STRIP / SCALE-UP
    files (with the removed tail fields, without the new ones) still tabulate."""
    from cuba.defenses.table import FALLBACK_NOTE, defense_tables

    def put(run: str, name: str, f: dict) -> None:
        (tmp_path / run / "defenses" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / run / "defenses" / name / "defense.json").write_text(json.dumps({"seconds": 1.0, **f}))

    rows = [{"prune_ratio": 0.0, "ca": 0.98, "asr": 0.99, "asr_c": 0.99}, {"prune_ratio": 0.9, "ca": 0.6, "asr": 0.41, "asr_c": 0.02}]
    put("new", "fine-pruning", {"setting": "cuba-fra", "asr_headline_key": "asr_c", "rows": rows, "num_classes": 10})
    put("new", "strip", {"setting": "cuba-fra", "applicable": False, "reason": "calibration collapsed", "auroc": 0.5,
                         "far_at_frr_1pct": 1.0})
    put("old", "fine-pruning", {"setting": "cuba-fra", "rows": [{k: v for k, v in r.items() if k != "asr_c"} for r in rows]})
    put("old", "strip", {"setting": "cuba-fra", "auroc": 0.1, "auroc_high_entropy": 0.9, "far_at_frr_1pct": 0.98,
                         "frr_measured": 0.01})
    put("old", "scale-up", {"setting": "cuba-fra", "auroc": 0.4, "tpr_at_fpr_5pct": 0.01, "auroc_low_spc": 0.6})
    put("bn", "fine-pruning", {"setting": "badnets-t0", "asr_headline_key": "asr", "rows": rows})
    md = defense_tables([tmp_path / "new", tmp_path / "old", tmp_path / "bn"], ["new", "old", "bn"])
    # a backdoored run: each detector's own rule judged (cuba.defenses.verdict); n/a has no verdict
    assert "| strip | n/a (calibration collapsed) (1 s) | missed — AUROC 0.100, FAR@FRR1% 0.980 (1 s) | – |" in md
    assert "| scale-up | – | missed — AUROC 0.400, TPR@FPR5% 0.010 (1 s) | – |" in md
    assert "| fine-pruning | prune_ratio 0: 98.0/99.0 → 0.9: 60.0/2.0 (CA/ASR-C) (1 s) | " in md
    assert "→ 0.9: 60.0/41.0 (CA/ASR (ASR-C not recorded)) (1 s) | prune_ratio 0: 98.0/99.0 → 0.9: 60.0/41.0 (CA/ASR) (1 s) |" in md
    assert "| prune_ratio | new (CA / ASR-C) | old (CA / ASR†) | bn (CA / ASR) |" in md
    assert "| 0.9 | 60.0 / 2.0 | 60.0 / 41.0 | 60.0 / 41.0 |" in md and FALLBACK_NOTE in md
    # the removal curves' note, then the cost of each defense over the runs
    assert md.index(FALLBACK_NOTE) < md.index("Wall seconds per defense") and md.endswith("| scale-up | 1 | 1 | 1 | 1 |")
