"""Fine-pruning (Liu et al., RAID 2018): backdoor behaviour often lives in channels that clean
inputs barely use, so pruning the least-active channels of the last convolutional stage should
remove it before it costs clean accuracy.

Where to prune. A pruned channel must stay zero all the way to the classifier, or it is not
pruned. On ResNet18 the last stage (``Classifier.stages()[-1]``, ``layer4``) ends in a ReLU and
SimpleCNN's last stage *is* a ReLU (followed only by max-pooling), so a zeroed output reaches the
head as zero. A pre-activation network (PreActResNet18) is different: ``layer4``'s output still
passes the final BatchNorm (``backbone.final_bn``) and a ReLU, and BN(0) is its bias minus the
scaled running mean -- generally not 0, so "pruning" there only shifted the channel to a
constant. For such nets the mask is applied after the final BN + ReLU: a hook on ``final_bn``
returns ReLU(BN(x)) * mask, and the forward's own ReLU after it leaves that unchanged (ReLU is
idempotent on non-negative values), so nothing in the model or its state_dict changes.
:func:`prune_point` picks the place; channels are ranked by their mean activation *at that same
point* (the activation the head reads) over ``clean_fraction`` (5%) of the training images, and
zeroed in ascending order (:func:`prune_mask`).

At each ``prune_ratio`` the pruned model's CA (whole test set), ASR (the run's success rule) and
ASR-C (over attacked test images the *same pruned model* classifies correctly when clean,
:meth:`AttackRun.repair_metrics`) are measured; ASR-C is the headline for untargeted attacks,
whose ASR counts every clean mistake as a success (:func:`~cuba.defenses.base.headline_asr_key`).
With ``finetune_epochs`` > 0 the pruned model is also fine-tuned on the same clean images (SGD lr
``lr``) and measured again (``ca_ft``, ``asr_ft``, ``asr_c_ft``).

defense.json: ``rows`` = [{prune_ratio, pruned_channels, ca, asr, asr_c[, ca_ft, asr_ft, asr_c_ft]}]
(paper Table III), ``asr_headline_key`` ("asr_c" or "asr"), ``layer`` (where the mask sits),
``channels``, ``clean_images``, ``num_classes``; ``applicable: false`` + ``reason`` (and no rows)
for a model without feature stages.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import (AttackRun, Defense, DefenseResult, check_param, headline_asr_key, headline_asr_key_of, missing_stages,
                   not_applicable, register, removal_headline)
from .plots import plot_removal

DEFAULT_RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)

_identity: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # noqa: E731


def prune_point(classifier: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], str]:
    """(module, post, description): the mask multiplies ``post(module output)``, the activation the
    classifier head reads from the last feature stage.

    A backbone with a BatchNorm ``final_bn`` (pre-activation ResNets: final BN + ReLU after the last
    stage) is masked at that BN's output after a ReLU; any other model at its last feature stage,
    whose output is already post-ReLU (see the module docstring)."""
    final_bn = getattr(getattr(classifier, "backbone", None), "final_bn", None)
    if isinstance(final_bn, nn.BatchNorm2d):
        return final_bn, F.relu, "after the final BN + ReLU"
    return classifier.stages()[-1], _identity, "last feature stage output"


@torch.inference_mode()
def channel_activity(model: nn.Module, module: nn.Module, x: torch.Tensor,
                     post: Callable[[torch.Tensor], torch.Tensor] = _identity) -> torch.Tensor:
    """Mean of ``post(output)`` of each channel of ``module`` over images ``x``."""
    total: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda m, i, o: total.append(post(o).float().mean(dim=(0, 2, 3)) * len(o)))
    try:
        for xb in x.split(1024):
            model(xb)
    finally:
        hook.remove()
    return torch.stack(total).sum(0) / len(x)


def prune_mask(activity: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask (bool) that prunes the ``int(ratio * C)`` channels of *lowest* mean activation:
    Fine-pruning removes what clean inputs use least (ties broken by a stable sort: lower index first)."""
    n_prune = int(ratio * len(activity))
    keep = torch.ones(len(activity), dtype=torch.bool, device=activity.device)
    keep[torch.argsort(activity, stable=True)[:n_prune]] = False
    return keep


def apply_channel_mask(module: nn.Module, keep: torch.Tensor,
                       post: Callable[[torch.Tensor], torch.Tensor] = _identity) -> torch.utils.hooks.RemovableHandle:
    """Replace ``module``'s output by ``post(output)`` with the channels where ``keep`` is False zeroed
    (returns the hook handle)."""
    scale = keep.float()[None, :, None, None]
    return module.register_forward_hook(lambda m, i, o: post(o) * scale.to(o.dtype))


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int = 128, seed: int = 0) -> None:
    """Plain clean fine-tuning (SGD momentum 0.9, wd 5e-4) in place."""
    model.train()
    model.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(x[idx.to(x.device)]).float(), y[idx.to(x.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


@register
class FinePruning(Defense):
    name = "fine-pruning"

    @classmethod
    def headline(cls, f: dict) -> str:
        return not_applicable(f) or removal_headline(f["rows"], "prune_ratio", f.get("num_classes"), headline_asr_key_of(f))

    def __init__(self, ratios: tuple[float, ...] = DEFAULT_RATIOS, clean_fraction: float = 0.05, finetune_epochs: int = 0,
                 lr: float = 0.01, seed: int = 0) -> None:
        super().__init__(seed)
        ratios = tuple(float(r) for r in ratios)
        check_param("ratios", len(ratios) > 0 and all(0 <= r < 1 for r in ratios), "values in [0, 1)", ratios)
        check_param("clean_fraction", 0 < clean_fraction <= 1, "in (0, 1]", clean_fraction)
        check_param("finetune_epochs", isinstance(finetune_epochs, int) and finetune_epochs >= 0, "an integer >= 0", finetune_epochs)
        self.ratios, self.clean_fraction, self.finetune_epochs, self.lr = ratios, clean_fraction, finetune_epochs, lr

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        lacking = missing_stages(run)
        if lacking:
            return DefenseResult(self.name, {"applicable": False, "reason": lacking, "rows": []}, self.params)
        n_clean = max(1, round(self.clean_fraction * len(run.data.y_train)))
        x, y = run.clean_train(n_clean, seed=self.seed)
        module, post, where = prune_point(run.classifier)
        activity = channel_activity(run.classifier, module, x, post)
        n_ch = len(activity)
        rows = []
        for r in self.ratios:
            keep = prune_mask(activity, r)
            handle = apply_channel_mask(module, keep, post)
            try:
                m = run.repair_metrics()
            finally:
                handle.remove()
            row = {"prune_ratio": r, "pruned_channels": int((~keep).sum()), **m}
            if self.finetune_epochs:
                model = copy.deepcopy(run.classifier)
                module_copy, _, _ = prune_point(model)
                h = apply_channel_mask(module_copy, keep, post)
                finetune(model, x, y, self.finetune_epochs, self.lr, seed=self.seed)
                row.update({f"{k}_ft": v for k, v in run.repair_metrics(model).items()})
                h.remove()
            rows.append(row)
        fields = {"rows": rows, "asr_headline_key": headline_asr_key(run.cfg), "layer": f"{run.cfg.model}: {where}",
                  "channels": n_ch, "clean_images": n_clean, "num_classes": run.data.num_classes}
        fig = plot_removal(rows, "prune_ratio", out / "fine_pruning.png", "share of last-stage channels pruned",
                           title=f"Fine-pruning on {run.cfg.label()}")
        return DefenseResult(self.name, fields, self.params, [fig])
