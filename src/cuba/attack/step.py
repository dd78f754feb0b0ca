"""The loss of one joint training step (the paper's Algorithm 1), as one unit a reader can find
and a test can call:

    x* = G(x[:n_bd])                    backdoor twins of the first n_bd images
    z, z* = F(x), F(x*)                 one pass over cat([x, x*]) when F has BatchNorm (it must
                                        see both halves in one batch), two passes otherwise
    L = alpha * MSE(x*, x) + beta * CE(z, y) + gamma * objective(z*, y, T(y))

with the objective summed over T(y) (METHOD.md), or averaged over it when
``cfg.target_reduction == "mean"`` (each target row then sums to 1).

CE is taken on the *clean* logits and the backdoor objective (CUBA's LNF with ``tau`` and the
L2 logit normalisation, or a baseline's loss) on the *backdoor* logits; the generator gets its
gradient through x*, which must not be detached. tests/test_attack.py pins each of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .losses import BackdoorObjective

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class JointLoss:
    """The total loss and its three terms (unweighted), for logging and tests."""

    total: torch.Tensor
    mse: torch.Tensor
    ce: torch.Tensor
    backdoor: torch.Tensor
    x_backdoor: torch.Tensor


def joint_loss(
    classifier: Callable[[torch.Tensor], torch.Tensor], generator: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor, y: torch.Tensor, target_rows: torch.Tensor, objective: BackdoorObjective, cfg: "TrainConfig",
    gamma: float, n_bd: int, split_passes: bool,
) -> JointLoss:
    """alpha * MSE + beta * CE(clean) + gamma * objective(backdoor) on one batch.

    ``target_rows`` is the (K, K) float target matrix (row y = T(y)); ``gamma`` is passed in
    because the training loop ramps it. ``split_passes`` runs F on x and x* separately (only
    valid without BatchNorm and DDP; the caller decides).
    """
    xb = generator(x[:n_bd])
    if split_passes:  # same logits; the clean pass computes no input gradient
        zc, zb = classifier(x), classifier(xb)
    else:
        logits = classifier(torch.cat([x, xb]))
        zc, zb = logits[: len(x)], logits[len(x):]
    mse = (xb.float() - x[:n_bd]).pow(2)
    mse = mse.mean() if cfg.mse_reduction == "mean" else mse.flatten(1).sum(1).mean()
    ce = F.cross_entropy(zc.float(), y)
    rows = target_rows[y[:n_bd]]
    if cfg.target_reduction == "mean":
        rows = rows / rows.sum(dim=1, keepdim=True).clamp(min=1)
    bd = objective(zb, y[:n_bd], rows, cfg.tau, cfg.lnf_eps)
    return JointLoss(cfg.alpha * mse + cfg.beta * ce + gamma * bd, mse, ce, bd, xb)
