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

:class:`TrainStep` is one whole update on a batch -- that loss (or plain CE on a clean or
warm-up step), the finiteness check, backward, gradient clipping, both optimisers and the lr
schedule. Training (:func:`cuba.train.train`), ``cuba bench`` and benchmarks/step_breakdown.py
all call it, so the step they time is the step that trains.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from .losses import BackdoorObjective

if TYPE_CHECKING:
    from ..config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the trainer adds the step to the message."""


@dataclass
class JointLoss:
    """The total loss and its terms (unweighted), for logging and tests; a clean step has only CE."""

    total: torch.Tensor
    mse: torch.Tensor | None
    ce: torch.Tensor
    backdoor: torch.Tensor | None
    x_backdoor: torch.Tensor | None

    def log(self, eps: float | None = None) -> dict[str, float]:
        """The terms as floats for a progress bar (each ``.item()`` waits for the device)."""
        if self.backdoor is None:
            return {"ce": self.ce.detach().item()}
        assert self.mse is not None
        return {"mse": self.mse.detach().item(), "ce": self.ce.detach().item(), "bd": self.backdoor.detach().item(),
                **({"eps": eps} if eps is not None else {})}


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
    bd = objective(zb, y[:n_bd], rows, cfg)
    return JointLoss(cfg.alpha * mse + cfg.beta * ce + gamma * bd, mse, ce, bd, xb)


class TrainStep:
    """One update of the classifier (and the generator, on joint steps) on one batch.

    ``fwd_f`` / ``fwd_g`` are the modules the passes go through (DDP or compiled wrappers, or
    the plain models); ``classifier`` / ``generator`` own the parameters that are clipped.
    ``target_rows`` (the (K, K) float T(y) matrix on the device) is set by the caller before the
    first joint step: with the ``similar`` vicinity it exists only after the warm-up.
    ``finite`` decides whether a loss may be stepped on (under DDP: the same verdict on every rank).
    """

    def __init__(
        self, cfg: "TrainConfig", classifier: torch.nn.Module, generator: torch.nn.Module | None,
        opt: torch.optim.Optimizer, opt_g: torch.optim.Optimizer | None, sched: Any = None, *,
        objective: BackdoorObjective | None = None, n_bd: int = 0, split_passes: bool = False,
        fwd_f: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fwd_g: Callable[[torch.Tensor], torch.Tensor] | None = None,
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
        finite: Callable[[torch.Tensor], bool] = lambda loss: bool(torch.isfinite(loss)),
    ) -> None:
        self.cfg, self.classifier, self.generator = cfg, classifier, generator
        self.opt, self.opt_g, self.sched = opt, opt_g, sched
        self.objective, self.n_bd, self.split_passes = objective, n_bd, split_passes
        self.fwd_f = fwd_f if fwd_f is not None else classifier
        self.fwd_g = fwd_g if fwd_g is not None else generator
        self.autocast, self.finite = autocast, finite
        self.target_rows: torch.Tensor | None = None
        self._params = list(classifier.parameters())

    def loss(self, x: torch.Tensor, y: torch.Tensor, joint: bool, gamma: float = 0.0) -> JointLoss:
        """The step's loss: :func:`joint_loss` on a joint step, else CE on the (clean or poisoned) batch."""
        with self.autocast():
            if not joint:
                ce = F.cross_entropy(self.fwd_f(x).float(), y)
                return JointLoss(ce, None, ce, None, None)
            if self.objective is None or self.target_rows is None or self.fwd_g is None:
                raise RuntimeError("a joint step needs a backdoor objective, a generator and target_rows")
            return joint_loss(self.fwd_f, self.fwd_g, x, y, self.target_rows, self.objective, self.cfg, gamma,
                              self.n_bd, self.split_passes)

    def update(self, loss: torch.Tensor, joint: bool) -> None:
        """Backward, clip each model's gradient norm to ``grad_clip``, step F (and G on a joint
        step), advance the lr schedule. Clipping keeps the joint objective from blowing up while F
        cannot yet tell x* from x."""
        self.opt.zero_grad(set_to_none=True)
        if self.opt_g is not None:
            self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip)
        if self.opt_g is not None and self.generator is not None:
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.opt_g is not None and joint:
            self.opt_g.step()
        if self.sched is not None:
            self.sched.step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, joint: bool, gamma: float = 0.0) -> JointLoss:
        """:meth:`loss`, then :meth:`update` -- unless the loss is not finite
        (:class:`NonFiniteLossError`: nothing is stepped)."""
        jl = self.loss(x, y, joint, gamma)
        if not self.finite(jl.total):
            raise NonFiniteLossError(f"the loss became {jl.total.detach().item()}")
        self.update(jl.total, joint)
        return jl
