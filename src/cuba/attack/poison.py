"""Data-poisoning baselines: a fixed patch trigger and the plan of which training images carry it.

Two attacks of METHOD.md ("Baselines and controls") poison the training set instead of
training a generator:

* ``badnets`` (Gu et al.): a white square in the bottom-right corner; ``poison_rate`` of the
  training images *not* of the target class get the patch and the target label (all-to-one).
* ``ubw-p`` (Li et al., NeurIPS 2022, the poisoning form of the untargeted backdoor watermark):
  the same patch on ``poison_rate`` of all training images, each relabelled with a class drawn
  uniformly at random from all K classes. Uniform over *all* K is the literal reading of
  "uniformly random labels"; 1/K of the poisoned images therefore keep their own label.

The plan is drawn once per run from the run's seed (a poisoned data set is static: the same
images carry the same wrong labels every epoch). The patch is stamped *before* augmentation,
as on a poisoned data set on disk, so random crops can move or clip it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

POISON_ATTACKS = ("badnets", "ubw-p")


class PatchTrigger(nn.Module):
    """x* = (1 - m) * x + m * p with a fixed mask m and pattern p (buffers, so they save with the run).

    It has the generator's call signature (a batch in [0, 1] -> its backdoor twin), so
    evaluation, figures and the defenses treat patch and learned triggers alike.
    """

    def __init__(self, channels: int, image_size: int, patch_size: int = 3, value: float = 1.0) -> None:
        super().__init__()
        if not 1 <= patch_size <= image_size:
            raise ValueError(f"patch_size must lie in [1, image size {image_size}], got {patch_size}")
        mask = torch.zeros(1, 1, image_size, image_size)
        mask[..., image_size - patch_size:, image_size - patch_size:] = 1.0
        self.register_buffer("mask", mask)
        self.register_buffer("pattern", torch.full((1, channels, image_size, image_size), float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * (1.0 - self.mask) + self.pattern * self.mask


@dataclass
class PoisonPlan:
    """Which training images are poisoned (``poisoned``, (N,) bool) and their new labels (``labels``)."""

    poisoned: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> "PoisonPlan":
        return PoisonPlan(self.poisoned.to(device), self.labels.to(device))

    def apply(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, trigger: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Stamp the trigger on the poisoned images among ``idx`` and swap in their labels."""
        m = self.poisoned[idx]
        x = torch.where(m[:, None, None, None], trigger(x).to(x.dtype), x)
        return x, torch.where(m, self.labels[idx], y)


def make_poison_plan(
    attack: str, y_train: torch.Tensor, num_classes: int, rate: float, target: int, generator: torch.Generator,
) -> PoisonPlan:
    """Draw the poisoned subset: ``round(rate * eligible)`` images, eligible = not of the target (badnets) or all (ubw-p)."""
    if attack not in POISON_ATTACKS:
        raise ValueError(f"poisoning attack must be one of {', '.join(POISON_ATTACKS)}, got {attack!r}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"poison rate must lie in (0, 1], got {rate}")
    n = len(y_train)
    eligible = (y_train != target).nonzero().flatten() if attack == "badnets" else torch.arange(n)
    n_poison = max(1, round(rate * len(eligible)))
    chosen = eligible[torch.randperm(len(eligible), generator=generator)[:n_poison]]
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[chosen] = True
    labels = y_train.clone()
    if attack == "badnets":
        labels[chosen] = target
    else:
        labels[chosen] = torch.randint(0, num_classes, (n_poison,), generator=generator)
    return PoisonPlan(poisoned, labels)
