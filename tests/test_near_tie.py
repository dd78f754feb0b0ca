"""The near-tie detector (ours): the distance of a prediction to the nearest k-way tie, pinned by hand,
then end to end on the BadNets fixture, where it is expected to *miss* (a targeted backdoor input is
confident, the opposite of a tie), and on a stand-in that ties two classes on the trigger, where it
must catch every backdoor input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cuba.defenses import DEFENSES, load_attack_run, run_defense
from cuba.defenses.near_tie import NearTie, tie_distance, tie_summary
from cuba.defenses.verdict import verdict

from test_defenses import _Const, badnets_run  # noqa: F401  (badnets_run: its module-scoped fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tie_distance_by_hand() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.97, 0.01, 0.01, 0.01], [0.6, 0.3, 0.1, 0.0], [0.25] * 4, [0.2, 0.2, 0.2, 0.4]])
    s, k = tie_distance(torch.log(p.clamp_min(1e-12)))
    # [.97,.01,.01,.01] to (1/2,1/2,0,0): .47 + .49 + .02; [.6,.3,.1,0]: to k=2 .1 + .2 + .1 = .4 (k=3: .533);
    # [.4,.2,.2,.2] sorted, to k=4: .15 + 3 x .05 = .3
    assert s.tolist() == pytest.approx([0.0, 0.98, 0.4, 0.0, 0.3], abs=1e-6) and k.tolist() == [2, 2, 2, 4, 4]
    assert torch.equal(tie_distance(torch.tensor([[5.0, 0.0, 1.0]]))[0], tie_distance(torch.tensor([[0.0, 1.0, 5.0]]))[0])
    with pytest.raises(ValueError, match="near-tie needs at least 2 classes, got 1"):
        tie_distance(torch.zeros(3, 1))


def test_tie_summary_rule_on_synthetic_scores() -> None:
    rng = np.random.default_rng(0)
    s_val, s_clean = rng.uniform(0.2, 1.0, 400), rng.uniform(0.2, 1.0, 200)
    s_bd = np.r_[np.zeros(190), np.full(10, 0.9)]  # 95% exact ties, 5% confident
    f = tie_summary(s_val, s_clean, s_bd)
    lo = f["thresholds"]["1pct"][0]
    assert np.mean(s_val < lo) <= 0.01 and f["far_at_frr_1pct"] == pytest.approx(0.05)
    assert f["frr_at_frr_1pct"] == pytest.approx(np.mean(s_clean < lo)) and "far_at_frr_1pct_two_sided" not in f
    assert f["auroc"] == pytest.approx(0.95 + 0.05 * np.mean(s_clean > 0.9), abs=1e-9)  # ties rank above every clean score


class _TieOnPatch(nn.Module):
    """The fixture's classifier, except that an input carrying the white 3x3 patch gets an exact
    two-way tie (classes 3 and 7): what NRA-2 aims for."""

    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patched = (x[..., -3:, -3:] == 1.0).flatten(1).all(1)
        tie = torch.full((1, 10), -20.0)
        tie[0, 3] = tie[0, 7] = 5.0
        return torch.where(patched[:, None], tie, self.clf(x))


def test_near_tie_misses_badnets_and_catches_a_tie(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    f = run_defense("near-tie", run, tmp_path, n_eval=100).fields
    assert list(DEFENSES).index("near-tie") == len(DEFENSES) - 1
    assert f["applicable"] and f["calibration"].startswith("validation split") and len(f["tie_backdoor"]) == 100
    # BadNets: confident target-class outputs, far from any tie -- measured miss, by design
    assert f["far_at_frr_1pct"] > 0.9 and verdict(NearTie, {"setting": "badnets-t0", **f}) == "missed"
    assert json.loads((tmp_path / "near-tie" / "defense.json").read_text())["figures"] == ["near_tie_hist.png"]
    tied = dataclasses.replace(run, classifier=_TieOnPatch(run.classifier), _bd_cache=None)
    t = run_defense("near-tie", tied, tmp_path / "t", n_eval=100).fields
    assert t["tie_backdoor"] == pytest.approx([0.0] * 100, abs=1e-6) and t["tie_k_backdoor"] == {2: 100}
    assert t["far_at_frr_1pct"] == 0.0 and t["auroc"] > 0.99 and verdict(NearTie, {"setting": "cuba-nra2", **t}) == "caught"
    assert NearTie.headline(t).startswith("AUROC ") and "FAR@FRR1% 0.000" in NearTie.headline(t)


def test_near_tie_not_applicable_on_clean_or_constant_models(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    clean = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, attack="none"), trigger=None, targets=None, _bd_cache=None)
    f = run_defense("near-tie", clean, tmp_path, n_eval=50).fields
    assert f["applicable"] is False and f["reason"].startswith("clean model")
    const = dataclasses.replace(run, classifier=_Const([0.0] * 10), _bd_cache=None)
    c = run_defense("near-tie", const, tmp_path / "c", n_eval=20).fields
    assert c["applicable"] is False and "same tie distance" in c["reason"]
    with pytest.raises(Exception, match="n_calib"):
        NearTie(n_calib=1)
