"""Tests for cuba.metrics: hand-computed CA, ASR, ASR-C, DS, D_p and stealth metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cuba.attack import fra_targets, index_targets
from cuba.metrics import (
    accuracy, attack_success_rate, compute_metrics, dispersibility_score, linf_per_image, per_class_ds,
    psnr_per_image, ssim_per_image, success_mask, ubw_dispersibility,
)

K = 10


def labels(per_class: int, k: int = K) -> np.ndarray:
    """``per_class`` images of every class 0..k-1, grouped by class."""
    return np.repeat(np.arange(k), per_class)


# --- DS ----------------------------------------------------------------------------------------

def test_ds_fra_all_on_one_wrong_class_is_070() -> None:
    y = labels(20)
    pred = (y + 3) % K  # every class collapses onto a single (wrong) class
    per = per_class_ds(y, pred, fra_targets(K), full_range=True)
    # p = one-hot over K=10: mean sq = (0.9^2 + 9 * 0.1^2) / 10 = 0.09 -> DS_c = 1 - 0.3
    assert per == pytest.approx([0.7] * K, abs=1e-9)
    ds, ds_min = dispersibility_score(y, pred, fra_targets(K), full_range=True)
    assert ds == pytest.approx(0.7, abs=1e-9) and ds_min == pytest.approx(0.7, abs=1e-9)


def test_ds_fra_uniform_over_wrong_classes() -> None:
    # 90 backdoor images per class, 10 on each of the 9 wrong classes
    y = labels(90)
    pred = np.concatenate([[t for t in range(K) if t != c for _ in range(10)] for c in range(K)])
    assert len(pred) == len(y)
    assert (pred != y).all()
    ds, ds_min = dispersibility_score(y, pred, fra_targets(K), full_range=True)
    # p_j = 1/9 on 9 classes, 0 on y: mean sq = (9*(1/90)^2 + 0.1^2)/10 = 1/900 -> 1 - 1/30
    assert ds == pytest.approx(1 - 1 / 30, abs=1e-9)
    assert ds_min == pytest.approx(1 - 1 / 30, abs=1e-9)


def test_ds_fra_full_range_false_uniform_over_targets_is_one() -> None:
    y = labels(90)
    pred = np.concatenate([[t for t in range(K) if t != c for _ in range(10)] for c in range(K)])
    ds, _ = dispersibility_score(y, pred, fra_targets(K), full_range=False)
    assert ds == pytest.approx(1.0, abs=1e-9)


def test_ds_nra2_uniform_over_targets_is_one() -> None:
    t = index_targets(K, 2)
    y = labels(10)
    pred = np.where(np.arange(len(y)) % 2 == 0, (y + 1) % K, (y + 2) % K)
    ds, ds_min = dispersibility_score(y, pred, t, full_range=False)
    assert ds == pytest.approx(1.0, abs=1e-9) and ds_min == pytest.approx(1.0, abs=1e-9)


def test_ds_nra2_all_on_one_target_is_half() -> None:
    t = index_targets(K, 2)
    y = labels(10)
    pred = (y + 1) % K
    expected = 1 - math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 2)
    assert expected == pytest.approx(0.5)
    ds, ds_min = dispersibility_score(y, pred, t, full_range=False)
    assert ds == pytest.approx(expected, abs=1e-9) and ds_min == pytest.approx(expected, abs=1e-9)


def test_ds_ignores_unsuccessful_images() -> None:
    # NRA-2: class 0 has 2 images on target 1, 2 on target 2, and 4 failures (on 0 and 5)
    t = index_targets(K, 2)
    y = np.zeros(8, dtype=np.int64)
    pred = np.array([1, 1, 2, 2, 0, 0, 5, 5])
    assert per_class_ds(y, pred, t, full_range=False)[0] == pytest.approx(1.0, abs=1e-9)


def test_ds_class_without_success_is_nan_and_excluded() -> None:
    t = fra_targets(3)
    # class 0: all on 1 (DS_0 = 1 - sqrt(((1-1/3)^2 + 2*(1/3)^2)/3)); class 1: all correct (no success);
    # class 2: split evenly over 0 and 1 (DS_2 = 1 - sqrt(2*(1/2-1/3)^2 + (1/3)^2)/3))
    y = np.array([0, 0, 1, 1, 1, 2, 2])
    pred = np.array([1, 1, 1, 1, 1, 0, 1])
    per = per_class_ds(y, pred, t, full_range=True)
    ds0 = 1 - math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)
    ds2 = 1 - math.sqrt((2 * (1 / 6) ** 2 + (1 / 3) ** 2) / 3)
    assert per[0] == pytest.approx(ds0, abs=1e-9)
    assert math.isnan(per[1])
    assert per[2] == pytest.approx(ds2, abs=1e-9)
    ds, ds_min = dispersibility_score(y, pred, t, full_range=True)
    assert ds == pytest.approx((ds0 + ds2) / 2, abs=1e-9)
    assert ds_min == pytest.approx(min(ds0, ds2), abs=1e-9)


def test_ds_no_success_at_all_is_nan() -> None:
    y = labels(3)
    ds, ds_min = dispersibility_score(y, y, fra_targets(K), full_range=True)
    assert math.isnan(ds) and math.isnan(ds_min)


# --- ASR / ASR-C / CA --------------------------------------------------------------------------

def test_asr_fra_is_prediction_differs_from_label() -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    pred = np.array([0, 2, 2, 9, 4, 0, 6, 1])  # wrong at indices 1, 3, 5, 7
    assert attack_success_rate(y, pred, fra_targets(K)) == pytest.approx(4 / 8)
    assert success_mask(y, pred, fra_targets(K)).tolist() == [p != t for p, t in zip(pred, y)]


def test_asr_nra_is_prediction_in_target_set() -> None:
    t = index_targets(K, 2)  # T(y) = {y+1, y+2}
    y = np.array([0, 0, 0, 0, 9, 9, 9, 5])
    pred = np.array([1, 2, 3, 0, 0, 1, 2, 7])  # in T(y): yes, yes, no, no, yes, yes, no, yes
    assert success_mask(y, pred, t).tolist() == [True, True, False, False, True, True, False, True]
    assert attack_success_rate(y, pred, t) == pytest.approx(5 / 8)


def test_asr_c_restricted_to_clean_correct_images() -> None:
    y = np.array([0, 1, 2, 3, 4, 5])
    clean = np.array([0, 1, 2, 3, 0, 0])  # correct on the first four only
    bd = np.array([5, 1, 7, 3, 9, 9])  # success on 0, 2 (among the kept), also 4, 5 (dropped)
    t = fra_targets(K)
    assert attack_success_rate(y, bd, t) == pytest.approx(4 / 6)
    assert attack_success_rate(y, bd, t, y_pred_clean=clean) == pytest.approx(2 / 4)


def test_asr_c_nan_when_no_clean_correct_image() -> None:
    y = np.array([0, 1])
    assert math.isnan(attack_success_rate(y, np.array([1, 0]), fra_targets(2), y_pred_clean=np.array([1, 0])))


def test_accuracy() -> None:
    assert accuracy(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 0])) == pytest.approx(0.5)
    assert accuracy(torch.tensor([3, 3, 3]), torch.tensor([3, 3, 3])) == 1.0


def test_accuracy_rejects_length_mismatch_and_empty() -> None:
    with pytest.raises(ValueError, match="equally long"):
        accuracy(np.array([0, 1, 2]), np.array([0, 1]))
    with pytest.raises(ValueError):
        accuracy(np.array([], dtype=np.int64), np.array([], dtype=np.int64))


# --- D_p ---------------------------------------------------------------------------------------

def test_dp_uniform_over_nine_classes_is_ln9() -> None:
    y = labels(90)
    pred = np.concatenate([[t for t in range(K) if t != c for _ in range(10)] for c in range(K)])
    assert ubw_dispersibility(y, pred, K) == pytest.approx(math.log(9), abs=1e-9)


def test_dp_all_in_one_class_is_zero() -> None:
    y = labels(5)
    assert ubw_dispersibility(y, np.full_like(y, 4), K) == pytest.approx(0.0, abs=1e-12)


def test_dp_mixed_classes_averaged() -> None:
    # class 0: half on 1, half on 2 -> ln 2; class 1: all on 0 -> 0; mean ln2 / 2
    y = np.array([0, 0, 1, 1])
    pred = np.array([1, 2, 0, 0])
    assert ubw_dispersibility(y, pred, 3) == pytest.approx(math.log(2) / 2, abs=1e-9)


# --- stealth -----------------------------------------------------------------------------------

def test_psnr_constant_offset_is_20db() -> None:
    clean = torch.full((3, 1, 8, 8), 0.4)
    out = psnr_per_image(clean, clean + 0.1)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), 20.0), atol=1e-3)


def test_psnr_identical_capped_at_100() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(psnr_per_image(x, x.clone()), torch.full((2,), 100.0))


def test_linf() -> None:
    clean = torch.zeros(2, 1, 4, 4)
    bd = clean.clone()
    bd[0, 0, 1, 2] = -0.25
    bd[0, 0, 3, 3] = 0.1
    bd[1, 0, 0, 0] = 0.5
    assert torch.allclose(linf_per_image(clean, bd), torch.tensor([0.25, 0.5]))


def test_ssim_identical_is_one_and_noisy_below_one() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert np.allclose(ssim_per_image(x, x.clone()), 1.0)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ssim_per_image(x, noisy)
    assert s.shape == (2,) and (s < 0.99).all()


def test_ssim_small_even_image_works() -> None:
    x = torch.rand(1, 1, 6, 6)
    assert np.allclose(ssim_per_image(x, x.clone()), 1.0)


# --- compute_metrics ---------------------------------------------------------------------------

def test_compute_metrics_clean_model_has_nan_backdoor_keys() -> None:
    y = np.array([0, 1, 2, 2])
    m = compute_metrics(y, np.array([0, 1, 2, 0]), None, None, full_range=True)
    assert set(m) == {"ca", "asr", "asr_c", "ds", "ds_min", "d_p"}
    assert m["ca"] == pytest.approx(0.75)
    assert all(math.isnan(m[k]) for k in ("asr", "asr_c", "ds", "ds_min", "d_p"))


def test_compute_metrics_attack_values() -> None:
    y = labels(10)
    pred = (y + 1) % K
    m = compute_metrics(y, y.copy(), pred, index_targets(K, 2), full_range=False)
    assert m["ca"] == 1.0 and m["asr"] == 1.0 and m["asr_c"] == 1.0
    assert m["ds"] == pytest.approx(0.5) and m["ds_min"] == pytest.approx(0.5)
    assert m["d_p"] == pytest.approx(0.0, abs=1e-12)
    assert len(m["ds_per_class"]) == K
