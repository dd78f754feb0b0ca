"""Model registry: classifiers by name, and the trigger generator.

Add a classifier by writing a module with an ``nn.Module`` taking
``(in_channels, num_classes, image_size)`` and registering it in :data:`CLASSIFIERS` -- or name it
without registering: ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``
(:mod:`cuba.models.external`).
Every classifier built here takes images in [0, 1] and normalises them itself (a
:class:`Normalize` layer with the training set's per-channel mean/std), so attacks and
defenses all work in pixel space.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .external import build_external, check_name, is_external
from .resnet import PreActResNet18, ResNet18
from .simplecnn import SimpleCNN
from .trigger import GENERATOR_MODES, TriggerGenerator
from .unet import UNet, unet_depth

CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "simplecnn": SimpleCNN,
    "resnet18": ResNet18,
    "preactresnet18": PreActResNet18,
}


class Normalize(nn.Module):
    """Per-channel standardisation stored as buffers, so saved weights carry it."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float().clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``Normalize`` followed by a backbone; ``backbone`` is the architecture named in the config."""

    def __init__(self, backbone: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def stages(self) -> list[nn.Module]:
        """The backbone's feature stages, shallow to deep (``feature_stages`` of the architecture).

        Defenses hook these: the last is "the last convolutional layer" of Fine-pruning and
        SentiNet's Grad-CAM, the last three are NAD's attention stages.
        """
        names = getattr(self.backbone, "feature_stages", None)
        if not names:
            raise ValueError(f"{type(self.backbone).__name__} declares no feature_stages; defenses need them")
        return [self.backbone.get_submodule(n) for n in names]


def build_classifier(
    name: str, in_channels: int, num_classes: int, image_size: int,
    mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
) -> Classifier:
    if is_external(name):  # torchvision:NAME, timm:NAME, package.module:factory (models/external.py)
        backbone = build_external(name, in_channels, num_classes, image_size)
    elif name not in CLASSIFIERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(CLASSIFIERS)}, torchvision:NAME, "
                         "timm:NAME or package.module:factory")
    else:
        backbone = CLASSIFIERS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    mean = torch.full((in_channels,), 0.5) if mean is None else mean
    std = torch.full((in_channels,), 0.5) if std is None else std
    return Classifier(backbone, mean, std)


__all__ = [
    "CLASSIFIERS", "GENERATOR_MODES", "Classifier", "Normalize", "TriggerGenerator", "UNet",
    "build_classifier", "build_external", "check_name", "is_external", "unet_depth",
]
