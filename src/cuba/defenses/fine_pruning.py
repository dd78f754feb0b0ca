"""Fine-pruning (Liu et al., RAID 2018): backdoor behaviour often lives in channels that clean
inputs barely use, so pruning the least-active channels of the last convolutional stage should
remove it before it costs clean accuracy.

Channels of the classifier's last feature stage (``Classifier.stages()[-1]``) are ranked by
their mean activation over ``clean_fraction`` (5%) of the training images and zeroed in
ascending order (a forward hook multiplies the stage output by a 0/1 channel mask). At each
``prune_ratio`` the pruned model's CA (whole test set) and ASR (the run's success rule) are
measured; with ``finetune_epochs`` > 0 the pruned model is also fine-tuned on the same clean
images (SGD lr ``lr``) and measured again (``ca_ft``, ``asr_ft``).

defense.json: ``rows`` = [{prune_ratio, pruned_channels, ca, asr[, ca_ft, asr_ft]}] (paper Table III).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttackRun, Defense, DefenseResult, check_param, register, removal_headline
from .plots import plot_removal

DEFAULT_RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)


@torch.inference_mode()
def channel_activity(model: nn.Module, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean activation of each output channel of ``stage`` over images ``x``."""
    total: list[torch.Tensor] = []
    hook = stage.register_forward_hook(lambda m, i, o: total.append(o.float().mean(dim=(0, 2, 3)) * len(o)))
    try:
        for xb in x.split(1024):
            model(xb)
    finally:
        hook.remove()
    return torch.stack(total).sum(0) / len(x)


def apply_channel_mask(stage: nn.Module, keep: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Zero the channels where ``keep`` is False in ``stage``'s output (returns the hook handle)."""
    scale = keep.float()[None, :, None, None]
    return stage.register_forward_hook(lambda m, i, o: o * scale.to(o.dtype))


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
        return removal_headline(f["rows"], "prune_ratio", f.get("num_classes"))

    def __init__(self, ratios: tuple[float, ...] = DEFAULT_RATIOS, clean_fraction: float = 0.05, finetune_epochs: int = 0,
                 lr: float = 0.01, seed: int = 0) -> None:
        super().__init__(seed)
        ratios = tuple(float(r) for r in ratios)
        check_param("ratios", len(ratios) > 0 and all(0 <= r < 1 for r in ratios), "values in [0, 1)", ratios)
        check_param("clean_fraction", 0 < clean_fraction <= 1, "in (0, 1]", clean_fraction)
        check_param("finetune_epochs", isinstance(finetune_epochs, int) and finetune_epochs >= 0, "an integer >= 0", finetune_epochs)
        self.ratios, self.clean_fraction, self.finetune_epochs, self.lr = ratios, clean_fraction, finetune_epochs, lr

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        n_clean = max(1, round(self.clean_fraction * len(run.data.y_train)))
        x, y = run.clean_train(n_clean, seed=self.seed)
        stage = run.classifier.stages()[-1]
        activity = channel_activity(run.classifier, stage, x)
        order = activity.argsort()  # least active first
        n_ch = len(order)
        rows = []
        for r in self.ratios:
            n_prune = int(r * n_ch)
            keep = torch.ones(n_ch, dtype=torch.bool, device=activity.device)
            keep[order[:n_prune]] = False
            handle = apply_channel_mask(stage, keep)
            try:
                ca, asr = run.ca_asr()
            finally:
                handle.remove()
            row = {"prune_ratio": r, "pruned_channels": n_prune, "ca": ca, "asr": asr}
            if self.finetune_epochs:
                model = copy.deepcopy(run.classifier)
                stage_copy = model.stages()[-1]
                h = apply_channel_mask(stage_copy, keep)
                finetune(model, x, y, self.finetune_epochs, self.lr, seed=self.seed)
                row["ca_ft"], row["asr_ft"] = run.ca_asr(model)
                h.remove()
            rows.append(row)
        fields = {"rows": rows, "layer": run.cfg.model + ": last feature stage", "channels": n_ch, "clean_images": n_clean,
                  "num_classes": run.data.num_classes}
        fig = plot_removal(rows, "prune_ratio", out / "fine_pruning.png", "share of last-stage channels pruned",
                           title=f"Fine-pruning on {run.cfg.label()}")
        return DefenseResult(self.name, fields, self.params, [fig])
