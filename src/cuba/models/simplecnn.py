"""The paper's MNIST classifier: two convolutional layers followed by three fully connected layers."""

from __future__ import annotations

import torch
from torch import nn

from .head import FP32Linear


class SimpleCNN(nn.Module):
    """conv(32) -> pool -> conv(64) -> pool -> fc(256) -> fc(128) -> fc(K).

    The convolutions are padded ("same"), so any square input whose side is divisible by 4
    works (16x16 digits, 28x28 MNIST, 32x32 CIFAR); the first linear layer is sized from the
    input instead of being hard-coded for 28x28.
    """

    # post-ReLU outputs of the conv stages, shallow to deep (defenses read them: Fine-pruning
    # prunes the last, NAD aligns attention maps, SentiNet's Grad-CAM looks at the last)
    feature_stages = ("features.1", "features.4")

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"simplecnn needs an image size divisible by 4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        flat = 64 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(inplace=True),
            nn.Linear(256, 128), nn.ReLU(inplace=True), FP32Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
