"""The U-Net trigger generator (Ronneberger et al. 2015), sized for small images.

Blocks are double 3x3 conv + BN + ReLU with skip connections. The depth (number of
down-sampling steps) is chosen from the input size so that every down-sampled map keeps an
even side of at least 4 pixels: 28x28 -> depth 2 (28, 14, 7), 32x32 -> depth 3 (32, 16, 8, 4),
16x16 -> depth 2. The network outputs raw values with the input's channel count;
:class:`cuba.models.trigger.TriggerGenerator` turns them into a backdoor image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unet_depth(image_size: int, max_depth: int = 3) -> int:
    """Largest depth <= max_depth such that image_size / 2**depth is a whole number >= 4."""
    depth = 0
    size = image_size
    while depth < max_depth and size % 2 == 0 and size // 2 >= 4:
        size //= 2
        depth += 1
    if depth == 0:
        raise ValueError(f"the U-Net needs an even image size of at least 8, got {image_size}")
    return depth


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 28, base: int = 16, max_depth: int = 3) -> None:
        super().__init__()
        self.depth = unet_depth(image_size, max_depth)
        widths = [base * 2**i for i in range(self.depth + 1)]
        self.inc = _double_conv(in_channels, widths[0])
        self.downs = nn.ModuleList(_double_conv(widths[i], widths[i + 1]) for i in range(self.depth))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(self.depth))
        )
        self.up_convs = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(self.depth)))
        self.out = nn.Conv2d(widths[0], in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for up, conv in zip(self.ups, self.up_convs):
            h = conv(torch.cat([skips.pop(), up(h)], dim=1))
        return self.out(h)
