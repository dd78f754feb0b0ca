"""The defenses: hand-computed pieces, then each defense end to end on a tiny digits BadNets run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cuba.cli import main
from cuba.config import ConfigError
from cuba.defenses import DEFENSES, load_attack_run, run_defense
from cuba.defenses.fine_pruning import apply_channel_mask, channel_activity
from cuba.defenses.nad import attention_map
from cuba.defenses.neural_cleanse import NeuralCleanse, anomaly_indices
from cuba.defenses.scale_up import ScaleUp, scaled_consistency, standardize_by_class
from cuba.defenses.sentinet import fit_boundary, top_mask
from cuba.defenses.strip import Strip, strip_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_has_the_paper_defenses_then_scale_up() -> None:
    assert list(DEFENSES) == ["strip", "neural-cleanse", "sentinet", "fine-pruning", "nad", "scale-up"]


def test_anomaly_index_by_hand() -> None:
    # median 9.5; |l - M| = .5 2.5 1.5 1.5 .5 7.5 -> MAD 1.5; a = 7.5 / (1.4826 * 1.5) = 3.3725
    a, index, flagged = anomaly_indices([10, 12, 8, 11, 9, 2])
    assert index == pytest.approx(7.5 / (1.4826 * 1.5)) and flagged == [5]
    assert a[1] == pytest.approx(2.5 / (1.4826 * 1.5))  # above the median: never flagged
    _, index, flagged = anomaly_indices([5.0, 5.1, 4.9, 5.0])
    assert flagged == [] and index < 2


def test_top_mask_keeps_the_most_salient_pixels() -> None:
    cams = torch.tensor([[[0.1, 0.9], [0.5, 0.2]]])
    assert top_mask(cams, 0.5).squeeze().tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert top_mask(cams, 0.01).sum() == 1  # at least one pixel


def test_boundary_is_the_quadratic_through_the_bin_maxima() -> None:
    # one point per bin at the bin's max: the fit must reproduce y = x^2 exactly
    xs = np.array([0.05, 0.35, 0.65, 0.95])
    pts = np.c_[np.r_[xs, xs], np.r_[xs**2, xs**2 - 0.1]]
    assert np.allclose(fit_boundary(pts, bins=10), [1.0, 0.0, 0.0], atol=1e-9)


def test_attention_map_by_hand() -> None:
    f = torch.tensor([[[[1.0, -2.0]], [[0.0, 2.0]]]])  # (1, C=2, 1, 2): sum_c |f|^2 = [1, 8]
    assert torch.allclose(attention_map(f), torch.tensor([[1.0, 8.0]]) / np.sqrt(65.0))


class _Const(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_strip_entropy_of_a_uniform_model_is_log2_k() -> None:
    from types import SimpleNamespace

    run = SimpleNamespace(logits=lambda x: _Const([0.0, 0.0, 0.0, 0.0])(x))
    ent = strip_entropy(run, torch.rand(5, 1, 4, 4), torch.rand(3, 1, 4, 4))
    assert torch.allclose(ent, torch.full((5,), 2.0))


class _MeanBrightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([0.5 - m, m - 0.5], 1)


def test_scaled_prediction_consistency_by_hand() -> None:
    from types import SimpleNamespace

    run = SimpleNamespace(logits=_MeanBrightness())
    x = torch.tensor([0.09, 0.6]).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    # 0.09 x (3, 5, 7, 9, 11) = 0.27 0.45 | 0.63 0.81 0.99: predictions 0 0 1 1 1 against 0 -> SPC 2/5;
    # 0.6 scaled saturates at 1 and stays class 1 -> SPC 1
    spc, pred = scaled_consistency(run, x, (3, 5, 7, 9, 11))
    assert spc.tolist() == pytest.approx([0.4, 1.0]) and pred.tolist() == [0, 1]
    assert x[0, 0, 0, 0] == pytest.approx(0.09)  # the input itself is not scaled in place


def test_spc_standardised_per_predicted_class_by_hand() -> None:
    ref = torch.tensor([0.2, 0.4, 0.6, 1.0])
    ref_pred = torch.tensor([0, 0, 1, 1])
    # class 0: mean 0.3, sample std 0.1414; class 1: 0.8, 0.2828; class 2 has no reference images:
    # the global mean 0.55 and sample std sqrt(0.35 / 3) = 0.3416
    z = standardize_by_class(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 2]), ref, ref_pred, 3)
    assert z.tolist() == pytest.approx([0.2 / 0.02**0.5, -0.3 / 0.08**0.5, -0.05 / (0.35 / 3) ** 0.5], rel=1e-5)


def test_channel_activity_and_mask() -> None:
    conv = nn.Conv2d(1, 3, 1, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.rand(4, 1, 2, 2)
    assert torch.allclose(channel_activity(model, conv, x), torch.tensor([1.0, 2.0, 3.0]))
    h = apply_channel_mask(conv, torch.tensor([True, False, True]))
    assert model(x)[0].tolist() == [1.0] * 4 + [0.0] * 4 + [3.0] * 4
    h.remove()


def test_defense_parameters_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^n_overlay: must be an integer >= 2, got 1"):
        Strip(n_overlay=1)
    with pytest.raises(ConfigError, match=r"^blend: must be sum or alpha, got 'max'"):
        Strip(blend="max")
    with pytest.raises(ConfigError, match=r"^lr: must be > 0, got 0"):
        NeuralCleanse(lr=0)
    with pytest.raises(ConfigError, match=r"^scales: must be a list of amplification factors > 1, got \(0.5,\)"):
        ScaleUp(scales=[0.5])
    with pytest.raises(ConfigError, match=r"^threshold: must be a finite number, got nan"):
        ScaleUp(threshold=float("nan"))


@pytest.fixture(scope="module")
def badnets_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits BadNets model (target 0) that has learned its patch: the positive control."""
    from cuba.config import make_config
    from cuba.pipeline import run_training

    out = tmp_path_factory.mktemp("bn") / "run"
    cfg = make_config({"dataset": "digits", "attack": "badnets", "epochs": 8, "batch_size": 64, "lr": 0.05,
                       "progress": False, "device": "cpu", "precision": "fp32", "out": str(out)})
    _, m = run_training(cfg)
    assert m["asr"] > 0.9
    return out


def test_neural_cleanse_flags_the_badnets_target_batched_like_one_by_one(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    kw = dict(epochs=25, batches_per_epoch=5, batch_size=16, n_pool=300)
    res = run_defense("neural-cleanse", run, tmp_path, **kw)
    f = json.loads((tmp_path / "neural-cleanse" / "defense.json").read_text())
    assert f["flagged_classes"] == [0] and f["anomaly_index"] > 2, f["l1_norms"]
    assert len(f["l1_norms"]) == 10 and (tmp_path / "neural-cleanse" / "neural_cleanse.png").is_file()
    # in fp32, batched and one-by-one follow the same per-class trajectories (same mini-batches,
    # element-wise Adam, per-class early stop): equal up to summation order
    one = NeuralCleanse(batched=False, precision="fp32", **kw).reverse(run)
    together = NeuralCleanse(batched=True, precision="fp32", **kw).reverse(run)
    assert np.allclose(one["norm"].numpy(), together["norm"].numpy(), rtol=1e-3, atol=1e-3)
    assert anomaly_indices(one["norm"])[2] == [0]  # the default (bf16 where native) gives the fp32 verdict
    with pytest.raises(ConfigError, match=r"^precision: must be auto or fp32 or bf16, got 'fp16'"):
        NeuralCleanse(precision="fp16")


def test_neural_cleanse_batches_by_device(badnets_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cuba.defenses import neural_cleanse

    calls: list[list[int]] = []
    real = neural_cleanse.reverse_engineer
    monkeypatch.setattr(neural_cleanse, "reverse_engineer", lambda run, classes, *a, **k: (calls.append(classes), real(run, classes, *a, **k))[1])
    run = load_attack_run(badnets_run, device="cpu")
    kw = dict(epochs=1, batches_per_epoch=1, batch_size=4, n_pool=20)
    assert len(NeuralCleanse(**kw).reverse(run)["norm"]) == 10
    assert calls == [[c] for c in range(10)]  # auto on a CPU: one class at a time (faster there)
    calls.clear()
    NeuralCleanse(batched=True, **kw).reverse(run)
    assert calls == [list(range(10))]


def test_strip_and_sentinet_write_their_fields(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    s = run_defense("strip", run, tmp_path, n_overlay=20, n_eval=100, n_calib=100).fields
    assert s["auroc"] > 0.9 and 0 <= s["far_at_frr_1pct"] <= 1 and len(s["entropy_clean"]) == 100
    assert s["auroc"] + s["auroc_high_entropy"] == pytest.approx(1.0, abs=0.02)  # the two tails (ties aside)
    t = run_defense("sentinet", run, tmp_path, n_eval=40, n_calib=40, n_holdout=20).fields
    assert 0 <= t["auroc"] <= 1 and 0 <= t["tpr_at_fpr_5pct"] <= 1 and len(t["points_backdoor"]) == 40
    assert {p.name for p in (tmp_path / "sentinet").iterdir()} == {"defense.json", "sentinet_scatter.png", "sentinet_gradcam.png"}


def test_scale_up_writes_its_fields_in_both_modes(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    f = run_defense("scale-up", run, tmp_path, n_eval=100).fields
    assert len(f["spc_clean"]) == len(f["spc_backdoor"]) == 100
    assert set(f["spc_backdoor"]) <= {0.0, 0.2, 0.4, 0.6, 0.8, 1.0}
    assert f["auroc"] + f["auroc_low_spc"] == pytest.approx(1.0)  # the two tails of one score
    assert f["flagged_backdoor"] == pytest.approx(float(np.mean(np.array(f["spc_backdoor"]) > 0.5)))
    assert (tmp_path / "scale-up" / "scale_up_spc.png").is_file()
    z = run_defense("scale-up", run, tmp_path / "z", n_eval=100, n_ref=200, standardize=True).fields
    assert z["spc_backdoor"] == f["spc_backdoor"] and 0 <= z["auroc"] <= 1  # raw SPC kept; the score is the z-score
    assert ScaleUp.headline(f).startswith(f"AUROC {f['auroc']:.3f}, TPR@FPR5% ")


def test_fine_pruning_and_nad_rows(badnets_run: Path, tmp_path: Path) -> None:
    run = load_attack_run(badnets_run, device="cpu")
    fp = run_defense("fine-pruning", run, tmp_path).fields
    assert [r["prune_ratio"] for r in fp["rows"]] == [0.0, 0.2, 0.4, 0.6, 0.8, 0.9]
    ca0, asr0 = run.ca_asr()
    assert fp["rows"][0]["ca"] == pytest.approx(ca0) and fp["rows"][0]["asr"] == pytest.approx(asr0)
    assert fp["rows"][-1]["pruned_channels"] == int(0.9 * fp["channels"])
    nad = run_defense("nad", run, tmp_path, epochs=4, teacher_epochs=2, clean_fraction=0.2).fields
    assert [r["epoch"] for r in nad["rows"]] == [0, 2, 4] and nad["stages"] == 2


def test_defend_cli_errors(badnets_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["defend", "spectral", str(badnets_run)]) == 2
    assert "defense: must be one of" in capsys.readouterr().err
    assert main(["defend", "strip", str(tmp_path)]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err
    assert main(["defend", "strip", str(badnets_run), "--set", "colour=1"]) == 2
    assert "--set: strip has no parameter colour" in capsys.readouterr().err


def test_clean_model_gets_a_probe_patch(tmp_path: Path) -> None:
    from cuba.config import make_config
    from cuba.pipeline import run_training

    cfg = make_config({"dataset": "digits", "attack": "none", "epochs": 2, "progress": False, "device": "cpu",
                       "precision": "fp32", "out": str(tmp_path / "clean")})
    run_training(cfg)
    run = load_attack_run(tmp_path / "clean", device="cpu")
    assert run.trigger is None and run.ca_asr()[1] is None
    f = run_defense("strip", run, tmp_path, n_overlay=10, n_eval=50, n_calib=50).fields
    assert f["trigger"].startswith("probe patch")


def test_defend_cli_then_defense_table(badnets_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["defend", "fine-pruning", str(badnets_run), "--set", "ratios=[0.0, 0.5]"]) == 0
    assert "fine-pruning    prune_ratio 0: " in capsys.readouterr().out
    f = json.loads((badnets_run / "defenses" / "fine-pruning" / "defense.json").read_text())
    assert f["setting"] == "badnets-t0" and [r["prune_ratio"] for r in f["rows"]] == [0.0, 0.5] and f["seconds"] >= 0
    assert main(["defense-table", str(badnets_run), "--names", "BadNets", "--out", str(tmp_path / "t.md")]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "| fine-pruning | prune_ratio 0: " in md and "| strip | – |" in md and "| 0.5 | " in md
    assert main(["defense-table", str(tmp_path)]) == 2
    assert "has no defenses/<defense>/defense.json" in capsys.readouterr().err
