"""The engine's precision choice: bf16 only where the hardware runs it natively."""

from __future__ import annotations

import pytest
import torch

from cuba import engine
from cuba.cli import main
from cuba.config import ConfigError
from cuba.engine import make_engine


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, has_bf16: bool) -> None:
    # a CPU without native bf16 emulates it slowly: auto must fall back to fp32 there
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: has_bf16)
    assert make_engine("cpu", "auto").bf16 is has_bf16
    assert make_engine("cpu", "fp32").bf16 is False  # an explicit choice wins either way
    assert make_engine("cpu", "bf16").bf16 is True


def test_fp32_engine_runs_without_autocast() -> None:
    eng = make_engine("cpu", "fp32")
    net = eng.prepare(torch.nn.Conv2d(1, 2, 3))
    with eng.autocast():
        out = net(eng.batch(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)))
    assert out.dtype == torch.float32


def test_bf16_engine_autocasts_convolutions() -> None:
    eng = make_engine("cpu", "bf16")
    net = eng.prepare(torch.nn.Conv2d(1, 2, 3))
    x = eng.batch(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last) and float(x.max()) == 1.0
    with eng.autocast():
        assert net(x).dtype == torch.bfloat16


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device: 'cuda' was asked for but no CUDA GPU is available"):
        make_engine("cuda")
    with pytest.raises(ConfigError, match=r"^device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"):
        make_engine("gpu")
    assert main(["bench", "--device", "cuda"]) == 2  # one line on stderr, no traceback
