"""cuba <-> IBM ART (cuba.interop.art, the optional ``art`` extra).

Tests that need ART call ``pytest.importorskip("art")`` first, so a checkout without the extra
skips them; the missing-extra error and the by-hand metrics run everywhere.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cuba.cli import main
from cuba.interop.art import INSTALL_HINT, detection_metrics, poisoned_training_set, to_art

pytestmark = pytest.mark.usefixtures("one_thread")


# --- without ART ----------------------------------------------------------------------------------

def test_a_missing_art_is_a_one_line_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "art", None)  # `import art` now raises ImportError
    with pytest.raises(ImportError, match=r"^IBM's Adversarial Robustness Toolbox is not installed: "
                                          r"pip install -e '\.\[art\]'$"):
        to_art(nn.Linear(4, 2), (4,), 2)
    assert "\n" not in INSTALL_HINT


def test_the_package_imports_without_art() -> None:
    code = ("import sys; sys.modules['art'] = None; import cuba.interop, cuba.interop.art; "
            "print(cuba.interop.to_art.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "to_art"


def test_detection_metrics_by_hand() -> None:
    flagged = np.array([1, 1, 0, 0, 1, 0], bool)
    poison = np.array([1, 0, 1, 0, 0, 0], bool)  # tp 1, fp 2, fn 1, tn 2
    m = detection_metrics(flagged, poison)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 2, 1, 2)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == m["tpr"] == 0.5
    assert m["fpr"] == 0.5 and m["f1"] == pytest.approx(0.4)  # 2PR / (P + R) = (1/3) / (5/6)
    none = detection_metrics(np.zeros(3, bool), np.zeros(3, bool))
    assert none["precision"] is None and none["recall"] is None and none["fpr"] == 0.0


# --- (a) wrapping ---------------------------------------------------------------------------------

def test_to_art_predicts_what_the_cuba_classifier_predicts() -> None:
    pytest.importorskip("art")
    from art.estimators.classification import PyTorchClassifier

    from cuba.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("simplecnn", 1, 10, 16).eval()
    x = torch.rand(40, 1, 16, 16)
    with torch.no_grad():
        logits = model(x)
    clf = to_art(model, (1, 16, 16), 10)
    assert isinstance(clf, PyTorchClassifier) and clf.nb_classes == 10 and clf.clip_values.tolist() == [0.0, 1.0]
    out = clf.predict(x.numpy())
    assert np.array_equal(out.argmax(1), logits.softmax(1).argmax(1).numpy())
    assert np.allclose(out, logits.numpy(), atol=1e-5)
    probs = to_art(model, (1, 16, 16), 10, probabilities=True).predict(x.numpy())
    assert np.allclose(probs, logits.softmax(1).numpy(), atol=1e-6)
    # ART's AC / SS read the last layer: the penultimate representation (SimpleCNN's 128 units)
    assert clf.layer_names == ["output", "features"]
    assert clf.get_activations(x.numpy(), layer=1).shape == (40, 128)
    assert to_art(model, (1, 16, 16), 10, features="logits").get_activations(x.numpy(), layer=1).shape == (40, 10)


def test_to_art_says_what_a_bare_module_lacks() -> None:
    pytest.importorskip("art")
    with pytest.raises(ValueError, match="input_shape"):
        to_art(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="features='logits'"):
        to_art(nn.Conv2d(1, 2, 3), (1, 4, 4), 2)


# --- (b) ART's STRIP score on identical (one-hot) predictions -------------------------------------

K, N = 5, 20


class _TriggeredOneHot(nn.Module):
    """Probabilities: an exact one-hot of class 0 when pixel (0, 0) is lit (> 0.25; a blend at
    ART's alpha 0.5 keeps it at >= 0.5), else the softmax of a fixed random linear map."""

    def __init__(self, near: float | None = None) -> None:
        super().__init__()
        self.w = torch.randn(16, K, generator=torch.Generator().manual_seed(0)) * 2
        self.near = near  # logit gap of a near-one-hot (finite softmax) instead of an exact one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (x.flatten(1) @ self.w).softmax(1)
        zeros = torch.zeros(len(x), dtype=torch.long)
        hot = F.one_hot(zeros, K).float() if self.near is None else (F.one_hot(zeros, K) * self.near).float().softmax(1)
        return torch.where(x[:, 0, 0, 0, None] > 0.25, hot, p)


def _images(n: int, lit: bool, seed: int) -> np.ndarray:
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0, 0] = 1.0 if lit else 0.0
    return x.numpy()


def _art_strip_classifier(model: nn.Module):  # noqa: ANN202  (ART's dynamic STRIP class)
    from art.defences.transformer.poisoning import STRIP

    return STRIP(to_art(model, (1, 4, 4), K, features="logits"))(num_samples=N, false_acceptance_rate=0.01)


def test_art_strip_score_on_identical_one_hot_predictions_is_nan_measured() -> None:
    """The claim (read 2026-11-30): ART's STRIP takes scipy.stats.entropy(P, axis=0) over the N
    overlays, which is NaN on N identical one-hot predictions. Measured through ART's own code."""
    pytest.importorskip("art")
    from scipy.stats import entropy

    from cuba.interop.art import _recorded_strip_scores, _take

    onehot = np.tile(np.eye(K)[0], (N, 1))
    assert math.isnan(np.sum(entropy(onehot, base=2, axis=0)) / N)  # ART's expression, on its own
    clf = _art_strip_classifier(_TriggeredOneHot())
    with _recorded_strip_scores(N) as seen:
        clf.mitigate(_images(50, lit=False, seed=1))  # clean calibration: finite scores, a threshold
        art_calib, _ = _take(seen)
        out = clf.predict(_images(30, lit=True, seed=2))  # textbook backdoor: every blend one-hot
        art_bd, paper_bd = _take(seen)
    assert np.isfinite(art_calib).all() and np.isfinite(clf.entropy_threshold)
    assert np.isnan(art_bd).all()  # confirmed: NaN
    assert np.allclose(paper_bd, 0.0)  # the paper's per-prediction entropy: 0, the most suspicious
    assert np.abs(out).sum(1).min() > 0  # NaN <= threshold is False: ART abstains on none of them
    # and a NaN among the calibration scores stops ART's mitigate outright
    with pytest.raises(ValueError, match="non-finite"):
        _art_strip_classifier(_TriggeredOneHot()).mitigate(_images(50, lit=True, seed=3))


def test_art_strip_score_on_identical_near_one_hot_predictions_is_maximal() -> None:
    """Without exact zeros the score is finite -- and at its maximum K log2(N) / N (every class's
    column is flat over the overlays), so ART's low-tail rule ranks the backdoor as cleanest."""
    pytest.importorskip("art")
    from cuba.interop.art import _recorded_strip_scores, _take

    clf = _art_strip_classifier(_TriggeredOneHot(near=12.0))
    with _recorded_strip_scores(N) as seen:
        clf.mitigate(_images(50, lit=False, seed=1))
        art_calib, _ = _take(seen)
        out = clf.predict(_images(30, lit=True, seed=2))
        art_bd, paper_bd = _take(seen)
    assert np.allclose(art_bd, K * math.log2(N) / N)
    assert art_calib.max() < art_bd.min()
    assert (paper_bd < 0.01).all()
    assert np.abs(out).sum(1).min() > 0  # none flagged


# --- (c) AC, SS and STRIP on a tiny BadNets digits run --------------------------------------------

def _train_spying(out: Path, attack: str, epochs: str) -> object:
    """Train a digits run, keeping the PoisonPlan the training loop drew."""
    import cuba.train

    drawn, original = [], cuba.train.make_poison_plan
    mp = pytest.MonkeyPatch()
    mp.setattr(cuba.train, "make_poison_plan", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    try:
        rc = main(["train", "--dataset", "digits", "--attack", attack, "--epochs", epochs, "--no-progress",
                   "--device", "cpu", "--out", str(out)])
    finally:
        mp.undo()
    assert rc == 0 and len(drawn) == 1
    return drawn[0]


@pytest.fixture(scope="module")
def badnets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("art") / "badnets"
    return out, _train_spying(out, "badnets", "3")


def _assert_reproduces(run_dir: Path, plan: object) -> None:
    from cuba.defenses import load_attack_run

    run = load_attack_run(run_dir, device="cpu")
    ts = poisoned_training_set(run)
    assert np.array_equal(ts.poisoned, plan.poisoned.cpu().numpy())
    assert np.array_equal(ts.y, plan.labels.cpu().numpy())
    x = run.data.x_train.float().div(255).numpy()
    assert np.array_equal(ts.x[~ts.poisoned], x[~ts.poisoned])
    assert (ts.x[ts.poisoned][..., -3:, -3:] == 1.0).all()  # the 3x3 white patch, bottom right
    assert np.array_equal(ts.x[ts.poisoned][..., :-3, :], x[ts.poisoned][..., :-3, :])


def test_poisoned_training_set_is_the_one_training_drew(badnets: tuple[Path, object]) -> None:
    _assert_reproduces(*badnets)
    ts = poisoned_training_set(badnets[0])
    assert (ts.y[ts.poisoned] == 0).all() and (ts.y_clean[ts.poisoned] != 0).all()


def test_poisoned_training_set_of_ubw_p_too(tmp_path: Path) -> None:
    out = tmp_path / "ubwp"
    _assert_reproduces(out, _train_spying(out, "ubw-p", "0.05"))


def test_poisoned_training_set_refuses_a_run_without_poison(tmp_path: Path) -> None:
    assert main(["train", "--dataset", "digits", "--attack", "none", "--epochs", "0.05", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "clean")]) == 0
    with pytest.raises(ValueError, match="only for badnets / ubw-p runs"):
        poisoned_training_set(tmp_path / "clean")


def _in_unit(m: dict, *keys: str) -> None:
    for k in keys:
        assert m[k] is not None and 0.0 <= m[k] <= 1.0, (k, m[k])


def test_activation_clustering_and_spectral_signatures_score_against_the_mask(badnets: tuple[Path, object]) -> None:
    pytest.importorskip("art")
    from cuba.defenses import load_attack_run
    from cuba.interop.art import art_activation_clustering, art_spectral_signatures

    run = load_attack_run(badnets[0], device="cpu")
    ts = poisoned_training_set(run)
    for m in (art_activation_clustering(run, ts), art_spectral_signatures(run, ts)):
        assert m["applicable"] and m["n"] == len(ts.y) and m["n_poison"] == int(ts.poisoned.sum()) > 0
        _in_unit(m, "precision", "recall", "tpr", "fpr", "f1")
        assert m["poison_per_class"][0] == m["n_poison"] and sum(m["flagged_per_class"]) == m["n_flagged"]
    again = art_activation_clustering(run, ts)  # NumPy's global generator seeded: repeatable
    assert np.array_equal(again["flagged"], art_activation_clustering(run, ts)["flagged"])


def test_art_strip_on_the_inputs_our_strip_scores(badnets: tuple[Path, object]) -> None:
    pytest.importorskip("art")
    from cuba.interop.art import art_strip

    m = art_strip(badnets[0], n_eval=60, n_calib=60)
    assert m["n_clean"] == m["n_backdoor"] == 60 and len(m["flags_backdoor"]) == 60
    if m["applicable"]:
        _in_unit(m, "far", "frr", "auroc")
    else:
        assert "mitigate failed" in m["reason"]
