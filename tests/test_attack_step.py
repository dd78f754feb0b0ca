"""The joint training step's wiring (cuba.attack.step.joint_loss) and the adaptive attackers'
objectives: each test names the mutation of src/cuba/attack/step.py or losses.py it catches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cuba.attack import OBJECTIVES, fra_targets, index_targets, lnf_loss, soft_target_ce
from cuba.config import ConfigError, make_config
from test_attack import flipped_rows


# --- the joint step's wiring (cuba.attack.step.joint_loss) ----------------------------------------
# Each test names the mutation it catches; each was checked by applying that mutation to
# src/cuba/attack/step.py and watching the test fail.

def _step_inputs(alpha: float = 1.0, beta: float = 1.0, tau: float = 0.1):
    from cuba.config import make_config
    from cuba.models import build_classifier

    torch.manual_seed(0)
    cfg = make_config({"alpha": alpha, "beta": beta, "tau": tau})
    classifier = build_classifier("simplecnn", 1, 10, 16)
    x = torch.rand(8, 1, 16, 16)
    y = torch.arange(8) % 10
    return cfg, classifier, x, y, fra_targets(10).float()


def _hand_lnf(z: torch.Tensor, rows: torch.Tensor, tau: float) -> torch.Tensor:
    zn = z / (z.norm(dim=1, keepdim=True) + 1e-7)
    return -(F.log_softmax(zn / tau, dim=1) * rows).sum(1).mean()


def test_generator_gets_a_gradient_from_the_backdoor_term_alone() -> None:
    # mutation caught: x* = G(x).detach() (alpha = beta = 0 isolates the LNF term: MSE alone would also move G)
    from cuba.attack.step import joint_loss
    from cuba.models import TriggerGenerator

    cfg, classifier, x, y, rows = _step_inputs(alpha=0.0, beta=0.0)
    gen = TriggerGenerator(1, 16, "residual", 0.3, 8, 1)
    jl = joint_loss(classifier, gen, x, y, rows, OBJECTIVES["cuba"], cfg, gamma=5.0, n_bd=8, split_passes=True)
    jl.total.backward()
    grads = [p.grad for p in gen.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_ce_reads_clean_logits_and_the_objective_backdoor_logits() -> None:
    # mutation caught: CE and the backdoor objective swapped (or both on one half of the batch)
    from cuba.attack.step import joint_loss

    cfg, classifier, x, y, rows = _step_inputs()
    seen = {}

    def spy(z, y_, t, cfg_):  # noqa: ANN001
        seen["z"], seen["t"] = z.detach().clone(), t.clone()
        return z.sum() * 0

    for split in (True, False):
        classifier.eval()  # SimpleCNN has no BN: one pass or two give the same logits
        jl = joint_loss(classifier, lambda a: 1 - a, x, y, rows, spy, cfg, gamma=1.0, n_bd=8, split_passes=split)
        with torch.no_grad():
            assert torch.allclose(seen["z"], classifier(1 - x), atol=1e-5)
            assert jl.ce.detach().item() == pytest.approx(float(F.cross_entropy(classifier(x), y)), rel=1e-5)
        assert torch.equal(seen["t"], rows[y])  # T(y) of each sample, not of another


def test_total_is_alpha_mse_plus_beta_ce_plus_gamma_lnf_with_cfg_tau() -> None:
    # mutations caught: tau dropped (lnf at tau 1), the L2 normalisation dropped, a weight ignored
    from cuba.attack.step import joint_loss

    for tau in (0.1, 0.5):
        cfg, classifier, x, y, rows = _step_inputs(alpha=2.0, beta=3.0, tau=tau)
        scaled = lambda a: 7.0 * classifier(a)  # noqa: E731 -- logits far from unit norm
        jl = joint_loss(scaled, lambda a: (a + 0.1).clamp(0, 1), x, y, rows, OBJECTIVES["cuba"], cfg, gamma=5.0, n_bd=8,
                        split_passes=True)
        with torch.no_grad():
            xb = (x + 0.1).clamp(0, 1)
            lnf = _hand_lnf(scaled(xb), rows[y], tau)
            mse = (xb - x).pow(2).mean()
            ce = F.cross_entropy(scaled(x), y)
        assert jl.backdoor.detach().item() == pytest.approx(float(lnf), rel=1e-5)
        with torch.no_grad():
            at_tau_1, unnormalised = _hand_lnf(scaled(xb), rows[y], 1.0), soft_target_ce(scaled(xb), rows[y], tau=tau)
        assert jl.backdoor.detach().item() != pytest.approx(float(at_tau_1), rel=1e-3)
        assert jl.backdoor.detach().item() != pytest.approx(float(unnormalised), rel=1e-3)
        assert jl.total.detach().item() == pytest.approx(float(2.0 * mse + 3.0 * ce + 5.0 * lnf), rel=1e-5)


def test_target_reduction_mean_divides_the_objective_by_the_target_set_size() -> None:
    # mutation caught: target_reduction ignored (NRA-2 summed like FRA), or rows normalised under "sum"
    from cuba.attack.step import joint_loss
    from cuba.config import ConfigError, make_config

    cfg, classifier, x, y, _ = _step_inputs()
    rows = index_targets(10, 2).float()
    for reduction, scale in (("sum", 1.0), ("mean", 0.5)):
        c = make_config({**cfg.__dict__, "target_reduction": reduction})
        jl = joint_loss(classifier, lambda a: (a + 0.1).clamp(0, 1), x, y, rows, OBJECTIVES["cuba"], c, gamma=1.0,
                        n_bd=8, split_passes=True)
        with torch.no_grad():
            lnf = _hand_lnf(classifier((x + 0.1).clamp(0, 1)), rows[y], c.tau)
        assert jl.backdoor.detach().item() == pytest.approx(scale * float(lnf), rel=1e-5)
    with pytest.raises(ConfigError, match="target_reduction: must be one of sum, mean, got 'max'"):
        make_config({"target_reduction": "max"})


def test_evaluation_runs_without_autocast_even_on_a_bf16_engine() -> None:
    # mutation caught: predict() wrapped in engine.autocast() (bf16 turns CUBA's near-tie logits into ties)
    from cuba.data import ImageDataset
    from cuba.engine import Engine
    from cuba.evaluate import predict

    dtypes = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = torch.ones(x[0].numel(), 3)
            out = x.flatten(1) @ w
            dtypes.append(out.dtype)
            return out

    data = ImageDataset("t", torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.arange(6) % 3,
                        torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.arange(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # sanity: the probe does see autocast when it is on
        Probe()(torch.rand(2, 1, 4, 4))
    assert dtypes.pop() == torch.bfloat16
    predict(Probe(), None, data, Engine(torch.device("cpu"), bf16=True, channels_last=False), stealth=False)
    assert dtypes and all(d == torch.float32 for d in dtypes)


def test_cuba_adaptive_adds_the_weighted_prediction_entropy_to_lnf() -> None:
    # mutations caught: adaptive_weight ignored, entropy of the wrong distribution, sign flipped
    from cuba.attack.losses import prediction_entropy

    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax (1/2, 1/2) and (3/4, 1/4)
    h = (math.log(2.0) + -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 2
    assert float(prediction_entropy(z)) == pytest.approx(h, rel=1e-6)
    logits, y = torch.randn(6, 5), torch.arange(6) % 5
    t = flipped_rows(y, fra_targets(5))
    for w in (0.0, 2.5):
        cfg = make_config({"attack": "cuba-adaptive", "adaptive_weight": w})
        want = lnf_loss(logits, t, cfg.tau) + w * prediction_entropy(logits)
        assert float(OBJECTIVES["cuba-adaptive"](logits, y, t, cfg)) == pytest.approx(float(want), rel=1e-6)
    assert make_config({"attack": "cuba-adaptive"}).label() == "cuba-adaptive-fra"
    with pytest.raises(ConfigError, match="adaptive_weight: must be a number >= 0"):
        make_config({"adaptive_weight": -1})


def test_cuba_adaptive_set_by_hand_and_its_preference() -> None:
    """-log q(T(y)) + w * mean H(q_i) - mean over source classes of H(mean q): pinned on a hand case,
    and its point: confident inputs spread *between* them beat both a collapse onto one wrong class
    and a spread inside each input (mutations caught: the set term dropped or its sign flipped, the
    weight ignored, the mass taken outside T(y))."""
    import math

    from cuba.attack.losses import set_dispersed_loss

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    t = torch.tensor([[0.0, 1, 1], [0, 1, 1], [1, 0, 1]])
    q = torch.softmax(logits, dim=1).double()
    land = -torch.log((q * t).sum(1)).mean()
    h = -(q * q.log()).sum(1).mean()
    m0, m1 = q[:2].mean(0), q[2]
    hs = (-(m0 * m0.log()).sum() - (m1 * m1.log()).sum()) / 2
    for w in (0.0, 2.5):
        want = land + w * h - hs
        assert float(set_dispersed_loss(logits, y, t, w)) == pytest.approx(float(want), rel=1e-5)
        cfg = make_config({"attack": "cuba-adaptive-set", "adaptive_weight": w})
        assert float(OBJECTIVES["cuba-adaptive-set"](logits, y, t, cfg)) == pytest.approx(float(want), rel=1e-5)
    big = 30.0  # near one-hot rows
    yy, tt = torch.tensor([0, 0]), torch.tensor([[0.0, 1, 1], [0, 1, 1]])
    spread_between = torch.tensor([[0, big, 0], [0, 0, big]])
    collapsed = torch.tensor([[0, big, 0], [0, big, 0]])
    spread_inside = torch.tensor([[0, big, big], [0, big, big]])
    a, b, c = (float(set_dispersed_loss(z, yy, tt, 1.0)) for z in (spread_between, collapsed, spread_inside))
    assert a == pytest.approx(-math.log(2), abs=1e-6) and b == pytest.approx(0.0, abs=1e-6) and c == pytest.approx(0.0, abs=1e-6)
    assert make_config({"attack": "cuba-adaptive-set"}).label() == "cuba-adaptive-set-fra"
