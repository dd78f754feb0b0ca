"""Resume after a crash: a real `cuba train` subprocess is killed with SIGKILL mid-epoch, then the
same command is run again; its final metrics and weights must equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cuba.checkpoint import CHECKPOINT, load_checkpoint
from cuba.runs import load_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

# digits: 1,437 training images, batch 128 -> 11 steps per epoch; a checkpoint every 3 steps
# lands inside epochs (in-epoch positions 3, 6, 9, 1, ...), never on an epoch boundary.
ARGS = ["--dataset", "digits", "--epochs", "6", "--batch-size", "128", "--lr", "0.05", "--precision", "fp32",
        "--deterministic", "--checkpoint-every", "0.25", "--no-progress", "--set", "generator_width=8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cuba_train(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cuba", "train", *ARGS, "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # three real trainings in subprocesses
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = cuba_train(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stdout.read()

    victim = cuba_train(tmp_path / "killed")
    deadline = time.time() + 300
    while not (tmp_path / "killed" / CHECKPOINT).is_file():
        assert victim.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # let it train on past the checkpoint: the kill loses work that must be redone
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = tmp_path / "killed"
    assert not (killed / "metrics.json").exists()
    assert json.loads((killed / "status.json").read_text())["state"] == "running"  # a SIGKILL leaves no goodbye
    state = load_checkpoint(killed)["state"]
    assert 0 < state["in_epoch"] < 11, state["in_epoch"]  # mid-epoch

    resumed = cuba_train(killed)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resumed from {killed / CHECKPOINT} at step {state['step']}" in out or "resumed from" in out

    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for key in ("ca", "asr", "asr_c", "ds", "ds_min", "d_p", "psnr", "ssim", "linf"):
        assert a[key] == b[key], key
    for name in ("classifier.safetensors", "generator.safetensors"):
        wa, wb = load_file(tmp_path / "full" / name), load_file(killed / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    with np.load(tmp_path / "full" / "predictions.npz") as pa, np.load(killed / "predictions.npz") as pb:
        assert np.array_equal(pa["y_pred_backdoor"], pb["y_pred_backdoor"])
    assert json.loads((killed / "status.json").read_text())["state"] == "finished"
    assert not (killed / CHECKPOINT).exists()  # removed once the weights are written


def test_rerunning_a_finished_run_does_not_retrain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cuba.cli import main

    args = ["train", "--dataset", "digits", "--attack", "none", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    first = (tmp_path / "r" / "metrics.json").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert "is already finished" in capsys.readouterr().out
    assert (tmp_path / "r" / "metrics.json").read_text() == first
    assert main([*args[:-2], "--lr", "0.5", "--out", str(tmp_path / "r")]) == 2
    assert "holds a run of a different setting (lr: 0.05 != 0.5)" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_failed_run_records_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cuba.attack import losses
    from cuba.config import make_config
    from cuba.pipeline import run_training
    from cuba.train import NonFiniteLossError

    monkeypatch.setitem(losses.OBJECTIVES, "cuba", lambda z, y, t, cfg: z.sum() * float("nan"))
    cfg = make_config({"dataset": "digits", "epochs": 1, "progress": False, "out": str(tmp_path / "nan")})
    with pytest.raises(NonFiniteLossError):
        run_training(cfg)
    status = json.loads((tmp_path / "nan" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("NonFiniteLossError: the loss became nan at step 0")


def test_image_size_the_model_cannot_take_is_a_config_error(tmp_path: Path) -> None:
    from cuba.config import ConfigError, make_config
    from cuba.data import ImageDataset
    from cuba.engine import make_engine
    from cuba.train import train

    x = torch.zeros(8, 1, 10, 10, dtype=torch.uint8)
    data = ImageDataset("odd", x, torch.arange(8) % 2, x, torch.arange(8) % 2)
    with pytest.raises(ConfigError, match=r"^model: simplecnn needs an image size divisible by 4, got 10"):
        train(make_config({"dataset": "digits", "progress": False}), data, make_engine("cpu", "fp32", False))


def test_nan_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cuba.attack import losses
    from cuba.config import make_config
    from cuba.pipeline import run_training
    from cuba.train import NonFiniteLossError

    calls = {"n": 0}

    def lnf_then_nan(z, y, t, cfg):
        calls["n"] += 1
        return z.sum() * (float("nan") if calls["n"] > 12 else 0.0)

    monkeypatch.setitem(losses.OBJECTIVES, "cuba", lnf_then_nan)
    # val_fraction 0: all 1,437 digits training images, so the step arithmetic below holds
    cfg = make_config({"dataset": "digits", "epochs": 2, "batch_size": 128, "checkpoint_every": 0.5, "progress": False,
                       "precision": "fp32", "val_fraction": 0.0, "out": str(tmp_path / "r")})
    with pytest.raises(NonFiniteLossError, match=r"at step 12 \(epoch 1\)"):
        run_training(cfg)
    state = load_checkpoint(tmp_path / "r")["state"]
    # 11 steps/epoch, a checkpoint every round(5.5) = 6 steps: the one after step 12 is the state
    # just before the NaN step, and nothing was written after it
    assert state["step"] == 12 and state["in_epoch"] == 1
    assert json.loads((tmp_path / "r" / "status.json").read_text())["checkpoint"] is True


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    """Results are written through a 0600 temporary file; the file in place gets 0666 minus the umask
    (0644 under the usual 022), not the temporary file's 0600."""
    import os

    from cuba.runs import write_json

    mask = os.umask(0)
    os.umask(mask)
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(tmp_path.glob(".m.json.*"))  # no temporary file left behind


@pytest.mark.slow  # two real trainings in subprocesses
def test_a_second_writer_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    # two `cuba train` into one --out used to both "finish", leaving a folder of mixed files
    out = tmp_path / "r"
    first = subprocess.Popen([sys.executable, "-m", "cuba", "train", "--dataset", "digits", "--epochs", "6", "--no-progress",
                              "--set", "generator_width=8", "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300  # a hang guard, not a timing assertion
        while not (out / "status.json").is_file():
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "cuba", "train", "--dataset", "digits", "--epochs", "6", "--seed", "1",
                                 "--no-progress", "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"cuba: error: {out} is being written by another process (pid {first.pid}); "
                                         "wait for it to finish or choose another --out")
    finally:
        assert first.wait(timeout=600) == 0
    assert load_run_config(out).seed == 0  # the folder is the first writer's alone
    # the lock died with its holder: the same command now finds the finished run
    again = subprocess.run([sys.executable, "-m", "cuba", "train", "--dataset", "digits", "--epochs", "6", "--no-progress",
                            "--set", "generator_width=8", "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is already finished" in again.stdout


def test_resume_at_an_epoch_end_validates_with_the_annealed_trigger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint at the end of epoch 1 comes before that epoch's validation; the resumed run must
    validate with the trigger bound the last step trained with (the schedule's), as the uninterrupted
    run does, so history.json matches -- it used to see the generator's initial bound."""
    from cuba.attack import losses
    from cuba.config import make_config
    from cuba.pipeline import run_training

    base = {"dataset": "digits", "epochs": 2, "batch_size": 128, "checkpoint_every": 1.0, "progress": False,
            "precision": "fp32", "val_fraction": 0.1, "warmup_epochs": 0.0, "gamma_ramp_epochs": 0.0, "seed": 3,
            "generator_width": 8}
    run_training(make_config({**base, "out": str(tmp_path / "full")}))

    real, calls = losses.OBJECTIVES["cuba"], {"n": 0}

    class Stop(Exception):
        pass

    def stop_after_epoch_one(z, y, t, cfg):  # 10 steps per epoch (1,295 images, batch 128)
        calls["n"] += 1
        if calls["n"] > 10:
            raise Stop
        return real(z, y, t, cfg)

    monkeypatch.setitem(losses.OBJECTIVES, "cuba", stop_after_epoch_one)
    with pytest.raises(Stop):
        run_training(make_config({**base, "out": str(tmp_path / "cut")}))
    saved = load_checkpoint(tmp_path / "cut")
    assert saved["state"]["in_epoch"] == 10  # saved at the epoch's end
    # each process's own random streams (one here), restored by its rank on resume
    assert len(saved["rank_rng"]) == 1 and torch.equal(saved["rank_rng"][0][0], saved["torch_rng"])
    monkeypatch.setitem(losses.OBJECTIVES, "cuba", real)
    run_training(make_config({**base, "out": str(tmp_path / "cut")}))
    full, cut = (json.loads((tmp_path / n / "history.json").read_text()) for n in ("full", "cut"))
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    diff = [(i, k) for i, (a, b) in enumerate(zip(full, cut)) for k in a if a[k] != b.get(k)]
    assert drop(full) == drop(cut), diff
