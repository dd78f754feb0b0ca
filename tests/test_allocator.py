"""The host allocator policy (cuba.allocator): freed large blocks stay in the process, so the next
batch of the same shape does not fault its pages in again. Measured in fresh processes by the page
faults of five evaluation-sized convolutions after three to warm up -- a count of the kernel's,
independent of the CPU and the clock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cuba import allocator
from cuba.config import ConfigError

GLIBC = hasattr(os, "confstr") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")

PROBE = """
import resource, torch
from cuba.allocator import keep_freed_memory
state = keep_freed_memory()
conv = torch.nn.Conv2d(1, 32, 3, padding=1)
x = torch.rand(1024, 1, 28, 28)  # an evaluation batch of MNIST: a 103 MB activation
def step():
    with torch.inference_mode():
        conv(x).relu_().sum()
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(state, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _probe(choice: str) -> tuple[str, int]:
    env = {**os.environ, allocator.ENV: choice}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="the policy tunes glibc's malloc; elsewhere it is a no-op")
def test_kept_memory_is_reused_without_page_faults() -> None:
    state, faults = _probe("keep")
    assert state == "kept" and faults < 2000  # the blocks came back from the heap: ~0 new pages (measured 0)
    state, faults = _probe("system")
    assert state == "system" and faults > 100_000  # fresh pages for each 103 MB block (measured 250,891)


def test_policy_choices_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.keep_freed_memory() == "system"
    assert allocator.keep_freed_memory() == "system"  # decided once per process
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ConfigError, match="CUBA_HOST_ALLOCATOR='jemalloc': expected 'keep' \\(default\\) or 'system'"):
        allocator.keep_freed_memory()
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setattr(allocator, "_glibc", lambda: False)
    monkeypatch.setenv(allocator.ENV, "keep")
    assert allocator.keep_freed_memory() == "unsupported"
