"""The entropy and MM-BD detectors: hand-computed pieces, parameter checks, the not-applicable paths
and one end-to-end run of each on the tiny digits BadNets run of test_defenses (the positive control)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import digamma, gammainc
from torch import nn

from cuba.config import ConfigError
from cuba.defenses import DEFENSES, load_attack_run, run_defense
from cuba.defenses.entropy import PredictionEntropy, empirical_cdf, rank_distance, softmax_entropy, two_sided_summary
from cuba.defenses.mm_bd import MMBD, class_margins, gamma_log_sf, max_margins, order_statistic_test

from test_defenses import _Const, badnets_run  # noqa: F401  (badnets_run: its module-scoped fixture, trained once here)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_both_detectors_are_registered_under_their_cli_names() -> None:
    assert DEFENSES["entropy"] is PredictionEntropy and DEFENSES["mm-bd"] is MMBD
    names = list(DEFENSES)
    assert names.index("scale-up") < names.index("entropy") < names.index("mm-bd")  # registered after the existing ones


def test_softmax_entropy_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # uniform over 4: 2 bits
                           [0.0, 0.0, math.log(2.0), -math.inf],  # p = 1/4, 1/4, 1/2, 0: 1.5 bits (0 log 0 = 0)
                           [1000.0, 0.0, 0.0, 0.0]])  # saturated: 0 bits, not nan
    assert softmax_entropy(logits).tolist() == pytest.approx([2.0, 1.5, 0.0], abs=1e-6)


def test_empirical_cdf_counts_ties_half_and_rank_distance_is_two_sided() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    # s = 2: one reference value below, two at or below -> (1 + 2) / 8; outside the range: 0 and 1
    assert empirical_cdf(ref, np.array([2.0, 0.0, 5.0, 2.5])).tolist() == [0.375, 0.0, 1.0, 0.5]
    # both tails score the same 0.5; the median scores 0
    assert rank_distance(ref, np.array([0.0, 5.0, 2.5])).tolist() == [0.5, 0.5, 0.0]


def test_two_sided_rule_on_synthetic_entropies() -> None:
    """Thresholds are empirical validation quantiles, FRR split between the tails; a high-entropy
    (CUBA-like) backdoor input is caught as well as a low-entropy (targeted) one."""
    e_val = np.arange(200) / 100  # 0.00 .. 1.99
    # 5%: the 2.5% quantile taken low (0.04) and the 97.5% one taken high (1.95): 4 + 4 of 200 validation
    # values lie strictly beyond; 1%: the extremes 0.00 and 1.99, beyond which nothing of the validation lies
    e_clean = np.array([0.5, 1.0, 0.01, 1.98])
    e_bd = np.array([3.0, 2.5, 0.02, 1.0])
    f = two_sided_summary(e_val, e_clean, e_bd)
    assert f["thresholds"] == {"1pct_two_sided": [0.0, 1.99], "5pct_two_sided": [0.04, 1.95]}
    assert (f["far_at_frr_5pct_two_sided"], f["frr_at_frr_5pct_two_sided"]) == (0.25, 0.5)  # bd 1.0 missed; clean 0.01, 1.98 rejected
    assert (f["far_at_frr_1pct_two_sided"], f["frr_at_frr_1pct_two_sided"]) == (0.5, 0.0)  # only 3.0 and 2.5 beyond 1.99
    # rank scores: clean .2475 .0025 .4925 .4925, backdoor .5 .5 .4875 .0025 ->
    # P(bd > clean) + ties / 2 = (4 + 4 + 2 + 0.5) / 16
    assert f["auroc"] == f["auroc_two_sided"] == pytest.approx(10.5 / 16)
    # the plain keys of the harness hold the detector's own (two-sided) rule
    assert (f["far_at_frr_1pct"], f["frr_at_frr_1pct"], f["far_at_frr_5pct"]) == (0.5, 0.0, 0.25)
    assert f["rule_sides"] == "two" and "1pct" not in f["thresholds"]
    # 200 validation values cannot resolve a two-sided 1% rule (201 needed): under both names
    assert f["unresolved_rules"] == ["1pct_two_sided", "1pct"]


def test_class_margins_by_hand() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    assert class_margins(logits, torch.tensor([1, 0])).tolist() == [1.0, -2.0]


def test_max_margins_of_a_linear_model_reach_the_vertex_and_ignore_batching() -> None:
    """Logits (x0, x1, 0) on a 1x1x2 'image' in [0, 1]^2: class 0 peaks at x = (1, 0) with margin 1,
    class 1 at (0, 1) with 1, class 2 at (0, 0) with 0 -- the projection must reach the corners."""
    lin = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    model = nn.Sequential(nn.Flatten(), lin).requires_grad_(False)
    r = max_margins(model, 3, (1, 1, 2), torch.device("cpu"), n_starts=4, steps=60, lr=0.1, seed=3)
    assert r.tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-4)
    one_by_one = max_margins(model, 3, (1, 1, 2), torch.device("cpu"), n_starts=4, steps=5, lr=0.1, seed=3, batch_size=4)
    together = max_margins(model, 3, (1, 1, 2), torch.device("cpu"), n_starts=4, steps=5, lr=0.1, seed=3, batch_size=64)
    assert np.allclose(one_by_one, together) and not np.allclose(one_by_one, r)  # 5 steps do not get there yet


def _gamma_mle_loc0(x: np.ndarray) -> tuple[float, float]:
    """Gamma(shape, scale) MLE with location 0, solved directly: log a - digamma(a) = log mean - mean log."""
    s = math.log(x.mean()) - np.log(x).mean()
    a = brentq(lambda a: math.log(a) - digamma(a) - s, 1e-3, 1e6)
    return a, x.mean() / a


def test_mm_bd_p_value_flags_an_outlier_class() -> None:
    null = np.array([6.0, 14.0, 9.0, 12.0, 7.5, 10.0, 11.0, 8.0, 13.0])
    stats = np.insert(null, 4, 30.0)  # class 4 reaches an unusually large margin
    t = order_statistic_test(stats)
    a, scale = _gamma_mle_loc0(null)
    expected = 1 - gammainc(a, 30.0 / scale) ** 9  # the largest of K-1 = 9 null draws exceeds 30
    assert t["applicable"] and t["detected_class"] == 4 and t["r_max"] == 30.0
    assert (t["gamma_shape"], t["gamma_scale"]) == pytest.approx((a, scale), rel=1e-3)
    assert t["p_value"] == pytest.approx(expected, rel=1e-3) and t["p_value"] < 1e-3 and t["flagged"]
    assert t["score"] == pytest.approx(-math.log10(expected), rel=1e-3)
    # the critical value is the r_max at which p = alpha under the same null fit
    at_critical = order_statistic_test(np.insert(null, 4, t["critical_value"]))
    assert at_critical["p_value"] == pytest.approx(0.05, rel=1e-6) and 14.0 < t["critical_value"] < 30.0


def test_mm_bd_does_not_flag_statistics_without_an_outlier() -> None:
    stats = np.array([10.0, 11.0, 9.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9, 10.7])
    t = order_statistic_test(stats)
    assert t["applicable"] and t["detected_class"] == 1 and not t["flagged"] and t["p_value"] > 0.05
    assert MMBD.headline(t) == f"not flagged (p={t['p_value']:.2g})"
    assert order_statistic_test(stats, alpha=0.99)["flagged"]  # alpha is the rule's level


def test_gamma_tail_where_scipy_underflows() -> None:
    """Shape 3 has a closed form, P(X > z) = e^-z (z^2 + 2z + 2) / 2; at z = 2000 scipy's logsf is -inf."""
    assert gamma_log_sf(2000.0, 3.0, 1.0) == pytest.approx(-2000 + math.log(2000**2 + 2 * 2000 + 2) - math.log(2), abs=1e-3)
    assert gamma_log_sf(20.0, 3.0, 1.0) == pytest.approx(-20 + math.log(20**2 + 2 * 20 + 2) - math.log(2), rel=1e-9)


def test_mm_bd_score_stays_finite_when_p_underflows() -> None:
    t = order_statistic_test(np.r_[np.linspace(9.0, 11.0, 9), 1e4])
    assert t["flagged"] and t["p_value"] == 0.0 and math.isfinite(t["score"]) and t["score"] > 300


def test_mm_bd_not_applicable_when_no_null_can_be_fitted() -> None:
    t = order_statistic_test(np.array([5.0, 2.0, -0.5, 3.0]))
    assert not t["applicable"] and t["reason"].startswith("class 2 has maximum margin -0.5 <= 0") and t["p_value"] is None
    assert not t["flagged"] and MMBD.headline(t) == f"n/a ({t['reason']})"
    assert "all equal" in order_statistic_test(np.array([5.0, 2.0, 2.0, 2.0]))["reason"]
    assert "K = 2 classes" in order_statistic_test(np.array([5.0, 2.0]))["reason"]


def test_headlines() -> None:
    assert MMBD.headline({"flagged": True, "p_value": 8.4e-05, "detected_class": 0}) == "flagged (p=8.4e-05) class 0"
    f = {"auroc": 0.81, "far_at_frr_1pct_two_sided": 0.685, "frr_at_frr_1pct_two_sided": 0.006}
    assert PredictionEntropy.headline(f) == "AUROC 0.810, two-sided FAR@FRR1% 0.685 (test FRR 0.006)"
    assert PredictionEntropy.headline({**f, "applicable": False, "reason": "clean model"}) == "n/a (clean model)"


@pytest.mark.parametrize("cls, kw, message", [
    (MMBD, {"n_starts": 0}, r"^n_starts: must be an integer >= 1, got 0"),
    (MMBD, {"steps": 2.5}, r"^steps: must be an integer >= 0, got 2.5"),
    (MMBD, {"lr": 0}, r"^lr: must be a finite number > 0, got 0"),
    (MMBD, {"alpha": 1.5}, r"^alpha: must be in \(0, 1\), got 1.5"),
    (MMBD, {"batch_size": 0}, r"^batch_size: must be an integer >= 1, got 0"),
    (PredictionEntropy, {"n_eval": 1}, r"^n_eval: must be an integer >= 2, got 1"),
    (PredictionEntropy, {"n_calib": True}, r"^n_calib: must be an integer >= 2, got True"),
])
def test_bad_parameters_name_themselves(cls: type, kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**kw)


class _UniformOnPatch(nn.Module):
    """The BadNets classifier, except that an input carrying the white corner patch gets equal
    logits -- the near-tie over classes that CUBA's trigger aims for (entropy log2 K)."""

    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patched = (x[..., -3:, -3:] == 1.0).flatten(1).all(1)
        return torch.where(patched[:, None], torch.zeros(1, 10), self.clf(x))


def test_entropy_end_to_end(badnets_run: Path, tmp_path: Path) -> None:
    """BadNets (confident, low entropy) and an untargeted stand-in (high entropy) are both caught by
    the same two-sided rule, calibrated on the validation split only."""
    run = load_attack_run(badnets_run, device="cpu")
    f = run_defense("entropy", run, tmp_path, n_eval=100).fields
    assert f["applicable"] and f["calibration"].startswith("validation split") and f["n_calib_used"] == len(f["entropy_val"])
    assert len(f["entropy_clean"]) == len(f["entropy_backdoor"]) == 100 and f["auroc"] > 0.6
    lo, hi = f["thresholds"]["5pct_two_sided"]
    assert np.mean([(e < lo) or (e > hi) for e in f["entropy_val"]]) <= 0.05  # the rule's FRR holds on its own data
    assert f["frr_at_frr_5pct_two_sided"] == pytest.approx(np.mean([(e < lo) or (e > hi) for e in f["entropy_clean"]]), abs=1e-6)
    on_disk = json.loads((tmp_path / "entropy" / "defense.json").read_text())
    assert on_disk["defense"] == "entropy" and on_disk["figures"] == ["entropy_hist.png"]
    assert (tmp_path / "entropy" / "entropy_hist.png").is_file()
    spread = dataclasses.replace(run, classifier=_UniformOnPatch(run.classifier), _bd_cache=None)
    u = run_defense("entropy", spread, tmp_path / "u", n_eval=100).fields
    assert u["entropy_backdoor"] == pytest.approx([math.log2(10)] * 100, abs=1e-4)
    assert u["far_at_frr_1pct_two_sided"] == 0.0  # all in the high tail, all flagged
    # every backdoor input lies above all validation entropies: rank score 0.5, the maximum, which it
    # shares only with the clean inputs outside the validation range (ties count half)
    outside = np.mean([not min(u["entropy_val"]) <= e <= max(u["entropy_val"]) for e in u["entropy_clean"]])
    assert u["auroc"] == pytest.approx(1 - outside / 2) and outside < 0.1


def test_entropy_not_applicable_on_a_clean_or_constant_model(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    clean = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, attack="none"), trigger=None, targets=None, _bd_cache=None)
    f = run_defense("entropy", clean, tmp_path, n_eval=50).fields
    assert f["applicable"] is False and f["reason"].startswith("clean model") and f["trigger"].startswith("probe patch")
    assert "auroc" in f and PredictionEntropy.headline(f) == f"n/a ({f['reason']})"  # numbers kept for inspection
    const = dataclasses.replace(run, classifier=_Const([0.0] * 10), _bd_cache=None)
    c = run_defense("entropy", const, tmp_path / "c", n_eval=20).fields
    assert c["applicable"] is False and "same entropy" in c["reason"]
    m = run_defense("mm-bd", const, tmp_path / "c", n_starts=2, steps=1).fields  # every margin is 0
    assert m["applicable"] is False and "<= 0" in m["reason"] and m["statistics"] == [0.0] * 10


def test_mm_bd_flags_the_badnets_target(badnets_run: Path, tmp_path: Path) -> None:
    """Measured (seed 0, 1 thread): r_0 = 50.0 against 21-35 for the other classes, p = 2.4e-4."""
    run = load_attack_run(badnets_run, device="cpu")
    f = run_defense("mm-bd", run, tmp_path, n_starts=5, steps=30, lr=0.1).fields
    assert f["applicable"] and f["flagged"] and f["detected_class"] == f["attack_target_class"] == 0
    assert f["p_value"] < 0.05 and f["score"] == pytest.approx(-math.log10(f["p_value"]))
    assert len(f["statistics"]) == 10 and max(f["statistics"]) == pytest.approx(f["r_max"], abs=1e-4)
    assert f["r_max"] > f["critical_value"] and f["assumes_target_class"] is True
    on_disk = json.loads((tmp_path / "mm-bd" / "defense.json").read_text())
    assert on_disk["params"] == {"seed": 0, "n_starts": 5, "steps": 30, "lr": 0.1, "alpha": 0.05, "batch_size": 1024}
    assert (tmp_path / "mm-bd" / "mm_bd_statistics.png").is_file()
    assert MMBD.headline(f) == f"flagged (p={f['p_value']:.2g}) class 0"
