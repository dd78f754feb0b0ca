"""The defenses' decision rules by hand: thresholds fitted on clean validation scores, the FAR / FRR
and TPR / FPR they realise, "not applicable", and the headline numbers of mitigation curves.

Split from test_defenses.py (which keeps the end-to-end runs) so that these fast, model-free checks
of :mod:`cuba.defenses.rules` and the headline helpers of :mod:`cuba.defenses.base` read as one page."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cuba.defenses.base import (constant_scores, headline_asr_key, headline_asr_key_of, not_applicable, removal_headline,
                                roc_summary, val_threshold)
from cuba.defenses.fine_pruning import FinePruning
from cuba.defenses.nad import NAD
from cuba.defenses.rules import REPORTED_FRR, clean_model_reason, rule_table, score_inapplicable_reason
from cuba.defenses.scale_up import ScaleUp, empirical_two_sided, two_sided_rates
from cuba.defenses.sentinet import SentiNet
from cuba.defenses.strip import Strip, calibration_collapse, far_frr, normal_thresholds

pytestmark = pytest.mark.usefixtures("one_thread")


def test_strip_far_frr_one_and_two_sided_by_hand() -> None:
    """FAR = backdoor inputs not flagged, FRR = clean inputs flagged; CUBA-like backdoor inputs in the
    *high*-entropy tail are missed by the paper's one-sided rule and caught by the two-sided one."""
    e_clean = np.array([0.1, 0.5, 1.0, 1.5, 1.9])
    e_bd = np.array([0.05, 1.0, 2.5, 3.0])
    # one-sided, flag e < 0.2: backdoor 0.05 flagged, 3 of 4 accepted; clean 0.1 rejected
    assert far_frr(e_clean, e_bd, 0.2) == pytest.approx((0.75, 0.2))
    # two-sided, flag e < 0.2 or e > 1.8: backdoor 0.05, 2.5, 3.0 flagged; clean 0.1 and 1.9 rejected
    assert far_frr(e_clean, e_bd, 0.2, 1.8) == pytest.approx((0.25, 0.4))
    assert far_frr(e_clean, e_bd, 0.1, 1.9) == pytest.approx((0.25, 0.0))  # strict inequalities: clean 0.1 and 1.9 accepted


def test_strip_thresholds_are_normal_quantiles_of_the_calibration() -> None:
    from scipy.stats import norm

    calib = np.array([0.8, 0.9, 1.0, 1.1, 1.2])  # mean 1.0, sample std sqrt(0.025)
    sd = 0.025**0.5
    lo, hi = normal_thresholds(calib, 0.01, two_sided=False)
    assert lo == pytest.approx(1.0 - 2.3263479 * sd) and hi == np.inf  # the paper's rule: the 1% quantile, below only
    lo, hi = normal_thresholds(calib, 0.01, two_sided=True)  # FRR split evenly: 0.5% in each tail
    assert (lo, hi) == pytest.approx((1.0 - 2.5758293 * sd, 1.0 + 2.5758293 * sd))
    assert norm.cdf(lo, 1.0, sd) + norm.sf(hi, 1.0, sd) == pytest.approx(0.01)


def test_strip_calibration_collapse() -> None:
    assert calibration_collapse(1.2, 0.3, 10) is None
    assert "std 0.0005 bits" in calibration_collapse(1.2, 5e-4, 10)
    assert "log2(K) = 3.3219" in calibration_collapse(np.log2(10) - 5e-4, 0.01, 10)  # superimpositions saturate


def test_val_threshold_and_roc_summary_use_the_validation_scores() -> None:
    """The 5%-FPR threshold comes from clean *validation* scores, never from the test ROC; the test
    FPR it realises is reported beside the TPR."""
    s_val = np.arange(100) / 100  # 0.00 .. 0.99: the empirical 95% quantile (at an observed value) is 0.95
    assert val_threshold(s_val, 0.05) == pytest.approx(0.95) and (s_val > 0.95).mean() <= 0.05
    s_clean = np.r_[np.full(90, 0.5), np.full(10, 0.97)]  # the test inputs drifted: 10% sit above the threshold
    s_bd = np.r_[np.full(50, 0.96), np.full(50, 0.90)]
    r = roc_summary(s_clean, s_bd, s_val)
    assert r["threshold_at_fpr_5pct"] == pytest.approx(0.95)
    assert r["tpr_at_fpr_5pct"] == pytest.approx(0.5) and r["test_fpr_at_fpr_5pct"] == pytest.approx(0.1)
    # the harness's FAR at FRR 5% is the same rule read the other way; at 1% the threshold is 0.99
    assert (r["far_at_frr_5pct"], r["frr_at_frr_5pct"]) == (pytest.approx(0.5), pytest.approx(0.1))
    assert (r["far_at_frr_1pct"], r["frr_at_frr_1pct"]) == (1.0, 0.0)
    # ... which 100 validation scores cannot resolve (its threshold is their maximum): marked, as rule_table does
    assert r["unresolved_rules"] == ["1pct"] and "unresolved_rules" not in roc_summary(s_clean, s_bd, np.arange(101) / 100)
    # the test ROC would have chosen 0.97 (FPR 0 on the test inputs) and reported TPR 0; a discrete score
    # whose validation quantile is its maximum flags nothing rather than more than the nominal share
    assert val_threshold(np.r_[np.zeros(90), np.ones(10)], 0.05) == 1.0


def test_scale_up_two_sided_rule_on_discrete_spc() -> None:
    s_val = np.r_[np.zeros(2), np.full(10, 0.4), np.ones(88)]
    # 2.5% lower quantile, taken at an observed value so that at most 2.5% of s_val lies below: 0.4;
    # the upper one is 1.0, and nothing can exceed it: ties make the rule conservative
    assert empirical_two_sided(s_val, 0.05) == (0.4, 1.0)
    tpr, fpr = two_sided_rates(np.array([0.0, 0.4, 1.0, 0.2]), np.array([0.0, 0.2, 0.2, 1.0]), 0.4, 1.0)
    assert (tpr, fpr) == (0.75, 0.5)


def test_not_applicable_and_constant_scores() -> None:
    assert constant_scores(np.ones(3), np.ones(2)) and not constant_scores(np.ones(3), np.r_[1.0, 0.9])
    f = {"applicable": False, "reason": "every score is equal", "auroc": 0.5, "tpr_at_fpr_5pct": 1.0,
         "test_fpr_at_fpr_5pct": 1.0, "far_at_frr_1pct": 0.0, "rows": []}
    for cls in (Strip, ScaleUp, SentiNet, FinePruning, NAD):
        assert cls.headline(f) == "n/a (every score is equal)"
    assert not_applicable({"auroc": 0.9}) is None  # a defense.json from before the field: applicable


def test_headline_asr_is_asr_c_for_untargeted_settings() -> None:
    from cuba.config import make_config

    for attack, variant, key in (("cuba", "fra", "asr_c"), ("cuba", "nra-2", "asr_c"), ("untargeted-ce", "fra", "asr_c"),
                                 ("push-away", "nra-5", "asr_c"), ("ubw-p", "fra", "asr_c"), ("targeted", "fra", "asr"),
                                 ("badnets", "fra", "asr"), ("none", "fra", "asr")):
        cfg = make_config({"dataset": "digits", "attack": attack, "variant": variant})
        assert headline_asr_key(cfg) == key, attack
        assert headline_asr_key_of({"setting": cfg.label()}) == key  # old defense.json: inferred from its setting
    assert headline_asr_key_of({"setting": "cuba-fra", "asr_headline_key": "asr"}) == "asr"
    rows = [{"epoch": 0, "ca": 0.98, "asr": 0.99, "asr_c": 0.99}, {"epoch": 20, "ca": 0.6, "asr": 0.41, "asr_c": 0.02}]
    assert removal_headline(rows, "epoch", 10, "asr_c") == "epoch 0: 98.0/99.0 → 20: 60.0/2.0 (CA/ASR-C)"
    assert removal_headline(rows, "epoch", 10, "asr").endswith("60.0/41.0 (CA/ASR)")
    old = [{k: v for k, v in r.items() if k != "asr_c"} for r in rows]  # a defense.json from before ASR-C
    assert removal_headline(old, "epoch", 10, "asr_c").endswith("60.0/41.0 (CA/ASR (ASR-C not recorded))")



def test_rule_table_keys_order_and_thresholds_by_hand() -> None:
    """The shared rule loop of the entropy, CD and IBD-PSC detectors: per FRR the one-sided rule, then
    the two-sided one; "lower" records [lower, null], "upper" its one threshold, two-sided [lower, upper]."""
    s_val = np.arange(100) / 100  # 0.00 .. 0.99
    s_clean = np.array([0.0, 0.3, 0.6, 0.995])
    s_bd = np.array([-0.1, 0.5, 1.2])
    low = rule_table(s_val, s_clean, s_bd, one_sided="lower")
    assert list(low) == ["far_at_frr_1pct", "frr_at_frr_1pct", "far_at_frr_1pct_two_sided", "frr_at_frr_1pct_two_sided",
                         "far_at_frr_5pct", "frr_at_frr_5pct", "far_at_frr_5pct_two_sided", "frr_at_frr_5pct_two_sided",
                         "thresholds", "unresolved_rules"]
    # 100 scores: at 1% both rules sit on the sample's extremes (the lower threshold 0.0 is the minimum)
    assert low["unresolved_rules"] == ["1pct", "1pct_two_sided"]
    # 1%: lower quantile 0.0 (nothing of s_val below it); two-sided 0.5% / 99.5% at observed values: 0.0 and 0.99;
    # 5%: 0.04, two-sided 2.5% / 97.5%: 0.02 and 0.97
    assert low["thresholds"] == {"1pct": [0.0, None], "1pct_two_sided": [0.0, 0.99],
                                 "5pct": [0.04, None], "5pct_two_sided": [0.02, 0.97]}
    assert (low["far_at_frr_1pct"], low["frr_at_frr_1pct"]) == pytest.approx((2 / 3, 0.0))  # only -0.1 < 0.0; clean 0.0 is not below
    assert (low["far_at_frr_5pct_two_sided"], low["frr_at_frr_5pct_two_sided"]) == pytest.approx((1 / 3, 0.5))  # 0.0 and 0.995 flagged
    up = rule_table(s_val, s_clean, s_bd, one_sided="upper")
    assert up["thresholds"]["1pct"] == 0.99 and up["thresholds"]["5pct"] == 0.95  # :func:`val_threshold`
    assert (up["far_at_frr_5pct"], up["frr_at_frr_5pct"]) == pytest.approx((2 / 3, 0.25))
    two = rule_table(s_val, s_clean, s_bd, one_sided=None)
    assert list(two) == ["far_at_frr_1pct_two_sided", "frr_at_frr_1pct_two_sided", "far_at_frr_5pct_two_sided",
                         "frr_at_frr_5pct_two_sided", "thresholds", "unresolved_rules"]
    assert two["thresholds"] == {"1pct_two_sided": [0.0, 0.99], "5pct_two_sided": [0.02, 0.97]}
    assert REPORTED_FRR == (0.01, 0.05) and list(rule_table(s_val, s_clean, s_bd, rates=(0.1,))["thresholds"]) == ["10pct_two_sided"]


def test_score_inapplicable_reason_in_order() -> None:
    """Clean model first, then constant validation scores (with the value and unit), then constant test scores."""
    attacked, clean = SimpleNamespace(trigger=object()), SimpleNamespace(trigger=None, imported=False)
    varied, flat = np.array([0.1, 0.2]), np.full(3, 0.123456)
    assert score_inapplicable_reason(clean, "entropy", flat, flat, flat) == clean_model_reason()
    # someone else's model: not called clean, its trigger is unknown
    foreign = SimpleNamespace(trigger=None, imported=True)
    assert score_inapplicable_reason(foreign, "entropy", flat, flat, flat).startswith("imported model: its trigger")
    assert "backdoor masks are of a 3x3 probe patch" in score_inapplicable_reason(clean, "mask norm", varied, varied, varied,
                                                                                  scored="masks")
    assert score_inapplicable_reason(attacked, "entropy", flat, flat, flat, unit=" bits", rules="the two-sided thresholds") == (
        "every clean validation image has the same entropy (0.1235 bits): the two-sided thresholds coincide and the rank "
        "score is a step")
    assert score_inapplicable_reason(attacked, "mask norm", varied, flat, flat) == (
        "every test input has the same mask norm: the score ranks nothing")
    assert score_inapplicable_reason(attacked, "mask norm", varied, varied, flat) is None


def test_a_rule_finer_than_its_calibration_set_is_marked_unresolved() -> None:
    """142 validation scores resolve a one-sided 1% rule (its threshold at sorted index floor(1.41) = 1)
    but not a two-sided one (index floor(0.705) = 0: the minimum); 200 do not either (0.995), 201 do. An unresolved rule is named in defense.json, its headline
    says so, and the verdict abstains rather than call the detector's miss a measurement."""
    from cuba.defenses import DEFENSES
    from cuba.defenses.base import rule_headline
    from cuba.defenses.rules import resolved, rule_table
    from cuba.defenses.verdict import verdict

    assert resolved(142, 0.01, two_sided=False) and not resolved(142, 0.01, two_sided=True)
    assert not resolved(200, 0.01, two_sided=True) and resolved(201, 0.01, two_sided=True)
    assert not resolved(100, 0.01, two_sided=False) and resolved(101, 0.01, two_sided=False)
    rng = np.random.default_rng(0)
    for n, q in ((200, 0.005), (201, 0.005), (100, 0.01), (101, 0.01), (142, 0.01)):  # against numpy's own choice
        s = rng.permutation(n).astype(float)
        inside = np.quantile(s, q, method="lower") > s.min() and np.quantile(s, 1 - q, method="higher") < s.max()
        assert resolved(n, q, two_sided=False) == inside, n
    small = rule_table(rng.normal(size=142), rng.normal(size=50), rng.normal(size=50), one_sided="lower")
    assert small["unresolved_rules"] == ["1pct_two_sided"]
    assert "unresolved_rules" not in rule_table(rng.normal(size=201), rng.normal(size=50), rng.normal(size=50))
    f = {"setting": "cuba-nra2", "auroc": 0.985, "far_at_frr_1pct_two_sided": 0.997, "frr_at_frr_1pct_two_sided": 0.0,
         "n_calib_used": 142, "unresolved_rules": ["1pct_two_sided"]}
    assert rule_headline(f, "FAR@FRR1%", "far_at_frr_1pct_two_sided", "frr_at_frr_1pct_two_sided", "FRR") == (
        "AUROC 0.985, FAR@FRR1% 0.997 (test FRR 0.000) [unresolved: 142 validation inputs]")
    assert verdict(DEFENSES["entropy"], f) is None
    assert verdict(DEFENSES["entropy"], {**f, "unresolved_rules": []}) == "missed"
