"""Tests for cuba.metrics: hand-computed CA, ASR, ASR-C, DS, D_p and stealth metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cuba.attack import fra_targets, index_targets
from cuba.metrics import (
    accuracy, attack_success_rate, compute_metrics, dispersibility_score, ds_floor_of, ds_reference,
    effective_classes_per_class, expected_uniform_ds, linf_per_image, per_class_ds, psnr_per_image, ssim_per_image,
    success_mask, ubw_dispersibility,
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
    backdoor = ("asr", "asr_c", "asr_clean_wrong", "asr_pred", "ds", "ds_min", "d_p", "ds_floor", "ds_uniform", "effective_classes")
    assert set(m) == {"ca", *backdoor}
    assert m["ca"] == pytest.approx(0.75)
    assert all(math.isnan(m[k]) for k in backdoor)


def test_compute_metrics_attack_values() -> None:
    y = labels(10)
    pred = (y + 1) % K
    m = compute_metrics(y, y.copy(), pred, index_targets(K, 2), full_range=False)
    assert m["ca"] == 1.0 and m["asr"] == 1.0 and m["asr_c"] == 1.0
    assert m["ds"] == pytest.approx(0.5) and m["ds_min"] == pytest.approx(0.5)
    assert m["d_p"] == pytest.approx(0.0, abs=1e-12)
    assert len(m["ds_per_class"]) == K
    # NRA-2: |H| = 2 -> floor 1 - 1/2; 10 successes per class over 2 targets; all on one -> 1 class
    assert m["ds_floor"] == pytest.approx(0.5)
    assert m["ds_uniform"] == pytest.approx(expected_uniform_ds(10, 2, 2))
    assert m["effective_classes"] == pytest.approx(1.0) and m["effective_classes_per_class"] == pytest.approx([1.0] * K)


# --- DS on its own scale: ds_floor, ds_uniform, effective classes --------------------------------

def test_ds_floor_values_of_method_md() -> None:
    assert ds_floor_of(10) == pytest.approx(0.70, abs=1e-12)
    assert ds_floor_of(43) == pytest.approx(1 - math.sqrt(42) / 43) and round(ds_floor_of(43), 3) == 0.849
    assert round(ds_floor_of(100), 2) == 0.90
    assert ds_floor_of(1) == 1.0  # one target: every histogram is the uniform one


def test_ds_floor_is_the_ds_of_a_collapse() -> None:
    y = labels(7)
    pred = (y + 4) % K
    assert dispersibility_score(y, pred, fra_targets(K), True)[0] == pytest.approx(ds_floor_of(K))
    assert ds_reference(y, pred, fra_targets(K), True)[0] == pytest.approx(ds_floor_of(K))


@pytest.mark.parametrize("h", [0, -3, 2.5])
def test_ds_floor_rejects_bad_sizes(h: float) -> None:
    with pytest.raises(ValueError, match=r"^ds_floor: \|H\| must be a whole number >= 1, got "):
        ds_floor_of(h)


def test_ds_uniform_one_image_is_the_floor() -> None:
    # n_c = 1: whatever the draw, the single prediction is a one-hot on one wrong class
    assert expected_uniform_ds(1, K - 1, K) == pytest.approx(0.7, abs=1e-12)
    y = np.arange(K)
    assert ds_reference(y, (y + 1) % K, fra_targets(K), True) == pytest.approx((0.7, 0.7))


def test_ds_uniform_hand_computed_two_images() -> None:
    # FRA, K = 3, class 0, two images on {1, 2}: same class (prob 1/2) -> one-hot over 3;
    # split (prob 1/2) -> p = (0, 1/2, 1/2): mean sq = ((1/3)^2 + 2 (1/6)^2) / 3 = 1/18
    collapse, split = 1 - math.sqrt(2) / 3, 1 - math.sqrt(1 / 18)
    assert expected_uniform_ds(2, 2, 3) == pytest.approx((collapse + split) / 2, abs=1e-12)
    # NRA-2 (H = T): both on one target -> 0.5, split -> 1.0
    assert expected_uniform_ds(2, 2, 2) == pytest.approx(0.75, abs=1e-12)
    # one target (an all-to-one control read over all K): every draw is the collapse
    assert expected_uniform_ds(7, 1, K) == pytest.approx(ds_floor_of(K), abs=1e-12)


def test_ds_uniform_simulation_matches_exact_and_is_fixed() -> None:
    exact = expected_uniform_ds(30, 3, 4)
    sim = expected_uniform_ds(30, 3, 4, draws=20_000, exact_limit=0)  # forced onto the simulation
    assert sim == pytest.approx(exact, abs=2e-3) and sim != exact
    assert expected_uniform_ds(30, 3, 4, draws=20_000, exact_limit=0, seed=0) == sim  # same seed, same value
    assert expected_uniform_ds(30, 3, 4, draws=20_000, exact_limit=0, seed=1) != sim


@pytest.mark.parametrize(("args", "msg"), [
    ((0, 9, 10), r"n >= 1 successful images and 1 <= \|T\| <= \|H\|, got n=0, \|T\|=9, \|H\|=10"),
    ((5, 0, 10), r"got n=5, \|T\|=0, \|H\|=10"),
    ((5, 4, 3), r"got n=5, \|T\|=4, \|H\|=3"),
])
def test_ds_uniform_rejects_bad_inputs(args: tuple[int, int, int], msg: str) -> None:
    with pytest.raises(ValueError, match=r"^ds_uniform: needs .*" + msg):
        expected_uniform_ds(*args)
    with pytest.raises(ValueError, match=r"^ds_uniform: draws must be >= 1, got 0"):
        expected_uniform_ds(5, 2, 2, draws=0)


def test_balanced_assignment_beats_ds_uniform() -> None:
    # 90 per class spread exactly evenly reaches the FRA maximum 1 - 1/30; random spreading does not
    y = labels(90)
    pred = np.concatenate([[t for t in range(K) if t != c for _ in range(10)] for c in range(K)])
    m = compute_metrics(y, y, pred, fra_targets(K), full_range=True)
    assert m["ds"] == pytest.approx(1 - 1 / 30)
    assert m["ds_floor"] < m["ds_uniform"] < m["ds"]
    assert m["effective_classes"] == pytest.approx(9.0)


def test_ds_reference_only_counts_classes_that_enter_ds() -> None:
    # NRA, explicit targets of different sizes: class 0 -> {1, 2}, class 1 -> {0, 2, 3}, class 2 -> {3},
    # class 3 -> {0}. Class 1 never succeeds, so it is left out of both references (as of DS).
    t = torch.zeros(4, 4, dtype=torch.bool)
    t[0, [1, 2]] = t[1, [0, 2, 3]] = t[2, 3] = t[3, 0] = True
    y = np.array([0, 0, 1, 1, 2, 3])
    pred = np.array([1, 2, 1, 1, 3, 0])
    floor, uniform = ds_reference(y, pred, t, full_range=False)
    assert floor == pytest.approx((ds_floor_of(2) + ds_floor_of(1) + ds_floor_of(1)) / 3)
    assert uniform == pytest.approx((expected_uniform_ds(2, 2, 2) + 1.0 + 1.0) / 3)
    assert math.isnan(per_class_ds(y, pred, t, False)[1])


def test_ds_reference_nan_without_any_success() -> None:
    y = labels(2)
    assert all(math.isnan(v) for v in ds_reference(y, y, fra_targets(K), True))
    m = compute_metrics(y, y, y, fra_targets(K), full_range=True)
    assert math.isnan(m["ds_uniform"]) and math.isnan(m["effective_classes"])


def _full_test_set(counts: list[int], targets: torch.Tensor, full_range: bool) -> dict:
    """Metrics of an attack that succeeds on every test image (only the counts matter here)."""
    y = np.repeat(np.arange(len(counts)), counts)
    first = targets.long().argmax(1).numpy()  # some target of each class
    return compute_metrics(y, y, first[y], targets, full_range)


MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
GTSRB_TEST = [60, 720, 750, 450, 660, 630, 150, 450, 450, 480, 660, 420, 690, 720, 270, 210, 150, 360, 390, 60, 90, 90,
              120, 150, 90, 480, 180, 60, 150, 90, 150, 270, 60, 210, 120, 390, 120, 60, 690, 90, 90, 60, 90]
DIGITS_TEST = [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]  # the bundled digits split (360 images)


@pytest.mark.parametrize(("name", "counts", "targets", "full_range", "method_md", "measured"), [
    ("mnist fra", MNIST_TEST, fra_targets(10), True, 0.965, 0.96536),
    ("mnist nra5", MNIST_TEST, index_targets(10, 5), False, 0.988, 0.98810),
    ("mnist nra2", MNIST_TEST, index_targets(10, 2), False, 0.987, 0.98737),  # exact (2 targets)
    # METHOD.md rounds GTSRB to 0.990; the per-class mean (as DS is averaged) is 0.9880, the
    # image-weighted mean would be 0.991 -- both within the 0.002 METHOD.md's "≈" allows
    ("gtsrb fra", GTSRB_TEST, fra_targets(43), True, 0.990, 0.98796),
    ("digits fra", DIGITS_TEST, fra_targets(10), True, 0.941, 0.94094),
])
def test_ds_uniform_full_test_sets_of_method_md(name: str, counts: list[int], targets: torch.Tensor, full_range: bool,
                                                method_md: float, measured: float) -> None:
    m = _full_test_set(counts, targets, full_range)
    assert m["ds_uniform"] == pytest.approx(measured, abs=5e-4), name
    assert abs(m["ds_uniform"] - method_md) <= 0.0025, name
    assert m["ds_floor"] == pytest.approx(ds_floor_of(len(counts) if full_range else int(targets[0].sum())))


def test_effective_classes_hand_computed() -> None:
    t = fra_targets(K)
    y = labels(90)
    uniform9 = np.concatenate([[t_ for t_ in range(K) if t_ != c for _ in range(10)] for c in range(K)])
    assert effective_classes_per_class(y, uniform9, t) == pytest.approx([9.0] * K)
    assert effective_classes_per_class(y, (y + 1) % K, t) == pytest.approx([1.0] * K)
    # class 0: half on 1, half on 2 -> e^ln2 = 2; class 1: all correct (no success) -> NaN;
    # class 2: one failure (on 2) is ignored, the rest on 0 -> 1
    y3 = np.array([0, 0, 1, 1, 2, 2])
    per = effective_classes_per_class(y3, np.array([1, 2, 1, 1, 2, 0]), fra_targets(3))
    assert per[0] == pytest.approx(2.0) and math.isnan(per[1]) and per[2] == pytest.approx(1.0)
    m = compute_metrics(y3, y3, np.array([1, 2, 1, 1, 2, 0]), fra_targets(3), full_range=True)
    assert m["effective_classes"] == pytest.approx(1.5)  # mean over the classes with a success


def test_asr_split_by_clean_correctness_and_relative_to_the_clean_prediction() -> None:
    # NRA-1, K = 3: T(0) = {1}, T(1) = {2}, T(2) = {0}. Images 1 and 3 are misclassified clean;
    # the backdoor sends each image to T of its *clean prediction*, as a model that keys the
    # trigger to the class it perceives does.
    from cuba.metrics import asr_clean_wrong, asr_relative_to_prediction

    t = index_targets(3, 1)
    y, clean, bd = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 0]), torch.tensor([1, 2, 2, 1])
    assert attack_success_rate(y, bd, t) == pytest.approx(0.5)
    assert attack_success_rate(y, bd, t, clean) == pytest.approx(1.0)  # ASR-C
    assert asr_clean_wrong(y, bd, t, clean) == pytest.approx(0.0)  # T(y_hat) misses T(y) here
    assert asr_relative_to_prediction(y, bd, t, clean) == pytest.approx(1.0)
    m = compute_metrics(y, clean, bd, t, full_range=False)
    assert (m["asr_clean_wrong"], m["asr_pred"]) == (pytest.approx(0.0), pytest.approx(1.0))
    # ASR = CA * ASR-C + (1 - CA) * ASR on clean-wrong images, with CA = 0.5 here
    assert m["asr"] == pytest.approx(0.5 * m["asr_c"] + 0.5 * m["asr_clean_wrong"])
    assert math.isnan(asr_clean_wrong(y, bd, t, y))  # no clean mistake: undefined, not 0
