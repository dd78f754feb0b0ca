"""The defenses: hand-computed pieces, then each defense end to end on a tiny digits BadNets run."""

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
from cuba.defenses.base import (constant_scores, headline_asr_key, headline_asr_key_of, not_applicable, removal_headline,
                                roc_summary, val_threshold)
from cuba.defenses.fine_pruning import FinePruning, apply_channel_mask, channel_activity, prune_mask, prune_point
from cuba.defenses.nad import NAD, attention_map
from cuba.defenses.neural_cleanse import NeuralCleanse, anomaly_indices
from cuba.defenses.scale_up import ScaleUp, empirical_two_sided, scaled_consistency, standardize_by_class, two_sided_rates
from cuba.defenses.sentinet import SentiNet, fit_boundary, top_mask
from cuba.defenses.strip import Strip, calibration_collapse, far_frr, normal_thresholds, strip_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_has_the_paper_defenses_then_the_newer_detectors() -> None:
    assert list(DEFENSES) == ["strip", "neural-cleanse", "sentinet", "fine-pruning", "nad", "scale-up", "entropy", "mm-bd",
                              "cognitive-distillation", "trigger-inversion", "ibd-psc", "dispersion-inversion"]


def test_anomaly_index_by_hand() -> None:
    # median 9.5; |l - M| = .5 2.5 1.5 1.5 .5 7.5 -> MAD 1.5; a = 7.5 / (1.4826 * 1.5) = 3.3725
    a, index, flagged = anomaly_indices([10, 12, 8, 11, 9, 2])
    assert index == pytest.approx(7.5 / (1.4826 * 1.5)) and flagged == [5]
    assert a[1] == pytest.approx(2.5 / (1.4826 * 1.5))  # above the median: never flagged
    _, index, flagged = anomaly_indices([5.0, 5.1, 4.9, 5.0])
    assert flagged == [] and index < 2


def test_top_mask_keeps_the_most_salient_pixels() -> None:
    cams = torch.tensor([[[0.1, 0.9], [0.5, 0.2]]])
    assert top_mask(cams, 0.5).squeeze().tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert top_mask(cams, 0.01).sum() == 1  # at least one pixel


def test_boundary_is_the_quadratic_through_the_bin_maxima() -> None:
    # one point per bin at the bin's max: the fit must reproduce y = x^2 exactly
    xs = np.array([0.05, 0.35, 0.65, 0.95])
    pts = np.c_[np.r_[xs, xs], np.r_[xs**2, xs**2 - 0.1]]
    assert np.allclose(fit_boundary(pts, bins=10), [1.0, 0.0, 0.0], atol=1e-9)


def test_attention_map_by_hand() -> None:
    f = torch.tensor([[[[1.0, -2.0]], [[0.0, 2.0]]]])  # (1, C=2, 1, 2): sum_c |f|^2 = [1, 8]
    assert torch.allclose(attention_map(f), torch.tensor([[1.0, 8.0]]) / np.sqrt(65.0))


class _Const(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_strip_entropy_of_a_uniform_model_is_log2_k() -> None:
    from types import SimpleNamespace

    run = SimpleNamespace(logits=lambda x: _Const([0.0, 0.0, 0.0, 0.0])(x))
    ent = strip_entropy(run, torch.rand(5, 1, 4, 4), torch.rand(3, 1, 4, 4))
    assert torch.allclose(ent, torch.full((5,), 2.0))


class _MeanBrightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([0.5 - m, m - 0.5], 1)


def test_scaled_prediction_consistency_by_hand() -> None:
    from types import SimpleNamespace

    run = SimpleNamespace(logits=_MeanBrightness())
    x = torch.tensor([0.09, 0.6]).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    # 0.09 x (3, 5, 7, 9, 11) = 0.27 0.45 | 0.63 0.81 0.99: predictions 0 0 1 1 1 against 0 -> SPC 2/5;
    # 0.6 scaled saturates at 1 and stays class 1 -> SPC 1
    spc, pred = scaled_consistency(run, x, (3, 5, 7, 9, 11))
    assert spc.tolist() == pytest.approx([0.4, 1.0]) and pred.tolist() == [0, 1]
    assert x[0, 0, 0, 0] == pytest.approx(0.09)  # the input itself is not scaled in place


def test_spc_standardised_per_predicted_class_by_hand() -> None:
    ref = torch.tensor([0.2, 0.4, 0.6, 1.0])
    ref_pred = torch.tensor([0, 0, 1, 1])
    # class 0: mean 0.3, sample std 0.1414; class 1: 0.8, 0.2828; class 2 has no reference images:
    # the global mean 0.55 and sample std sqrt(0.35 / 3) = 0.3416
    z = standardize_by_class(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 2]), ref, ref_pred, 3)
    assert z.tolist() == pytest.approx([0.2 / 0.02**0.5, -0.3 / 0.08**0.5, -0.05 / (0.35 / 3) ** 0.5], rel=1e-5)


def test_channel_activity_and_mask() -> None:
    conv = nn.Conv2d(1, 3, 1, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.rand(4, 1, 2, 2)
    assert torch.allclose(channel_activity(model, conv, x), torch.tensor([1.0, 2.0, 3.0]))
    h = apply_channel_mask(conv, torch.tensor([True, False, True]))
    assert model(x)[0].tolist() == [1.0] * 4 + [0.0] * 4 + [3.0] * 4
    h.remove()


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


def test_fine_pruning_prunes_in_ascending_activation_order() -> None:
    activity = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0])
    assert prune_mask(activity, 0.0).tolist() == [True] * 5
    assert prune_mask(activity, 0.4).tolist() == [True, False, True, False, True]  # 0.5 then 1.0 go first
    assert prune_mask(activity, 0.6).tolist() == [True, False, False, False, True]
    assert prune_mask(torch.tensor([1.0, 1.0, 0.0]), 0.5).tolist() == [True, True, False]


@pytest.mark.parametrize("arch", ["simplecnn", "resnet18", "preactresnet18"])
def test_pruned_channels_are_zero_where_the_head_reads_them(arch: str) -> None:
    """BN(0) is not 0: on a pre-activation net a channel zeroed before its final BN comes back as
    ReLU(bias). The mask must sit where the head reads, and channels are ranked at that point."""
    from cuba.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier(arch, 1, 10, 16).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # trained-looking BNs: shifts that turn a zero input into a positive output
                m.bias.uniform_(0.2, 1.0)
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    head = model.backbone.linear if arch != "simplecnn" else model.backbone.classifier
    seen: list[torch.Tensor] = []
    tap = head.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    x = torch.rand(6, 1, 16, 16)
    module, post, _ = prune_point(model)
    activity = channel_activity(model, module, x, post)
    if arch != "simplecnn":  # the head reads the average-pooled map: ranked activity = what it reads, per channel
        assert torch.allclose(activity, seen[-1].mean(0), atol=1e-5)
    keep = prune_mask(activity, 0.5)
    h = apply_channel_mask(module, keep, post)
    with torch.no_grad():
        model(x)
    h.remove()
    tap.remove()
    feats = seen[-1]
    assert (feats[:, ~keep] == 0).all(), f"{arch}: pruned channels reach the head as {feats[:, ~keep].abs().max():.3g}"
    assert (feats[:, keep] != 0).any()


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


def test_nad_defaults_follow_the_paper() -> None:
    nad = NAD()
    assert nad.epochs == 20 and nad.grad_clip is None  # clipping is an option (METHOD.md), not the default
    assert NAD(grad_clip=5).grad_clip == 5


def test_defense_parameters_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^n_overlay: must be an integer >= 2, got 1"):
        Strip(n_overlay=1)
    with pytest.raises(ConfigError, match=r"^blend: must be sum or alpha, got 'max'"):
        Strip(blend="max")
    with pytest.raises(ConfigError, match=r"^lr: must be > 0, got 0"):
        NeuralCleanse(lr=0)
    with pytest.raises(ConfigError, match=r"^scales: must be a list of amplification factors > 1, got \(0.5,\)"):
        ScaleUp(scales=[0.5])
    with pytest.raises(ConfigError, match=r"^threshold: must be a finite number, got nan"):
        ScaleUp(threshold=float("nan"))


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


def test_neural_cleanse_flags_the_badnets_target_batched_like_one_by_one(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    kw = dict(epochs=25, batches_per_epoch=5, batch_size=16, n_pool=300)
    run_defense("neural-cleanse", run, tmp_path, **kw)
    f = json.loads((tmp_path / "neural-cleanse" / "defense.json").read_text())
    assert f["flagged_classes"] == [0] and f["anomaly_index"] > 2, f["l1_norms"]
    assert len(f["l1_norms"]) == 10 and (tmp_path / "neural-cleanse" / "neural_cleanse.png").is_file()
    # in fp32, batched and one-by-one follow the same per-class trajectories (same mini-batches,
    # element-wise Adam, per-class early stop): equal up to summation order
    one = NeuralCleanse(batched=False, precision="fp32", **kw).reverse(run)
    together = NeuralCleanse(batched=True, precision="fp32", **kw).reverse(run)
    assert np.allclose(one["norm"].numpy(), together["norm"].numpy(), rtol=1e-3, atol=1e-3)
    assert anomaly_indices(one["norm"])[2] == [0]  # the default (bf16 where native) gives the fp32 verdict
    with pytest.raises(ConfigError, match=r"^precision: must be auto or fp32 or bf16, got 'fp16'"):
        NeuralCleanse(precision="fp16")


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
    assert "| fine-pruning | prune_ratio 0: " in md and "| strip | – |" in md and "| 0.5 | " in md
    assert "| prune_ratio | BadNets (CA / ASR) |" in md  # a targeted control: plain ASR, and the title says so
    assert main(["defense-table", str(tmp_path)]) == 2
    assert "has no defenses/<defense>/defense.json" in capsys.readouterr().err


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
    assert "| strip | n/a (calibration collapsed) (1 s) | AUROC 0.100, FAR@FRR1% 0.980 (1 s) | – |" in md
    assert "| scale-up | – | AUROC 0.400, TPR@FPR5% 0.010 (1 s) | – |" in md
    assert "| fine-pruning | prune_ratio 0: 98.0/99.0 → 0.9: 60.0/2.0 (CA/ASR-C) (1 s) | " in md
    assert "→ 0.9: 60.0/41.0 (CA/ASR (ASR-C not recorded)) (1 s) | prune_ratio 0: 98.0/99.0 → 0.9: 60.0/41.0 (CA/ASR) (1 s) |" in md
    assert "| prune_ratio | new (CA / ASR-C) | old (CA / ASR†) | bn (CA / ASR) |" in md
    assert "| 0.9 | 60.0 / 2.0 | 60.0 / 41.0 | 60.0 / 41.0 |" in md and md.endswith(FALLBACK_NOTE)
