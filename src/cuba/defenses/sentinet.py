"""SentiNet (Chou et al., S&P Workshops 2020): a trigger is a small region that drives the decision
on its own, so pasting it onto other images hijacks them while an inert patch does not.

For an input x with predicted class c: Grad-CAM of c at the last feature stage (pytorch-grad-cam)
gives a saliency map; its top ``mask_fraction`` pixels form the mask M. On ``n_holdout`` clean
images h: the *fooled rate* is the share of h*(1-M) + x*M classified as c; the *average
confidence* is the mean top-class softmax of h*(1-M) + r*M with r uniform noise (an inert
patch in the same place). Each input becomes a point (average confidence, fooled rate).

The hold-out images that masks are pasted onto are the defender's clean training images; the
boundary is fitted on clean *validation* inputs (:meth:`AttackRun.clean_val`; a model has fitted
its training images, so their points sit higher and would bend the boundary to inputs it has
memorised): split the range of their average confidences into ``bins`` bins, take each bin's
point with the largest fooled rate and fit a quadratic through those points; an input is flagged
above it. Its height above the
curve is the score. ``tpr_at_fpr_5pct`` uses a second threshold on that score, the empirical 95%
quantile of the same validation inputs' scores (:func:`~cuba.defenses.rules.roc_summary`), with
the FPR it realises on the clean test inputs beside it.

Not applicable (``"applicable": false``) when the model declares no feature stage for Grad-CAM,
when every Grad-CAM map is flat (the "top region" is then the whole image), when the boundary
sits at fooled rate 1 over the whole confidence range (every clean validation bin already
reaches 1: nothing can lie above it, so SentiNet flags nothing by construction), or when every
score is equal.

defense.json: ``auroc`` (score separating backdoor from clean *test* inputs), ``tpr_at_fpr_5pct`` /
``test_fpr_at_fpr_5pct`` / ``threshold_at_fpr_5pct``, ``flagged_backdoor`` / ``flagged_clean``
(shares above the boundary), ``boundary`` (quadratic coefficients, highest power first),
``flat_cam_share``, ``calibration`` / ``n_calib_used``, ``applicable`` (+ ``reason``), and the points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import (AttackRun, Defense, DefenseResult, check_param, constant_scores, missing_stages, not_applicable,
                   register, roc_summary)
from .plots import plot_cam_maps, plot_sentinet
from .rules import clean_model_reason


def gradcam(run: AttackRun, x: torch.Tensor, classes: torch.Tensor, stage: int = -1, batch_size: int = 256) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] of ``classes`` at a feature stage (default the last)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = run.classifier
    model.requires_grad_(True)  # Grad-CAM needs gradients at the stage; the weights are not changed
    try:
        with GradCAM(model=model, target_layers=[model.stages()[stage]]) as cam:
            maps = [
                torch.from_numpy(cam(input_tensor=xb, targets=[ClassifierOutputTarget(int(c)) for c in cb]))
                for xb, cb in zip(x.split(batch_size), classes.split(batch_size))
            ]
    finally:
        model.requires_grad_(False)
        model.eval()
    return torch.cat(maps).float()


def top_mask(cams: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per image, 1 on exactly its ``fraction`` most salient pixels (at least one), else 0: (N, 1, H, W).
    Exactly: a threshold at the k-th largest value would take every pixel tied with it, and Grad-CAM
    maps are clipped at 0, so a map with fewer than k positive pixels would select the whole image."""
    flat = cams.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    mask = torch.zeros_like(flat).scatter_(1, flat.topk(k, dim=1).indices, 1.0)
    return mask.view(cams.shape)[:, None]


@torch.inference_mode()
def sentinet_points(run: AttackRun, x: torch.Tensor, holdout: torch.Tensor, fraction: float, seed: int,
                    stage: int = -1) -> tuple[np.ndarray, torch.Tensor]:
    """(N, 2) points (average inert confidence, fooled rate) and the CAMs of inputs ``x``."""
    pred = run.logits(x).argmax(1)
    with torch.inference_mode(False):
        cams = gradcam(run, x.clone(), pred.clone(), stage)
    masks = top_mask(cams, fraction).to(x.device)
    g = torch.Generator().manual_seed(seed)
    n_h = len(holdout)
    pts = []
    per = max(1, 8192 // n_h)
    for xb, mb, cb in zip(x.split(per), masks.split(per), pred.split(per)):
        m = mb[:, None]  # (b, 1, 1, H, W)
        pasted = holdout[None] * (1 - m) + xb[:, None] * m
        noise = torch.rand(xb.shape, generator=g).to(x.device)[:, None]
        inert = holdout[None] * (1 - m) + noise * m
        fooled = (run.logits(pasted.flatten(0, 1)).argmax(1).view(len(xb), n_h) == cb[:, None]).float().mean(1)
        conf = run.logits(inert.flatten(0, 1)).softmax(1).amax(1).view(len(xb), n_h).mean(1)
        pts.append(torch.stack([conf, fooled], 1).cpu())
    return torch.cat(pts).numpy(), cams


def fit_boundary(points: np.ndarray, bins: int = 10) -> np.ndarray:
    """Quadratic through the highest point (largest fooled rate) of each bin of clean points, the bins
    splitting the range of their average confidences. Over that range, not [0, 1]: a model's inert
    confidences crowd near the top (0.86-0.95 on MNIST), and fixed bins on [0, 1] left 2-3 of them
    populated, so the "quadratic" was a line through two points (until 2026-11-30)."""
    lo, hi = float(points[:, 0].min()), float(points[:, 0].max())
    edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.array([lo, lo + 1.0])
    idx = np.clip(np.digitize(points[:, 0], edges) - 1, 0, len(edges) - 2)
    xs, ys = [], []
    for b in range(len(edges) - 1):
        sel = np.flatnonzero(idx == b)
        if len(sel):
            top = sel[np.argmax(points[sel, 1])]  # the bin's highest point, at its own confidence
            xs.append(points[top, 0])
            ys.append(points[top, 1])
    deg = min(2, len(xs) - 1)
    coeffs = np.polyfit(xs, ys, deg) if deg >= 1 else np.array([ys[0]])
    return np.pad(coeffs, (3 - len(coeffs), 0))


@register
class SentiNet(Defense):
    name = "sentinet"
    rule = ("tpr_at_fpr_5pct", "tpr")  # the operating point cuba.defenses.verdict judges

    @classmethod
    def headline(cls, f: dict) -> str:
        na = not_applicable(f)
        if na:
            return na
        text = f"AUROC {f['auroc']:.3f}, TPR@FPR5% {f['tpr_at_fpr_5pct']:.3f}"
        return text + (f" (test FPR {f['test_fpr_at_fpr_5pct']:.3f})" if "test_fpr_at_fpr_5pct" in f else "")

    def __init__(self, n_eval: int = 200, n_calib: int = 200, n_holdout: int = 100, mask_fraction: float = 0.1,
                 bins: int = 10, stage: int = -1, seed: int = 0) -> None:
        super().__init__(seed)
        for name, v in (("n_eval", n_eval), ("n_calib", n_calib), ("n_holdout", n_holdout), ("bins", bins)):
            check_param(name, isinstance(v, int) and v >= 2, "an integer >= 2", v)
        check_param("mask_fraction", 0 < mask_fraction < 1, "in (0, 1)", mask_fraction)
        check_param("stage", isinstance(stage, int), "an integer index into the model's feature stages (-1: the last)", stage)
        self.n_eval, self.n_calib, self.n_holdout, self.mask_fraction, self.bins = n_eval, n_calib, n_holdout, mask_fraction, bins
        self.stage = stage

    def run(self, run: AttackRun, out: Path) -> DefenseResult:
        lacking = missing_stages(run)
        if lacking:
            return DefenseResult(self.name, {"applicable": False, "reason": lacking, "calibration": run.calibration_source,
                                             "trigger": run.trigger_kind}, self.params)
        holdout, _ = run.clean_train(self.n_holdout, seed=self.seed)
        calib, _ = run.clean_val(self.n_calib, seed=self.seed)
        x, _ = run.attacked_test(self.n_eval, seed=self.seed)
        xb = run.backdoor(x)
        p_calib, _ = sentinet_points(run, calib, holdout, self.mask_fraction, self.seed, self.stage)
        p_clean, cam_clean = sentinet_points(run, x, holdout, self.mask_fraction, self.seed + 1, self.stage)
        p_bd, cam_bd = sentinet_points(run, xb, holdout, self.mask_fraction, self.seed + 2, self.stage)
        coeffs = fit_boundary(p_calib, self.bins)
        score = lambda p: p[:, 1] - np.polyval(coeffs, p[:, 0])  # noqa: E731
        s_clean, s_bd, s_calib = score(p_clean), score(p_bd), score(p_calib)
        cams = torch.cat([cam_clean, cam_bd]).flatten(1)
        flat_share = float((cams.amax(1) == cams.amin(1)).float().mean())
        reason = None
        if run.imported:  # its trigger is unknown: the probe patch scored above says nothing of its backdoor
            reason = clean_model_reason(scored="points", imported=True)
        elif flat_share == 1.0:
            reason = "every Grad-CAM map is flat: the top-saliency mask covers the whole image, so nothing is localised"
        elif np.polyval(coeffs, np.linspace(p_calib[:, 0].min(), p_calib[:, 0].max(), 101)).min() >= 1.0 - 1e-9:
            reason = ("the boundary sits at fooled rate 1 over the whole confidence range of the clean validation "
                      "points (every bin already fools all hold-out images): nothing can lie above it")
        elif constant_scores(s_clean, s_bd):
            reason = "every test input has the same score: the detector ranks nothing"
        fields = {
            **roc_summary(s_clean, s_bd, s_calib),
            "applicable": reason is None, **({"reason": reason} if reason else {}),
            "flagged_backdoor": float((s_bd > 0).mean()), "flagged_clean": float((s_clean > 0).mean()),
            "boundary": coeffs.tolist(), "flat_cam_share": flat_share, "calibration": run.calibration_source,
            "n_calib_used": len(calib), "trigger": run.trigger_kind,
            "points_clean": p_clean.round(4).tolist(), "points_backdoor": p_bd.round(4).tolist(),
            "points_calib": p_calib.round(4).tolist(),
        }
        figs = [
            plot_sentinet(p_clean, p_bd, coeffs, out / "sentinet_scatter.png",
                          title=f"SentiNet on {run.cfg.label()}: AUROC {fields['auroc']:.3f}" + ("" if reason is None else " (n/a)")),
            plot_cam_maps(
                torch.cat([x[:5], xb[:5]]).cpu().numpy(), torch.cat([cam_clean[:5], cam_bd[:5]]).numpy(),
                ["clean"] * 5 + ["backdoor"] * 5, out / "sentinet_gradcam.png",
            ),
        ]
        return DefenseResult(self.name, fields, self.params, figs)
