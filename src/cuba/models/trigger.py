"""Turns the U-Net's raw output into a backdoor image (METHOD.md §1, "Generator output").

Two modes, because the paper's "the U-Net transforms the image" admits two readings:

* ``residual``: x* = clip(x + eps * tanh(G(x)), 0, 1). The L-infinity distance to x is at most
  ``eps`` by construction, so the trigger's stealth has a hard floor
  (PSNR >= 20*log10(1/eps) dB). ``eps`` is a plain attribute so the trainer can anneal it
  (start visibly distinct, end stealthy -- the remedy for the residual-mode collapse).
* ``image``: x* = sigmoid(G(x)), the literal reading; stealth then comes only from the MSE term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNet

GENERATOR_MODES = ("residual", "image")


class TriggerGenerator(nn.Module):
    def __init__(self, in_channels: int, image_size: int, mode: str = "residual", eps: float = 0.1, base: int = 16,
                 scale: int = 1) -> None:
        super().__init__()
        if mode not in GENERATOR_MODES:
            raise ValueError(f"generator mode must be one of {', '.join(GENERATOR_MODES)}, got {mode!r}")
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"eps must lie in (0, 1], got {eps}")
        if scale < 1 or image_size % scale:
            raise ValueError(f"generator scale must be a divisor of the image size {image_size}, got {scale}")
        self.mode = mode
        self.eps = float(eps)
        # scale > 1: the U-Net works on an average-pooled image and its output is upsampled
        # (bilinear) -- about scale^2 times cheaper, with a smoother trigger
        self.scale = scale
        self.unet = UNet(in_channels, image_size // scale, base=base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale > 1:
            small = self.unet(F.avg_pool2d(x, self.scale))
            raw = F.interpolate(small.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        else:
            raw = self.unet(x).float()
        # the bound is applied in fp32: under bf16 autocast eps itself would round (0.05 -> 0.05005)
        if self.mode == "image":
            return torch.sigmoid(raw)
        return (x.float() + self.eps * torch.tanh(raw)).clamp(0.0, 1.0)
