"""Batched on-device augmentation: random crop with zero padding, and horizontal flip.

One call transforms a whole batch with tensor ops (one pad, one gather, one where), so the
training loop never touches single images in Python -- the conventional per-sample PIL
pipeline is what makes DataLoader-based backdoor code slow on small images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (padding for random crop, horizontal flip) per named data set; METHOD.md §3.
DEFAULT_AUGMENT: dict[str, tuple[int, bool]] = {
    "cifar10": (4, True), "cifar100": (4, True), "gtsrb": (4, False),
    "mnist": (0, False), "fashion-mnist": (0, False), "digits": (0, False),
}


def augment_policy(setting: str, dataset: str) -> tuple[int, bool]:
    """Resolve ``auto|none|crop|crop+flip`` to (pad, flip). Unknown data sets get none under auto."""
    if setting == "auto":
        return DEFAULT_AUGMENT.get(dataset, (0, False))
    return {"none": (0, False), "crop": (4, False), "crop+flip": (4, True)}[setting]


def augment_batch(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-crop (after ``pad`` zero pixels each side) and randomly flip a (B, C, H, W) batch."""
    if pad == 0 and not flip:
        return x
    b, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])  # (B, H)
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])  # (B, W)
        bi = torch.arange(b, device=dev)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()
