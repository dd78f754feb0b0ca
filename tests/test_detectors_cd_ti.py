"""Cognitive Distillation and untargeted trigger inversion: hand-computed pieces, parameter checks,
the not-applicable paths, and one end-to-end run of each on the tiny digits BadNets run of
test_defenses (the positive control of the other detectors)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cuba.config import ConfigError
from cuba.defenses import DEFENSES, load_attack_run, run_defense
from cuba.defenses.cognitive_distillation import (CognitiveDistillation, cd_loss, cd_summary, distil_masks, mask_l1,
                                                  one_sided_lower, total_variation)
from cuba.defenses.trigger_inversion import (TriggerInversion, _split, budget_search, decide, flip_rate,
                                             smallest_budget_index, universal_perturbation)

from test_defenses import _Const, badnets_run  # noqa: F401  (badnets_run: its module-scoped fixture, trained once here)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_both_detectors_are_registered_after_mm_bd() -> None:
    names = list(DEFENSES)
    assert DEFENSES["cognitive-distillation"] is CognitiveDistillation and DEFENSES["trigger-inversion"] is TriggerInversion
    assert names.index("mm-bd") < names.index("cognitive-distillation") < names.index("trigger-inversion")


# ---- Cognitive Distillation: the pieces ----

def test_mask_l1_and_total_variation_by_hand() -> None:
    m = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # (1, 1, 2, 2)
    # vertical differences (0 - 1)^2 + 0, horizontal (0 - 1)^2 + 0: 2 over C * H * W = 4
    assert mask_l1(m).tolist() == [1.0] and total_variation(m).tolist() == [0.5]
    flat = torch.full((2, 1, 3, 3), 0.5)
    assert mask_l1(flat).tolist() == [4.5, 4.5] and total_variation(flat).tolist() == [0.0, 0.0]
    ramp = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)  # two horizontal steps of 0.5: 2 * 0.25 / 3
    assert total_variation(ramp).item() == pytest.approx(0.5 / 3)


class _SumLogit(nn.Module):
    """Logits (sum of the pixels, 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_cd_loss_by_hand() -> None:
    x = torch.ones(1, 1, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    delta = torch.tensor([[0.5]])
    # x_cp = (1, .5, .5, .5): logit 0 drops from 4 to 2.5, logit 1 stays: mean |change| over K = 2 is 0.75
    ref = _SumLogit()(x)
    assert cd_loss(_SumLogit(), x, ref, m, delta, 0.0, 0.0).item() == pytest.approx(0.75)
    # plus alpha * ||m||_1 (1) and beta * TV (0.5)
    assert cd_loss(_SumLogit(), x, ref, m, delta, 0.1, 2.0).item() == pytest.approx(0.75 + 0.1 + 1.0)
    # a model that ignores its input: only the two penalties remain
    assert cd_loss(_Const([1.0, 2.0]), x, torch.tensor([[1.0, 2.0]]), m, delta, 0.1, 2.0).item() == pytest.approx(1.1)


class _OnePixel(nn.Module):
    """Logits (10 * pixel (0, 0), 0): the output depends on the top-left pixel only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 10 * x[:, 0, 0, 0]
        return torch.stack([v, torch.zeros_like(v)], 1)


def test_distilled_mask_keeps_exactly_what_the_model_reads() -> None:
    """Where the output depends on one pixel, CD keeps that pixel and drops the rest; where it
    depends on nothing, every mask shrinks to the same near-zero value."""
    x = torch.full((3, 1, 4, 4), 0.7)
    m = distil_masks(_OnePixel(), x, steps=60, beta=0.0)
    assert m.shape == (3, 1, 4, 4) and (m[:, 0, 0, 0] > 0.95).all()
    rest = m.flatten(1)[:, 1:]
    assert (rest < 0.01).all()
    c = distil_masks(_Const([1.0, 2.0]), x, steps=60)
    assert (mask_l1(c) < 0.1).all() and torch.equal(c, c[:1].expand_as(c))


def test_distilled_masks_do_not_depend_on_batching_and_follow_the_seed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).requires_grad_(False)
    x = torch.rand(5, 1, 6, 6)
    one = distil_masks(model, x, steps=15, seed=3, batch_size=1)
    together = distil_masks(model, x, steps=15, seed=3, batch_size=8)
    # equal up to float rounding, which Adam with betas (0.1, 0.1) amplifies (measured: <= 3e-5 after 15 steps)
    assert torch.allclose(one, together, atol=1e-3)
    assert not torch.allclose(one, distil_masks(model, x, steps=15, seed=4, batch_size=8), atol=1e-2)  # measured 0.075


def test_cd_rules_on_synthetic_norms() -> None:
    """Validation norms 0..99. One-sided (flag s < lower): the 1% / 5% quantiles taken low, 0 and 4;
    two-sided: (0, 99) at 1% and (2, 97) at 5% (the frr/2 quantiles, outward)."""
    s_val = np.arange(100.0)
    assert (one_sided_lower(s_val, 0.01), one_sided_lower(s_val, 0.05)) == (0.0, 4.0)
    assert np.mean(s_val < one_sided_lower(s_val, 0.05)) <= 0.05
    s_clean, s_bd = np.array([50.0, 3.0, 98.0, 1.5]), np.array([0.5, 3.5, 10.0, 120.0])
    f = cd_summary(s_val, s_clean, s_bd)
    assert f["thresholds"] == {"1pct": [0.0, None], "1pct_two_sided": [0.0, 99.0],
                               "5pct": [4.0, None], "5pct_two_sided": [2.0, 97.0]}
    assert (f["far_at_frr_1pct"], f["frr_at_frr_1pct"]) == (1.0, 0.0)  # nothing lies below 0
    assert (f["far_at_frr_5pct"], f["frr_at_frr_5pct"]) == (0.5, 0.5)  # bd 0.5, 3.5 and clean 3, 1.5 below 4
    assert (f["far_at_frr_5pct_two_sided"], f["frr_at_frr_5pct_two_sided"]) == (0.5, 0.5)  # bd 0.5, 120; clean 98, 1.5
    assert (f["far_at_frr_1pct_two_sided"], f["frr_at_frr_1pct_two_sided"]) == (0.75, 0.0)  # only 120 beyond 99
    # AUROC of -s: backdoor below clean in 4 + 2 + 2 + 0 of the 16 pairs
    assert f["auroc"] == pytest.approx(0.5)
    # rank distances: clean .005 .465 .485 .48, backdoor .49 .46 .395 .5 -> (4 + 1 + 1 + 4) / 16
    assert f["auroc_two_sided"] == pytest.approx(10 / 16)


# ---- trigger inversion: the pieces ----

class _Brightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5: logits 10 (0.5 - mean, mean - 0.5), so an input of
    brightness 0.5 - d needs a universal perturbation of L-inf size d (+d on every pixel) to flip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return 10 * torch.stack([0.5 - m, m - 0.5], 1)


def _at_distances(d255: list[float]) -> torch.Tensor:
    return (0.5 - torch.tensor(d255) / 255).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


HOLDOUT_D = [0.5, 1.5, 3, 3, 5, 6, 7, 12, 20, 40]  # distances to the boundary, in 1/255
BUDGETS = (1, 2, 4, 8, 16, 32, 64)


def test_budget_search_finds_the_known_flip_budgets() -> None:
    """Held-out flip rate at budget e = share of distances below e: .1 .2 .4 .7 .8 .9 1.0; the fit
    images lie at other distances, so the held-out rates are not the fitted ones."""
    model, x_hold = _Brightness(), _at_distances(HOLDOUT_D)
    x_fit = _at_distances([2.5, 10, 30, 50, 90])
    y_fit, y_hold = torch.zeros(5, dtype=torch.long), torch.zeros(10, dtype=torch.long)
    res = budget_search(model, x_fit, y_fit, x_hold, y_hold, tuple(b / 255 for b in BUDGETS), steps=20, target=0.9,
                        stop_at_target=False)
    assert res["flip_rate_holdout"] == pytest.approx([0.1, 0.2, 0.4, 0.7, 0.8, 0.9, 1.0])
    assert res["flip_rate_fit"] == pytest.approx([0.0, 0.0, 0.2, 0.2, 0.4, 0.6, 0.8])
    assert res["score_index"] == 5 and res["input_dependent"]
    assert torch.allclose(res["delta"], torch.full((1, 2, 2), 32 / 255))  # +eps everywhere: the optimum
    early = budget_search(model, x_fit, y_fit, x_hold, y_hold, tuple(b / 255 for b in BUDGETS), steps=20, target=0.8)
    assert early["score_index"] == 4 and early["flip_rate_holdout"][5:] == [None, None]  # stopped at 16/255


def test_universal_perturbation_stays_in_the_ball_and_warm_starts() -> None:
    model, x = _Brightness(), _at_distances(HOLDOUT_D)
    y = torch.zeros(10, dtype=torch.long)
    delta, rate, grad = universal_perturbation(model, x, y, 4 / 255, steps=20)
    assert grad and rate == 0.4 and delta.abs().max() <= 4 / 255 + 1e-7
    assert flip_rate(model, x, y, delta) == 0.4
    # one step from the 4/255 solution gets less far at 8/255 than 20 steps from zero, but not below the start
    one, rate1, _ = universal_perturbation(model, x, y, 8 / 255, steps=1, init=delta)
    assert 0.4 <= rate1 <= 0.7 and torch.all(one >= delta)
    # a model whose output ignores its input: no gradient, nothing moves
    d0, r0, g0 = universal_perturbation(_Const([1.0, 0.0]), x, y, 8 / 255, steps=5)
    assert (r0, g0) == (0.0, False) and torch.equal(d0, torch.zeros_like(d0))


def test_smallest_budget_decision_and_split() -> None:
    assert smallest_budget_index([0.1, 0.85, 0.8, 0.95], 0.8) == 1
    assert smallest_budget_index([0.1, 0.5, None], 0.8) is None
    assert decide(8.0, None, 2.0, 128.0) is None  # no reference: no decision
    assert decide(8.0, 32.0, 2.0, 128.0) is True  # 8 < 32 / 2
    assert decide(16.0, 32.0, 2.0, 128.0) is False  # not strictly below the cut
    assert decide(None, 32.0, 2.0, 128.0) is False  # needs > 128 while the cut is 16
    assert decide(None, 512.0, 2.0, 128.0) is None  # needs > 128, cut 256: cannot tell
    fit, hold = _split(torch.arange(10), 4, 6)
    assert fit.tolist() == [0, 1, 2, 3] and hold.tolist() == [4, 5, 6, 7, 8, 9]
    fit, hold = _split(torch.arange(6), 100, 200)  # fewer images than asked: the 1 : 2 shares kept
    assert fit.tolist() == [0, 1] and hold.tolist() == [2, 3, 4, 5]


def test_headlines() -> None:
    f = {"score": 8.0, "target": 0.8, "budgets": [1.0, 8.0, 128.0], "reference_budget": None, "margin": 2.0, "flagged": None}
    assert TriggerInversion.headline(f) == ("budget 8/255 moves >= 80% of held-out clean inputs out of their class; "
                                            "no reference (flagged n/a)")
    assert TriggerInversion.headline({**f, "reference_budget": 32.0, "flagged": True}).endswith(
        "; flagged (reference 32/255, margin 2)")
    assert TriggerInversion.headline({**f, "score": None, "reference_budget": 64.0, "flagged": False}) == (
        "80% not reached within 128/255; not flagged (reference 64/255, margin 2)")
    assert TriggerInversion.headline({**f, "applicable": False, "reason": "r"}) == "n/a (r)"
    c = {"auroc": 0.9, "far_at_frr_1pct": 0.2, "frr_at_frr_1pct": 0.01}
    assert CognitiveDistillation.headline(c) == "AUROC 0.900, FAR@FRR1% 0.200 (test FRR 0.010)"


@pytest.mark.parametrize("cls, kw, message", [
    (CognitiveDistillation, {"n_eval": 1}, r"^n_eval: must be an integer >= 2, got 1"),
    (CognitiveDistillation, {"steps": 0}, r"^steps: must be an integer >= 1, got 0"),
    (CognitiveDistillation, {"lr": -0.1}, r"^lr: must be a finite number > 0, got -0.1"),
    (CognitiveDistillation, {"alpha": float("nan")}, r"^alpha: must be a finite number >= 0, got nan"),
    (CognitiveDistillation, {"beta": -1}, r"^beta: must be a finite number >= 0, got -1"),
    (CognitiveDistillation, {"batch_size": True}, r"^batch_size: must be an integer >= 1, got True"),
    (TriggerInversion, {"budgets": [4, 2]}, r"^budgets: must be an increasing list of L-inf budgets in \(0, 255\]"),
    (TriggerInversion, {"budgets": [0, 2]}, r"^budgets: must be an increasing list"),
    (TriggerInversion, {"budgets": [300]}, r"^budgets: must be an increasing list"),
    (TriggerInversion, {"target": 0}, r"^target: must be in \(0, 1\], got 0"),
    (TriggerInversion, {"steps": 2.5}, r"^steps: must be an integer >= 1, got 2.5"),
    (TriggerInversion, {"reference_budget": -4}, r"^reference_budget: must be null or a budget > 0"),
    (TriggerInversion, {"margin": 0.5}, r"^margin: must be a finite number >= 1, got 0.5"),
    (TriggerInversion, {"n_holdout": 0}, r"^n_holdout: must be an integer >= 1, got 0"),
    (TriggerInversion, {"stop_at_target": "yes"}, r"^stop_at_target: must be true or false, got 'yes'"),
])
def test_bad_parameters_name_themselves(cls: type, kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**kw)


# ---- end to end on the BadNets run ----

def test_cognitive_distillation_end_to_end(badnets_run: Path, tmp_path: Path) -> None:
    """The mechanics on a real run: calibration on the validation split, rules re-applied to the
    stored norms give the stored rates. Not asserted: separation. Measured (seed 0, 1 thread, README
    defaults): AUROC 0.51 on 50 + 50 inputs, median mask norm 156 clean vs 156 backdoor (of 256) -- on
    this 16x16 digits model CD does *not* give the BadNets inputs smaller masks (see the report);
    the gated stand-in below is the positive control of the mechanism."""
    run = load_attack_run(badnets_run, device="cpu")
    f = run_defense("cognitive-distillation", run, tmp_path, n_eval=20, n_calib=20).fields
    assert f["applicable"] and f["calibration"].startswith("validation split") and f["n_calib_used"] == 20
    clean, bd, val = (np.array(f[k]) for k in ("mask_norm_clean", "mask_norm_backdoor", "mask_norm_val"))
    assert len(clean) == len(bd) == 20 and ((0 <= np.r_[clean, bd, val]) & (np.r_[clean, bd, val] <= 256)).all()
    lo = f["thresholds"]["5pct"][0]
    assert np.mean(val < lo) <= 0.05 and f["frr_at_frr_5pct"] == np.mean(clean < lo)
    assert f["far_at_frr_5pct"] == pytest.approx(np.mean(bd >= lo))
    lo2, hi2 = f["thresholds"]["5pct_two_sided"]
    assert f["frr_at_frr_5pct_two_sided"] == np.mean((clean < lo2) | (clean > hi2))
    on_disk = json.loads((tmp_path / "cognitive-distillation" / "defense.json").read_text())
    assert on_disk["figures"] == ["cd_mask_norms.png", "cd_masks.png"] and on_disk["params"]["alpha"] == 0.01
    assert all((tmp_path / "cognitive-distillation" / p).is_file() for p in on_disk["figures"])


class _GatedPatch(nn.Module):
    """The BadNets classifier, except that a bright bottom-right 3x3 corner switches it (smoothly,
    so CD's gradient sees the switch) to fixed logits: the trigger alone decides the output."""

    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf
        self.fixed = torch.tensor([8.0] + [0.0] * 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(60 * (x[..., -3:, -3:].mean((1, 2, 3)) - 0.9))[:, None]
        return (1 - w) * self.clf(x) + w * self.fixed


def test_cognitive_distillation_finds_a_trigger_that_alone_decides(badnets_run: Path, tmp_path: Path) -> None:
    """Where the trigger alone fixes the logits, the backdoor inputs' masks shrink towards the patch
    (9 of 256 pixels) while the clean inputs' stay large: CD's premise, checked where it holds."""
    run = load_attack_run(badnets_run, device="cpu")
    gated = dataclasses.replace(run, classifier=_GatedPatch(run.classifier).requires_grad_(False), _bd_cache=None)
    f = run_defense("cognitive-distillation", gated, tmp_path, n_eval=20, n_calib=20).fields
    clean, bd = np.array(f["mask_norm_clean"]), np.array(f["mask_norm_backdoor"])
    assert np.median(bd) < 0.5 * np.median(clean) and f["auroc"] > 0.9, (np.median(bd), np.median(clean))
    assert f["far_at_frr_5pct"] < 0.5


def test_cognitive_distillation_not_applicable(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    clean = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, attack="none"), trigger=None, targets=None, _bd_cache=None)
    f = run_defense("cognitive-distillation", clean, tmp_path, n_eval=4, n_calib=4, steps=5).fields
    assert f["applicable"] is False and f["reason"].startswith("clean model") and f["trigger"].startswith("probe patch")
    assert "auroc" in f and CognitiveDistillation.headline(f) == f"n/a ({f['reason']})"
    const = dataclasses.replace(run, classifier=_Const([0.0] * 10), _bd_cache=None)
    c = run_defense("cognitive-distillation", const, tmp_path / "c", n_eval=4, n_calib=4, steps=5).fields
    assert c["applicable"] is False and "same mask norm" in c["reason"]


def test_trigger_inversion_end_to_end(badnets_run: Path, tmp_path: Path) -> None:
    """BadNets' trigger is a white 3x3 patch (L-inf 255/255), outside what a small L-inf budget can
    imitate: the inversion is not expected to find it cheaply (measured with the defaults: 64/255
    for this model and for a clean one, see the report). Checked here: the score is the first
    budget whose held-out flip rate reaches the target, the reference rule, and determinism."""
    run = load_attack_run(badnets_run, device="cpu")
    kw = dict(budgets=[16, 64, 128], steps=10, n_fit=40, n_holdout=40, stop_at_target=False)
    f = run_defense("trigger-inversion", run, tmp_path, **kw).fields
    hold = f["flip_rate_holdout"]
    assert f["applicable"] and len(hold) == 3 and None not in hold and f["n_fit_used"] == f["n_holdout_used"] == 40
    first = next((b for b, r in zip(f["budgets"], hold) if r >= 0.8), None)
    assert f["score"] == first and f["reached"] == (first is not None) and f["flagged"] is None
    assert (f["level"], f["score_suspicious"], f["assumes_target_class"]) == ("model", "low", False)
    assert f["trigger_linf"] == pytest.approx(255.0) and f["calibration"].startswith("validation split")
    assert "no reference" in TriggerInversion.headline(f)
    assert (tmp_path / "trigger-inversion" / "trigger_inversion.png").is_file()
    ref = run_defense("trigger-inversion", run, tmp_path / "r", reference_budget=512.0, **kw).fields
    assert ref["flip_rate_holdout"] == hold and ref["flip_rate_fit"] == f["flip_rate_fit"]  # deterministic
    assert ref["flagged"] is (True if first is not None else None)  # every budget is below 512 / 2
    const = dataclasses.replace(run, classifier=_Const([0.0] * 10), _bd_cache=None)
    c = run_defense("trigger-inversion", const, tmp_path / "c", budgets=[8], steps=2, n_fit=4, n_holdout=4).fields
    assert c["applicable"] is False and "does not depend on its input" in c["reason"] and c["flagged"] is None


def test_defend_writes_the_flag_decided_by_clean_references(badnets_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`cuba defend trigger-inversion RUN --reference REF...`: the auditor's flag in defense.json itself,
    by the rule `cuba defense-table --reference` applies; bad references are refused before the search."""
    import shutil

    from cuba.cli import main

    sets = ["--set", "budgets=[16, 64, 128]", "--set", "steps=10", "--set", "n_fit=40", "--set", "n_holdout=40",
            "--device", "cpu"]
    plain = tmp_path / "plain"
    assert main(["defend", "trigger-inversion", str(badnets_run), "--out", str(plain), *sets]) == 0
    f = json.loads((plain / "trigger-inversion" / "defense.json").read_text())
    assert f["flagged"] is None

    def ref(name: str, score: float | None, setting: str = "clean", config: Path = badnets_run / "config.yaml") -> Path:
        folder = tmp_path / name / "defenses" / "trigger-inversion"
        folder.mkdir(parents=True)
        shutil.copy(config, tmp_path / name / "config.yaml")
        (folder / "defense.json").write_text(json.dumps({**f, "setting": setting, "score": score, "reached": score is not None}))
        return tmp_path / name

    # references at 256/255 and never reached: cut 256 / margin 2 = 128, above none of the budgets
    refs = [ref("r1", 256.0), ref("r2", None)]
    out = tmp_path / "flagged"
    assert main(["defend", "trigger-inversion", str(badnets_run), "--out", str(out), *sets,
                 "--reference", *map(str, refs)]) == 0
    g = json.loads((out / "trigger-inversion" / "defense.json").read_text())
    assert g["flagged"] is (f["score"] is not None and f["score"] < 128)
    assert g["reference_scores"] == [256.0, None] and g["score"] == f["score"]
    assert "flagged decided on 2 clean reference model(s)" in capsys.readouterr().out

    def refused(name: str, reference: Path, message: str) -> None:
        extra = sets if name == "trigger-inversion" else []
        assert main(["defend", name, str(badnets_run), "--out", str(tmp_path / "x"), *extra, "--reference", str(reference)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()  # refused before any search ran

    refused("trigger-inversion", tmp_path / "plain", "no trigger-inversion result in it")
    refused("trigger-inversion", ref("bd", 1.0, "badnets-t0"), "must be clean, this one is 'badnets-t0'")
    other = tmp_path / "other.yaml"
    other.write_text((badnets_run / "config.yaml").read_text().replace("digits", "mnist"))
    refused("trigger-inversion", ref("mn", 256.0, config=other), "its model is mnist/")
    refused("strip", refs[0], "--reference: strip has no reference rule; only trigger-inversion")
    refused("trigger-inversion", badnets_run, "the suspect cannot be its own reference")
    na = ref("na", None)
    (na / "defenses" / "trigger-inversion" / "defense.json").write_text(json.dumps({**f, "setting": "clean", "applicable": False,
                                                                                    "reason": "constant model"}))
    refused("trigger-inversion", na, "trigger-inversion did not apply to it (constant model)")
    other_steps = ref("steps", 256.0)
    g = json.loads((other_steps / "defenses" / "trigger-inversion" / "defense.json").read_text())
    (other_steps / "defenses" / "trigger-inversion" / "defense.json").write_text(json.dumps({**g, "params": {**g["params"], "steps": 7}}))
    refused("trigger-inversion", other_steps, "trigger-inversion ran there with other parameters (steps)")
    assert main(["defend", "trigger-inversion", str(badnets_run), "--out", str(tmp_path / "x"), *sets,
                 "--set", "reference_budget=64", "--reference", str(refs[0])]) == 2
    assert "give the references or --set reference_budget, not both" in capsys.readouterr().err
