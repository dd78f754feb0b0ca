"""CIFAR-style ResNet18 and PreActResNet18 (3x3 stem, stride 1, no max-pool).

These are the ImageNet ResNets adapted to 32x32 inputs as in the CIFAR literature; the paper
uses ResNet18 on CIFAR-10/100 and PreActResNet18 on GTSRB. ``layer1..layer4`` are exposed by
name because the defenses (Fine-pruning, NAD) hook the last stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .head import FP32Linear


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class _CifarResNet(nn.Module):
    preact = False

    # the residual stages' outputs, shallow to deep (read by the defenses; see SimpleCNN)
    feature_stages = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        block = PreActBlock if self.preact else BasicBlock
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, cin, layers = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(block(cin, w, stride), block(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.final_bn = nn.BatchNorm2d(512) if self.preact else nn.Identity()
        self.linear = FP32Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.final_bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class ResNet18(_CifarResNet):
    """ResNet18, CIFAR variant (He et al. 2016)."""

    preact = False


class PreActResNet18(_CifarResNet):
    """Pre-activation ResNet18 (He et al. 2016, "Identity mappings"): BN and ReLU before each conv."""

    preact = True

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__(in_channels, num_classes, image_size)
        self.bn1 = nn.Identity()  # the pre-activation stem has no BN after the first conv
