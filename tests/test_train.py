"""Tests for cuba.train on a tiny synthetic data set (a couple of steps each)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cuba.config import ConfigError, make_config
from cuba.data import ImageDataset
from cuba.engine import make_engine
from cuba.train import channel_stats, cosine, train


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(k: int = 3, size: int = 8) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    y_train = torch.arange(8 * k) % k
    y_test = torch.arange(2 * k) % k
    x_train = torch.randint(0, 256, (len(y_train), 1, size, size), generator=g, dtype=torch.uint8)
    x_test = torch.randint(0, 256, (len(y_test), 1, size, size), generator=g, dtype=torch.uint8)
    return ImageDataset("tiny", x_train, y_train, x_test, y_test)


def tiny_cfg(**kw: object):
    base = {"dataset": "digits", "epochs": 1, "batch_size": 8, "generator_width": 4, "progress": False,
            "device": "cpu", "precision": "fp32", "channels_last": False}
    base.update(kw)
    return make_config(base)


ENGINE = make_engine("cpu", "fp32", channels_last=False)


def test_cosine_schedule() -> None:
    assert cosine(0.3, 0.05, 0.0) == pytest.approx(0.3)
    assert cosine(0.3, 0.05, 0.5) == pytest.approx(0.175)
    assert cosine(0.3, 0.05, 1.0) == pytest.approx(0.05)
    assert cosine(0.3, 0.05, 7.0) == pytest.approx(0.05)
    assert cosine(0.3, 0.05, -1.0) == pytest.approx(0.3)


def test_channel_stats() -> None:
    x = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).reshape(1, 1, 2, 2).repeat(3, 2, 1, 1)
    x[:, 1] = 51  # constant 0.2
    mean, std = channel_stats(x)
    assert torch.allclose(mean, torch.tensor([0.5, 0.2])) and torch.allclose(std, torch.tensor([0.5, 0.0]), atol=1e-6)


def test_train_clean() -> None:
    res = train(tiny_cfg(attack="none"), tiny_data().with_validation(0.25), ENGINE)
    assert res.generator is None and res.targets is None
    assert len(res.history) == 1 and res.history[0]["epoch"] == 1 and res.history[0]["step"] == 2
    assert math.isnan(res.history[0]["asr"])
    assert not res.classifier.training


def test_train_cuba_fra_resets_eps_and_builds_targets() -> None:
    res = train(tiny_cfg(eps=0.05, eps_start=0.3), tiny_data().with_validation(0.25), ENGINE)
    assert res.generator is not None and res.generator.eps == 0.05
    assert res.targets is not None and res.targets.equal(~torch.eye(3, dtype=torch.bool))
    m = res.history[-1]
    assert 0.0 <= m["asr"] <= 1.0


def test_train_nra_index_targets() -> None:
    res = train(tiny_cfg(variant="nra-1", eval_each_epoch=False), tiny_data(k=4), ENGINE)
    assert res.history == []
    assert [res.targets[y].nonzero().flatten().tolist() for y in range(4)] == [[1], [2], [3], [0]]


def test_train_nra_similar_builds_targets_after_warmup() -> None:
    cfg = tiny_cfg(variant="nra-2", vicinity="similar", warmup_epochs=0.5, epochs=1)
    res = train(cfg, tiny_data(k=4), ENGINE)
    t = res.targets
    assert t is not None and t.sum(1).tolist() == [2, 2, 2, 2] and not t.diagonal().any()


def test_train_similar_without_warmup_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^warmup_epochs: "):
        train(tiny_cfg(variant="nra-2", vicinity="similar"), tiny_data(k=4), ENGINE)


def test_schedule_warning_when_every_step_is_warm_up() -> None:
    from cuba.pipeline import schedule_warning

    assert schedule_warning(tiny_cfg(warmup_epochs=1.0)).startswith(
        "epochs 1 leaves no joint training after warmup_epochs 1: the backdoor is never trained")
    assert "epochs 0.5 leaves no joint training after warmup_epochs 2" in schedule_warning(
        tiny_cfg(epochs=0.5, warmup_epochs=2.0, attack="untargeted-ce"))
    assert schedule_warning(tiny_cfg(epochs=2, warmup_epochs=1.0)) is None  # one joint epoch
    assert schedule_warning(tiny_cfg(attack="none", warmup_epochs=1.0)) is None  # nothing to train
    assert schedule_warning(tiny_cfg(attack="badnets", warmup_epochs=1.0)) is None  # poisoning: no warm-up


def test_run_training_prints_the_schedule_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from cuba import pipeline

    class Stop(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:  # the warning comes after training, before evaluation
        raise Stop

    from types import SimpleNamespace

    monkeypatch.setattr(pipeline, "train", lambda *a, **k: SimpleNamespace(classifier=None, generator=None, targets=None))
    monkeypatch.setattr(pipeline, "predict", stop)
    with pytest.raises(Stop):
        pipeline.run_training(tiny_cfg(warmup_epochs=1.0), tmp_path / "r")
    assert capsys.readouterr().err.startswith("cuba: warning: epochs 1 leaves no joint training after warmup_epochs 1")
    with pytest.raises(Stop):
        pipeline.run_training(tiny_cfg(epochs=2, warmup_epochs=1.0), tmp_path / "r2")
    assert "cuba: warning" not in capsys.readouterr().err


def test_train_k_too_large_for_data_set() -> None:
    with pytest.raises(ConfigError, match=r"^k: must satisfy 0 < k < K = 3"):
        train(tiny_cfg(variant="nra-3"), tiny_data(k=3), ENGINE)


def test_train_is_seeded() -> None:
    cfg = tiny_cfg(attack="none", eval_each_epoch=False)
    a = train(cfg, tiny_data(), ENGINE).classifier
    b = train(cfg, tiny_data(), ENGINE).classifier
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_unknown_attack_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"^attack: must be one of none, cuba, untargeted-ce, targeted, push-away, cuba-adaptive, cuba-adaptive-set, badnets, ubw-p, got 'lira'"):
        tiny_cfg(attack="lira")


def test_train_image_mode_and_explicit_targets() -> None:
    cfg = tiny_cfg(variant="nra", vicinity="explicit", targets={0: [1], 1: [2], 2: [0]}, generator_mode="image")
    res = train(cfg, tiny_data(), ENGINE)
    assert res.generator is not None and res.generator.mode == "image"
    assert [res.targets[y].nonzero().flatten().tolist() for y in range(3)] == [[1], [2], [0]]


@pytest.mark.parametrize("attack", ["untargeted-ce", "push-away"])
def test_train_baseline_objectives_run(attack: str) -> None:
    res = train(tiny_cfg(attack=attack, eval_each_epoch=False), tiny_data(), ENGINE)
    assert res.generator is not None and res.targets is not None


def test_nan_loss_stops_with_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from cuba.attack import losses
    from cuba.train import NonFiniteLossError

    monkeypatch.setitem(losses.OBJECTIVES, "cuba", lambda z, y, t, cfg: z.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 2 "):
        train(tiny_cfg(warmup_epochs=0.5), tiny_data(), ENGINE)  # 3 steps/epoch: steps 0-1 warm up


def test_gamma_ramp_changes_training() -> None:
    a = train(tiny_cfg(eval_each_epoch=False), tiny_data(), ENGINE).classifier
    b = train(tiny_cfg(gamma_ramp_epochs=1.0, eval_each_epoch=False), tiny_data(), ENGINE).classifier
    assert any(not torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow  # torch.compile's first build is about 15 s of 2 cores: the slow tier, not the README's
def test_compile_flag_trains_the_same_model_shape() -> None:
    pytest.importorskip("torch._inductor")
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    res = train(tiny_cfg(attack="none", compile=True, eval_each_epoch=False), tiny_data(), ENGINE)
    plain = train(tiny_cfg(attack="none", eval_each_epoch=False), tiny_data(), ENGINE)
    for (ka, va), (kb, vb) in zip(res.classifier.state_dict().items(), plain.classifier.state_dict().items()):
        assert ka == kb and torch.allclose(va, vb, atol=1e-4), ka  # compiled kernels: same math, float-order noise


def test_split_passes_train_the_same_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without BatchNorm, F(x) and F(x*) in two passes equal one pass over cat([x, x*]): the
    faster path (no input gradient for the clean half) must not change what is trained."""
    from cuba.models import build_classifier
    import cuba.train as train_mod

    assert train_mod.batch_independent(build_classifier("simplecnn", 1, 10, 28))
    assert not train_mod.batch_independent(build_classifier("resnet18", 3, 10, 32))
    cfg = tiny_cfg(eval_each_epoch=False, epochs=3, warmup_epochs=0.0)
    split = train(cfg, tiny_data(), ENGINE)
    monkeypatch.setattr(train_mod, "batch_independent", lambda model: False)
    joint = train(cfg, tiny_data(), ENGINE)
    for name, module in (("classifier", "classifier"), ("generator", "generator")):
        a, b = getattr(split, module).state_dict(), getattr(joint, module).state_dict()
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5), f"{name}.{key}"


def test_steady_throughput_leaves_out_the_first_two_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's steady images/s starts after this process's second step; short runs fall back."""
    import cuba.train as train_mod

    now = {"t": 0.0, "calls": 0}

    def clock() -> float:  # one "second" per call, plus whatever the slow steps add
        now["t"] += 1.0
        return now["t"]

    def slow_first_two(x, pad, flip):  # noqa: ANN001 -- the first two steps cost 1000 s each
        now["calls"] += 1
        if now["calls"] <= 2:
            now["t"] += 1000.0
        return x

    monkeypatch.setattr(train_mod.time, "perf_counter", clock)
    monkeypatch.setattr(train_mod, "augment_batch", slow_first_two)
    cfg = tiny_cfg(attack="none", epochs=4.0, eval_each_epoch=False)  # 3 steps/epoch -> 12 steps
    res = train(cfg, tiny_data(), ENGINE)
    assert res.seconds > 2000 and res.images_per_second == pytest.approx(12 * 8 / res.seconds)
    assert res.steady_images_per_second > 20 * res.images_per_second  # the 2000 s are outside its window
    now["calls"] = 0
    short = train(tiny_cfg(attack="none", epochs=2 / 3, eval_each_epoch=False), tiny_data(), ENGINE)
    assert short.steady_images_per_second == short.images_per_second


def test_similar_vicinity_sees_every_class_of_class_sorted_data() -> None:
    # class-sorted storage (ImageFolder trees, the cifar10-jpeg zip): the first max_images rows
    # are a few classes only. Failed on the old x_train[:max_images]: classes 3-5 had zero rows.
    from cuba.train import class_confusion, stratified_rows

    k, per = 6, 50
    y = torch.arange(k).repeat_interleave(per)  # 0,0,...,1,1,...: sorted by class
    x = (y * 40).to(torch.uint8)[:, None, None, None].expand(-1, 1, 4, 4).contiguous()
    data = ImageDataset("sorted", x, y, x[:k], y[:k])

    class Brightness(torch.nn.Module):  # class = brightness / 40, as a soft one-hot
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            c = (z.flatten(1).mean(1) * 255 / 40).round().long()
            return 10 * torch.nn.functional.one_hot(c, k).float()

    rows = stratified_rows(y, 120)
    assert torch.bincount(y[rows], minlength=k).tolist() == [20] * k
    conf = class_confusion(Brightness(), data, ENGINE, max_images=120)
    assert torch.allclose(conf.sum(1), torch.ones(k))  # every class has rows
    assert conf.argmax(1).tolist() == list(range(k))


def test_history_is_measured_on_the_validation_split() -> None:
    # per-epoch numbers choose epochs and settings: they must never come from the test set
    data = tiny_data().with_validation(0.25)
    assert data.has_val and len(data.y_val) == 6 and len(data.y_train) == 18
    res = train(tiny_cfg(attack="cuba", epochs=2), data, ENGINE)
    assert [h["split"] for h in res.history] == ["val", "val"]
    no_val = train(tiny_cfg(attack="cuba", epochs=1), tiny_data(), ENGINE)
    assert no_val.history[0]["split"] is None and "ca" not in no_val.history[0]


def test_backdoor_count_is_a_share_of_each_process_slice() -> None:
    """backdoor_ratio is the global share: under torchrun each process holds batch_size / world images,
    so it twins ratio of its slice (before, ratio x the global batch: every image with 2 processes at 0.5)."""
    from cuba.train import backdoor_count

    assert backdoor_count(1.0, 128) == 128 and backdoor_count(0.5, 128) == 64
    assert backdoor_count(0.5, 128, world=2) == 32 and backdoor_count(1.0, 128, world=4) == 32
    assert backdoor_count(0.001, 64) == 1  # at least one twin


def test_native_bf16_on_a_gpu_means_ampere_or_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not torch.cuda.is_bf16_supported(), which also accepts emulated bf16 and asks about the current GPU."""
    import torch

    from cuba.engine import cuda_has_bf16

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: asked.append(dev) or caps[0])
    caps = [(7, 0)]  # V100: emulated bf16 only
    assert not cuda_has_bf16(torch.device("cuda:1"))
    caps = [(8, 0)]  # A100
    assert cuda_has_bf16(torch.device("cuda:1")) and asked == [torch.device("cuda:1")] * 2


def test_gather_objects_without_torchrun_is_the_object_alone() -> None:
    from cuba.distributed import Dist, gather_objects

    assert gather_objects({"a": 1}, Dist()) == [{"a": 1}]
