"""Tests for cuba.models: classifier shapes, the U-Net and the trigger generator."""

from __future__ import annotations

import pytest
import torch

from cuba.models import CLASSIFIERS, Classifier, Normalize, TriggerGenerator, UNet, build_classifier, unet_depth
from cuba.models.simplecnn import SimpleCNN


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("channels,size", [(1, 16), (1, 28), (3, 32)])
def test_simplecnn_shapes(channels: int, size: int) -> None:
    model = build_classifier("simplecnn", channels, 10, size)
    assert isinstance(model, Classifier)
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "preactresnet18"])
@pytest.mark.parametrize("channels,size,k", [(3, 32, 10), (1, 28, 43)])
def test_resnet_shapes(name: str, channels: int, size: int, k: int) -> None:
    model = build_classifier(name, channels, k, size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, k)
    assert torch.isfinite(out).all()


def test_resnet_exposes_named_layers() -> None:
    model = build_classifier("resnet18", 3, 10, 32)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        assert hasattr(model.backbone, name)


def test_simplecnn_rejects_size_not_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="divisible by 4, got 30"):
        SimpleCNN(1, 10, 30)


def test_build_classifier_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError) as e:
        build_classifier("vgg", 3, 10, 32)
    msg = str(e.value)
    assert "'vgg'" in msg
    for name in CLASSIFIERS:
        assert name in msg


def test_normalize_uses_mean_and_std() -> None:
    norm = Normalize(torch.tensor([0.5, 0.25]), torch.tensor([0.5, 0.25]))
    x = torch.tensor([1.0, 0.5]).reshape(1, 2, 1, 1)
    assert torch.allclose(norm(x).flatten(), torch.tensor([1.0, 1.0]))
    # buffers travel with the state dict
    assert {"mean", "std"} <= set(norm.state_dict())


# --- U-Net / generator -------------------------------------------------------------------------

@pytest.mark.parametrize("size,depth", [(28, 2), (32, 3), (16, 2), (8, 1), (12, 1), (20, 2), (64, 3)])
def test_unet_depth(size: int, depth: int) -> None:
    assert unet_depth(size) == depth


@pytest.mark.parametrize("size", [7, 15, 6, 4, 2])
def test_unet_depth_rejects_odd_or_small(size: int) -> None:
    with pytest.raises(ValueError, match=f"even image size of at least 8, got {size}"):
        unet_depth(size)


@pytest.mark.parametrize("channels,size", [(1, 16), (1, 28), (3, 32)])
def test_unet_and_generator_keep_shape(channels: int, size: int) -> None:
    x = torch.rand(2, channels, size, size)
    unet = UNet(channels, size, base=4)
    assert unet(x).shape == x.shape
    for mode in ("residual", "image"):
        gen = TriggerGenerator(channels, size, mode=mode, eps=0.1, base=4)
        assert gen(x).shape == x.shape


def _saturate(gen: TriggerGenerator) -> None:
    """Scale the output conv so tanh/sigmoid saturate: the bound is then actually reached."""
    with torch.no_grad():
        gen.unet.out.weight.mul_(1000.0)
        gen.unet.out.bias.fill_(0.0)


@pytest.mark.parametrize("eps", [0.03, 0.1, 0.5])
def test_residual_mode_respects_linf_bound(eps: float) -> None:
    torch.manual_seed(0)
    gen = TriggerGenerator(1, 16, mode="residual", eps=eps, base=4)
    _saturate(gen)
    x = torch.rand(4, 1, 16, 16) * 0.6 + 0.2  # away from 0/1 so clipping does not hide the bound
    with torch.no_grad():
        out = gen(x)
    diff = (out - x).abs().max().item()
    assert diff <= eps + 1e-6
    assert diff >= 0.9 * eps  # saturated: the bound is (nearly) attained, so the check has teeth
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_residual_mode_clips_to_unit_range() -> None:
    torch.manual_seed(0)
    gen = TriggerGenerator(1, 16, mode="residual", eps=0.5, base=4)
    _saturate(gen)
    x = torch.cat([torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)])
    with torch.no_grad():
        out = gen(x)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_residual_eps_attribute_can_be_annealed() -> None:
    torch.manual_seed(0)
    gen = TriggerGenerator(1, 16, mode="residual", eps=0.5, base=4)
    _saturate(gen)
    gen.eps = 0.02
    x = torch.full((2, 1, 16, 16), 0.5)
    with torch.no_grad():
        assert (gen(x) - x).abs().max().item() <= 0.02 + 1e-6


def test_image_mode_output_in_open_unit_interval() -> None:
    torch.manual_seed(0)
    gen = TriggerGenerator(3, 16, mode="image", eps=0.1, base=4)
    with torch.no_grad():
        out = gen(torch.rand(2, 3, 16, 16))
    assert out.min() > 0.0 and out.max() < 1.0


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "additive"}, "generator mode must be one of residual, image"),
    ({"eps": 0.0}, r"eps must lie in \(0, 1\]"),
    ({"eps": -0.1}, r"eps must lie in \(0, 1\]"),
    ({"eps": 1.5}, r"eps must lie in \(0, 1\]"),
])
def test_generator_rejects_bad_mode_or_eps(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TriggerGenerator(1, 16, **kwargs)


def test_residual_bound_holds_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    gen = TriggerGenerator(1, 16, mode="residual", eps=0.05, base=4)
    _saturate(gen)
    x = torch.rand(4, 1, 16, 16) * 0.6 + 0.2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = gen(x)
    assert (out.float() - x).abs().max().item() <= 0.05 + 1e-6


@pytest.mark.parametrize("name", ["simplecnn", "resnet18", "preactresnet18"])
def test_logits_are_fp32_under_bf16_autocast(name: str) -> None:
    model = build_classifier(name, 1, 10, 16 if name == "simplecnn" else 8).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 16 if name == "simplecnn" else 8, 16 if name == "simplecnn" else 8))
    assert out.dtype == torch.float32


def test_half_resolution_generator_keeps_shape_and_bound() -> None:
    gen = TriggerGenerator(1, 28, mode="residual", eps=0.05, base=4, scale=2)
    assert gen.unet.depth == 1  # 14x14 -> 7x7
    x = torch.rand(3, 1, 28, 28)
    out = gen(x)
    assert out.shape == x.shape and (out - x).abs().max() <= 0.05 + 1e-6
    full = TriggerGenerator(1, 28, base=4)
    assert sum(p.numel() for p in gen.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="generator scale must be a divisor of the image size 28, got 3"):
        TriggerGenerator(1, 28, scale=3)
