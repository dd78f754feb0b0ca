"""Hand-computed pieces of single defenses: Neural Cleanse's anomaly index, SentiNet's mask and
boundary, NAD's attention map, STRIP's and SCALE-UP's scores, Fine-pruning's channel ranking and
mask, and the validation of the defenses' parameters.

Split from test_defenses.py (which keeps the end-to-end runs on a trained model): nothing here
trains a model, so these run in a fraction of a second each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cuba.config import ConfigError
from cuba.defenses.fine_pruning import apply_channel_mask, channel_activity, prune_mask, prune_point
from cuba.defenses.nad import NAD, attention_map
from cuba.defenses.neural_cleanse import NeuralCleanse, anomaly_indices
from cuba.defenses.scale_up import ScaleUp, scaled_consistency, standardize_by_class
from cuba.defenses.sentinet import fit_boundary, top_mask
from cuba.defenses.strip import Strip, strip_entropy

from test_defenses import _Const

pytestmark = pytest.mark.usefixtures("one_thread")


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
    # Grad-CAM clips at 0: with fewer positive pixels than asked, the zeros tie -- still exactly k pixels
    sparse = torch.zeros(1, 10, 10)
    sparse[0, 2, 3] = 1.0
    assert top_mask(sparse, 0.1).sum() == 10 and top_mask(sparse, 0.1)[0, 0, 2, 3] == 1

def test_boundary_is_the_quadratic_through_the_bin_maxima() -> None:
    # each bin's highest point lies on y = x^2 (the others below it): the fit must reproduce it exactly
    xs = np.array([0.05, 0.35, 0.65, 0.95])
    pts = np.c_[np.r_[xs, xs + 0.01], np.r_[xs**2, (xs + 0.01)**2 - 0.1]]
    assert np.allclose(fit_boundary(pts, bins=10), [1.0, 0.0, 0.0], atol=1e-9)
    # confidences crowded near the top (as on MNIST, 0.86-0.95): the bins split their range, so a
    # quadratic is fitted through 10 points, not a line through the 2 of fixed bins on [0, 1]
    x = np.linspace(0.86, 0.95, 50)
    crowded = np.c_[x, 1.0 - 30 * (x - 0.9) ** 2]
    assert np.allclose(fit_boundary(crowded, bins=10), [-30.0, 54.0, -23.3], atol=1e-6)
    assert np.allclose(fit_boundary(np.array([[0.9, 0.5], [0.9, 0.7]])), [0.0, 0.0, 0.7])  # one confidence: a level line


def test_attention_map_by_hand() -> None:
    f = torch.tensor([[[[1.0, -2.0]], [[0.0, 2.0]]]])  # (1, C=2, 1, 2): sum_c |f|^2 = [1, 8]
    assert torch.allclose(attention_map(f), torch.tensor([[1.0, 8.0]]) / np.sqrt(65.0))


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
