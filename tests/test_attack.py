"""Tests for cuba.attack: target-set matrices and the backdoor losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cuba.config import make_config
from cuba.attack import (
    OBJECTIVES, TargetSetError, build_targets, explicit_targets, fra_targets, index_targets, lnf_loss,
    push_away_loss, similar_targets, soft_target_ce, validate_targets,
)


def row_set(m: torch.Tensor, y: int) -> set[int]:
    return set(m[y].nonzero().flatten().tolist())


# --- target matrices ---------------------------------------------------------------------------

def test_fra_targets() -> None:
    m = fra_targets(10)
    assert m.shape == (10, 10) and m.dtype == torch.bool
    assert not m.diagonal().any()
    assert m.sum(1).tolist() == [9] * 10
    assert build_targets("fra", 10).equal(m)


def test_index_targets_k2() -> None:
    m = index_targets(10, 2)
    assert row_set(m, 0) == {1, 2}
    assert row_set(m, 8) == {9, 0}
    assert row_set(m, 9) == {0, 1}
    assert m.sum(1).tolist() == [2] * 10
    assert not m.diagonal().any()
    assert build_targets("nra", 10, k=2).equal(m)


def test_index_targets_k_max_equals_fra() -> None:
    assert index_targets(5, 4).equal(fra_targets(5))


def test_similar_targets_top_k_off_diagonal() -> None:
    conf = torch.tensor([
        [0.90, 0.01, 0.05, 0.04],
        [0.02, 0.80, 0.08, 0.10],
        [0.30, 0.01, 0.60, 0.09],
        [0.05, 0.20, 0.15, 0.60],
    ])
    m = similar_targets(conf, 2)
    assert row_set(m, 0) == {2, 3}
    assert row_set(m, 1) == {2, 3}
    assert row_set(m, 2) == {0, 3}
    assert row_set(m, 3) == {1, 2}
    assert not m.diagonal().any()
    assert build_targets("nra", 4, k=2, vicinity="similar", confusion=conf).equal(m)


def test_similar_targets_never_picks_diagonal_even_if_small() -> None:
    conf = torch.tensor([[0.0, 0.5, 0.4], [0.3, 0.0, 0.2], [0.1, 0.9, 0.0]])
    m = similar_targets(conf, 1)
    assert [row_set(m, i) for i in range(3)] == [{1}, {0}, {1}]


def test_explicit_mapping() -> None:
    m = explicit_targets(3, {0: [1, 2], "1": [0], 2: [1]})
    assert [row_set(m, i) for i in range(3)] == [{1, 2}, {0}, {1}]
    assert build_targets("nra", 3, vicinity="explicit", explicit={0: [1, 2], 1: [0], 2: [1]}).equal(m)


def test_explicit_global_set() -> None:
    m = explicit_targets(5, [1, 3])
    assert [row_set(m, i) for i in range(5)] == [{1, 3}, {3}, {1, 3}, {1}, {1, 3}]


@pytest.mark.parametrize("k", [0, 10, 11, -1])
def test_k_out_of_range(k: int) -> None:
    with pytest.raises(TargetSetError, match=r"0 < k < K = 10"):
        index_targets(10, k)
    with pytest.raises(TargetSetError, match=r"0 < k < K"):
        similar_targets(torch.rand(10, 10), k)


def test_explicit_target_set_containing_source() -> None:
    with pytest.raises(TargetSetError, match=r"classes \[1\] contain their own source class"):
        explicit_targets(3, {0: [1], 1: [1, 2], 2: [0]})


def test_explicit_empty_set() -> None:
    with pytest.raises(TargetSetError, match=r"classes \[2\] are empty"):
        explicit_targets(3, {0: [1], 1: [0], 2: []})
    with pytest.raises(TargetSetError, match=r"classes \[1\] are empty"):
        explicit_targets(3, [1])  # global set {1}: T(1) = {1} - {1} is empty


def test_explicit_class_out_of_range() -> None:
    with pytest.raises(TargetSetError, match=r"target class 3 is outside \[0, 3\)"):
        explicit_targets(3, {0: [3], 1: [0], 2: [0]})
    with pytest.raises(TargetSetError, match=r"target class -1 is outside"):
        explicit_targets(3, [0, -1])
    with pytest.raises(TargetSetError, match=r"source class 5 is outside \[0, 3\)"):
        explicit_targets(3, {0: [1], 1: [0], 2: [0], 5: [0]})


def test_explicit_unmapped_class() -> None:
    with pytest.raises(TargetSetError, match=r"classes \[2\] have no target set"):
        explicit_targets(3, {0: [1], 1: [0]})


def test_unknown_variant_and_vicinity() -> None:
    with pytest.raises(TargetSetError, match=r"variant must be one of fra, nra, got 'xra'"):
        build_targets("xra", 10)
    with pytest.raises(TargetSetError, match=r"vicinity must be one of index, similar, explicit, got 'near'"):
        build_targets("nra", 10, vicinity="near")


def test_missing_inputs_for_similar_and_explicit() -> None:
    with pytest.raises(TargetSetError, match="confusion matrix"):
        build_targets("nra", 10, vicinity="similar")
    with pytest.raises(TargetSetError, match="needs 'targets'"):
        build_targets("nra", 10, vicinity="explicit")


def test_validate_targets_rejects_non_square_or_non_bool() -> None:
    with pytest.raises(TargetSetError, match="square bool"):
        validate_targets(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TargetSetError, match="square bool"):
        validate_targets(fra_targets(3).float())


def test_target_set_error_is_value_error() -> None:
    assert issubclass(TargetSetError, ValueError)


# --- losses ------------------------------------------------------------------------------------

def flipped_rows(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return m[y].float()


def test_lnf_loss_matches_hand_computation() -> None:
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.1, 0.2, -0.3, 0.4], [-2.0, 1.0, 1.0, 0.0]])
    t = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.float32)
    tau = 0.1
    total = 0.0
    for zi, ti in zip(z.tolist(), t.tolist()):
        norm = math.sqrt(sum(v * v for v in zi))
        s = [v / norm / tau for v in zi]
        lse = math.log(sum(math.exp(v) for v in s))
        total += -sum(ti[j] * (s[j] - lse) for j in range(4))
    expected = total / 3
    assert lnf_loss(z, t, tau).item() == pytest.approx(expected, rel=1e-5)


def test_lnf_loss_scale_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 10, generator=g)
    t = flipped_rows(torch.arange(6), fra_targets(10))
    base = lnf_loss(z, t, tau=0.1)
    for c in (0.01, 3.0, 1000.0):
        assert lnf_loss(c * z, t, tau=0.1).item() == pytest.approx(base.item(), rel=1e-4)
    # the unnormalised CE is not scale invariant
    assert soft_target_ce(1000.0 * z, t).item() != pytest.approx(soft_target_ce(z, t).item(), rel=1e-2)


def test_lnf_prefers_uniform_over_targets_to_peaked() -> None:
    # K=5, y=0, T(y)={1,2}
    t = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]])
    uniform = torch.tensor([[-1.0, 1.0, 1.0, -1.0, -1.0]])
    peaked = torch.tensor([[-1.0, 2.0, -1.0, -1.0, -1.0]])
    assert lnf_loss(uniform, t, tau=0.1) < lnf_loss(peaked, t, tau=0.1)


def test_soft_target_ce_one_hot_equals_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=g)
    y = torch.tensor([0, 3, 6, 2, 2])
    got = soft_target_ce(z, F.one_hot(y, 7).float())
    assert got.item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    # tau divides the logits
    got_tau = soft_target_ce(z, F.one_hot(y, 7).float(), tau=0.5)
    assert got_tau.item() == pytest.approx(F.cross_entropy(z / 0.5, y).item(), rel=1e-6)


def test_push_away_matches_hand_computation() -> None:
    z = torch.tensor([[1.0, 2.0, 0.0], [0.5, -0.5, 3.0]])
    y = torch.tensor([1, 0])
    expected = 0.0
    for zi, yi in zip(z.tolist(), y.tolist()):
        q = math.exp(zi[yi]) / sum(math.exp(v) for v in zi)
        expected += -math.log(1 - q)
    assert push_away_loss(z, y).item() == pytest.approx(expected / 2, rel=1e-5)


def test_push_away_finite_when_true_class_certain() -> None:
    z = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    loss = push_away_loss(z, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # by hand: log(1 - q_0) = log(2 e^0) - log(e^100 + 2) ~ log 2 - 100, and the true logit's gradient ~ q_0 = 1
    assert loss.item() == pytest.approx(100 - math.log(2), rel=1e-6)
    assert z.grad[0, 0].item() == pytest.approx(1.0, abs=1e-5) and z.grad[0, 1].item() == pytest.approx(-0.5, abs=1e-5)


@pytest.mark.parametrize("margin", [10.0, 20.0, 40.0])
def test_push_away_keeps_pushing_confident_images(margin: float) -> None:
    """The loss must still move an image the model is sure of: a clamp of q_y away from 1 gave zero
    gradient from a margin of about 16 (10 classes) on."""
    z = torch.zeros(1, 10)
    z[0, 3] = margin
    z.requires_grad_(True)
    push_away_loss(z, torch.tensor([3])).backward()
    assert z.grad[0, 3].item() > 0.99


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objectives_finite_gradients_at_zero_logits(name: str) -> None:
    z = torch.zeros(4, 10, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    t = flipped_rows(y, fra_targets(10))
    loss = OBJECTIVES[name](z, y, t, make_config({}))
    loss.backward()
    assert torch.isfinite(loss)
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_lnf_gradient_lowers_true_class_logit() -> None:
    z = torch.randn(1, 10, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = torch.tensor([4])
    lnf_loss(z, flipped_rows(y, fra_targets(10)), tau=0.1).backward()
    # descending the loss pushes the true class down relative to the targets
    assert z.grad[0, 4] > 0
