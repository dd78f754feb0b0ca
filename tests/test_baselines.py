"""The baselines and positive controls of issue 3: targeted, badnets, ubw-p (and the all-to-one metrics)."""

from __future__ import annotations

import pytest
import torch

from cuba.attack import (
    PatchTrigger, TargetSetError, all_to_one_targets, attack_targets, build_trigger, make_poison_plan,
    validate_targets,
)
from cuba.config import ConfigError
from cuba.metrics import attack_success_rate, compute_metrics
from cuba.models import TriggerGenerator
from cuba.train import train

from test_train import ENGINE, tiny_cfg, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_all_to_one_targets_leave_the_target_row_empty() -> None:
    m = all_to_one_targets(4, 2)
    assert m.tolist() == [
        [False, False, True, False], [False, False, True, False], [False, False, False, False], [False, False, True, False],
    ]
    validate_targets(m, allow_empty=True)
    with pytest.raises(TargetSetError, match=r"target sets of classes \[2\] are empty"):
        validate_targets(m)
    with pytest.raises(TargetSetError, match=r"target class 4 is outside \[0, 4\)"):
        all_to_one_targets(4, 4)
    with pytest.raises(TargetSetError, match="every target set is empty"):
        validate_targets(torch.zeros(3, 3, dtype=torch.bool), allow_empty=True)


def test_asr_leaves_out_the_target_class() -> None:
    # classes 0, 1, 2; target 2. Class-2 images are not attacked whatever they are predicted as.
    t = all_to_one_targets(3, 2)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    bd = torch.tensor([2, 1, 2, 2, 0, 2])
    clean = torch.tensor([0, 1, 1, 1, 2, 2])  # image 1 is misclassified clean
    assert attack_success_rate(y, bd, t) == pytest.approx(3 / 4)
    assert attack_success_rate(y, bd, t, clean) == pytest.approx(3 / 3)
    m = compute_metrics(y, clean, bd, t, full_range=True)
    # DS over all K = 3 classes: sources 0 and 1 put every success on class 2 -> p = (0, 0, 1)
    worst = 1 - ((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 3) ** 0.5
    assert m["ds"] == pytest.approx(worst) and m["ds_per_class"][2] != m["ds_per_class"][2]  # NaN for the target


def test_patch_trigger_stamps_only_the_corner() -> None:
    trig = PatchTrigger(channels=2, image_size=5, patch_size=2)
    x = torch.full((3, 2, 5, 5), 0.25)
    out = trig(x)
    assert torch.equal(out[..., 3:, 3:], torch.ones(3, 2, 2, 2))
    out[..., 3:, 3:] = 0.25
    assert torch.equal(out, x)
    assert set(trig.state_dict()) == {"mask", "pattern"} and not list(trig.parameters())
    with pytest.raises(ValueError, match=r"patch_size must lie in \[1, image size 5\], got 6"):
        PatchTrigger(1, 5, 6)


def test_badnets_plan_poisons_only_other_classes_with_the_target_label() -> None:
    y = torch.arange(1000) % 10
    plan = make_poison_plan("badnets", y, 10, 0.1, 3, torch.Generator().manual_seed(0))
    assert int(plan.poisoned.sum()) == 90  # 10% of the 900 images not of class 3
    assert not plan.poisoned[y == 3].any()
    assert (plan.labels[plan.poisoned] == 3).all() and torch.equal(plan.labels[~plan.poisoned], y[~plan.poisoned])
    again = make_poison_plan("badnets", y, 10, 0.1, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again.poisoned, plan.poisoned)


def test_ubwp_plan_draws_labels_uniformly_over_all_classes() -> None:
    y = torch.zeros(20000, dtype=torch.long)
    plan = make_poison_plan("ubw-p", y, 4, 0.5, 0, torch.Generator().manual_seed(1))
    assert int(plan.poisoned.sum()) == 10000
    counts = torch.bincount(plan.labels[plan.poisoned], minlength=4).float()
    # each class expects 2500 with sd ~43; 5 sd is a loose, still failing-able bound
    assert ((counts - 2500).abs() < 220).all(), counts


def test_poison_plan_errors() -> None:
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="poisoning attack must be one of badnets, ubw-p, got 'cuba'"):
        make_poison_plan("cuba", y, 2, 0.1, 0, torch.Generator())
    with pytest.raises(ValueError, match=r"poison rate must lie in \(0, 1\], got 0"):
        make_poison_plan("ubw-p", y, 2, 0.0, 0, torch.Generator())


def test_poison_plan_apply_stamps_and_relabels_the_batch() -> None:
    y_all = torch.tensor([0, 1, 0, 1])
    plan = make_poison_plan("badnets", y_all, 2, 1.0, 0, torch.Generator())  # both class-1 images
    trig = PatchTrigger(1, 4, 1)
    idx = torch.tensor([3, 0])
    x, y = plan.apply(torch.zeros(2, 1, 4, 4), y_all[idx], idx, trig)
    assert y.tolist() == [0, 0] and x[0, 0, 3, 3] == 1 and x[1].sum() == 0


def test_registry_builds_the_right_trigger_and_targets() -> None:
    assert isinstance(build_trigger(tiny_cfg(attack="badnets"), 1, 8), PatchTrigger)
    assert isinstance(build_trigger(tiny_cfg(attack="targeted"), 1, 8), TriggerGenerator)
    assert build_trigger(tiny_cfg(attack="none"), 1, 8) is None
    assert attack_targets(tiny_cfg(attack="ubw-p"), 3).equal(~torch.eye(3, dtype=torch.bool))
    assert attack_targets(tiny_cfg(attack="targeted", target_class=1), 3)[:, 1].tolist() == [True, False, True]


def test_labels_and_config_errors() -> None:
    assert tiny_cfg(attack="badnets", target_class=2).label() == "badnets-t2"
    assert tiny_cfg(attack="targeted").label() == "targeted-t0"
    assert tiny_cfg(attack="ubw-p").label() == "ubw-p"
    assert tiny_cfg(attack="ubw-p").full_range and tiny_cfg(attack="targeted").full_range
    with pytest.raises(ConfigError, match=r"^variant: attack 'badnets' has its own target rule"):
        tiny_cfg(attack="badnets", variant="nra-2")
    with pytest.raises(ConfigError, match=r"^poison_rate: must be a number in \(0, 1\], got 1.5"):
        tiny_cfg(attack="badnets", poison_rate=1.5)
    with pytest.raises(ConfigError, match=r"^target_class: must lie in \[0, 3\) for tiny, got 3"):
        train(tiny_cfg(attack="targeted", target_class=3), tiny_data(), ENGINE)
    with pytest.raises(ConfigError, match=r"^patch_size: must be at most the image size 8, got 9"):
        train(tiny_cfg(attack="ubw-p", patch_size=9), tiny_data(), ENGINE)


@pytest.mark.parametrize("attack", ["badnets", "ubw-p"])
def test_poisoning_trains_the_classifier_only(attack: str) -> None:
    res = train(tiny_cfg(attack=attack, poison_rate=0.5), tiny_data().with_validation(0.25), ENGINE)
    assert isinstance(res.generator, PatchTrigger)
    assert res.targets is not None and 0.0 <= res.history[-1]["asr"] <= 1.0


def test_targeted_trains_a_generator_to_one_class() -> None:
    res = train(tiny_cfg(attack="targeted", target_class=1), tiny_data(), ENGINE)
    assert isinstance(res.generator, TriggerGenerator)
    assert res.targets[:, 1].tolist() == [True, False, True] and res.targets.sum() == 2


def test_badnets_learns_its_patch_on_digits(tmp_path) -> None:
    """End to end on the bundled digits: the all-to-one control must actually work."""
    from cuba.pipeline import evaluate_run, run_training

    cfg = tiny_cfg(attack="badnets", target_class=0, epochs=8, batch_size=64, lr=0.05, generator_width=16, out=str(tmp_path / "bn"))
    run_dir, m = run_training(cfg)
    assert m["ca"] > 0.85 and m["asr"] > 0.9, m
    assert m["ds"] < 0.75  # all on one class: the minimum, 0.70 for K = 10
    again = evaluate_run(run_dir)  # rebuilds the PatchTrigger from the run folder
    assert again["asr"] == pytest.approx(m["asr"]) and again["ca"] == pytest.approx(m["ca"])
    assert (run_dir / "generator.safetensors").is_file()
