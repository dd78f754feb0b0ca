"""Behaviour fingerprint: a short deterministic CUBA run on the bundled digits data must give the
metrics and weights stored in tests/fingerprints.json for this kind of machine.

Why: a refactoring of the training step, the run folder or the config (issue 17) must not change
a single result. With ``--deterministic`` on CPU a run is bit-exact on the same machine kind and
torch release, so any difference is a behaviour change. Floating-point results differ between CPU
kinds (bf16 units or not, which the engine's ``auto`` precision follows) and torch releases, hence
one entry per kind (:func:`machine_kind`); a kind without an entry skips, naming how to record it.
The ISA torch reports is not enough to name a kind: measured 2026-12-01, the same commit on an
AVX512/AMX Xeon made to dispatch like an AVX2 CPU (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
with and without MKL_ENABLE_INSTRUCTIONS=AVX2) gave other weights than the AVX2 AMD EPYC entry:
BLAS and oneDNN pick kernels by vendor and by units torch does not report (AMX). So an entry also
stores :func:`kernel_probe`, the bits of fixed convolutions and matrix products, forward and
backward, in fp32 and at the engine's precision, and matches only a machine whose probe is the
same. The probe samples the kernels rather than covering them all: it makes a false failure on
another machine unlikely, not impossible (``--print`` shows what a machine gives, to compare).

A change *meant* to change results re-records the fingerprint deliberately, with the reason in the
commit message:

    python tests/test_fingerprint.py --record "why the results changed"
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

FINGERPRINTS = Path(__file__).with_name("fingerprints.json")
# the metrics compared exactly (every number metrics.json derives from the two models)
METRICS = ("ca", "asr", "asr_c", "ds", "ds_min", "d_p", "psnr", "linf", "val.ca", "val.asr", "val.ds")


def machine_kind() -> str:
    """The vector ISA torch dispatches to (AVX2, AVX512, ...), ``bf16`` or ``fp32`` (whether the
    engine's auto precision takes bf16) and the torch release (major.minor): what picks the kernels,
    hence the bits. E.g. ``cpu-avx2-fp32-torch2.14``."""
    from cuba.engine import cpu_has_bf16

    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    isa = torch.backends.cpu.get_cpu_capability().lower()
    return f"cpu-{isa}-{'bf16' if cpu_has_bf16() else 'fp32'}-torch{major_minor}"


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``); where /proc/cpuinfo has none,
    ``platform.processor()`` (e.g. ``x86_64``), else ``unknown``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# (layer, input shape): the shapes of the fingerprint run's models -- 1-channel 16x16 digits into
# SimpleCNN and the U-Net, wider convolutions inside them, a small and a large matrix product
_PROBE_LAYERS = (((1, 16), (64, 1, 16, 16)), ((3, 16), (8, 3, 8, 8)), ((16, 32), (32, 16, 16, 16)),
                 ((1024, 256), (64, 1024)), ((256, 10), (64, 256)))


def kernel_probe() -> str:
    """12 hex digits of sha256 over the outputs and gradients of fixed convolutions and linear layers
    (channels-last, one thread), each run in fp32 and, where the engine would take it, again under
    bf16 autocast: a run uses both (training under autocast; evaluation, and the layers autocast
    leaves in fp32, without), so two machines whose BLAS / oneDNN kernels round differently in either
    give different probes. Each layer's own output is hashed, before any activation, because a ReLU
    or a bf16 cast after it can hide a one-ulp difference (measured: with AMX off, one of 8,192
    outputs of a convolution moved by 4e-6). It runs torch only, never cuba's code, so a change to
    cuba cannot change it."""
    from cuba.engine import cpu_has_bf16

    h = hashlib.sha256()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for bf16 in (False, True) if cpu_has_bf16() else (False,):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                for (fan_in, fan_out), shape in _PROBE_LAYERS:
                    x = torch.randn(shape)
                    if x.dim() == 4:
                        layer = torch.nn.Conv2d(fan_in, fan_out, 3, padding=1).to(memory_format=torch.channels_last)
                        x = x.contiguous(memory_format=torch.channels_last)
                    else:
                        layer = torch.nn.Linear(fan_in, fan_out)
                    x.requires_grad_()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        y = layer(x)
                    y.float().square().sum().backward()
                    for t in (y, x.grad, layer.weight.grad):
                        h.update(t.detach().float().contiguous().numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    return h.hexdigest()[:12]


def stored_entry(table: dict[str, Any], kind: str, kernels: str, vendor: str) -> dict[str, Any] | None:
    """The entry recorded on a machine like this one: same kind and same kernel probe. An entry
    recorded before probes existed (no ``kernels``) matches on kind and vendor, only when no entry
    matches the probe (it is the weaker match: re-record it on its machine to give it a probe)."""
    same_kind = [e for e in table.values() if e.get("kind") == kind]
    exact = [e for e in same_kind if e.get("kernels") == kernels]
    legacy = [e for e in same_kind if e.get("kernels") is None and e.get("vendor") == vendor]
    return (exact or legacy or [None])[0]


def weights_sha256(path: Path) -> str:
    """sha256 over a safetensors file's tensors (names sorted, raw bytes): the file's own bytes
    carry metadata that is not behaviour."""
    h = hashlib.sha256()
    for name, t in sorted(load_file(path).items()):
        h.update(name.encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(out: Path) -> dict[str, Any]:
    """Train the short run into ``out`` with one thread and return its fingerprint."""
    from cuba.cli import preset
    from cuba.config import make_config
    from cuba.pipeline import run_training

    # the demo's recipe cut to 4 of its 30 epochs: every phase of the schedule (one clean warm-up
    # epoch, the 2-epoch gamma ramp, the eps anneal) runs, in ~20 s. It need not learn (CA is
    # still collapsed at 4 epochs, METHOD.md's known early failure): the weights' hash sees any bit
    cfg = make_config({**preset("demo"), "epochs": 4, "generator_width": 8, "deterministic": True,
                       "checkpoint_every": 0, "progress": False, "device": "cpu", "out": str(out)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, m = run_training(cfg, overwrite=True)
    finally:
        torch.set_num_threads(threads)
    metrics = {k: (m["val"][k.split(".")[1]] if k.startswith("val.") else m[k]) for k in METRICS}
    return {"metrics": metrics, "bf16": m["bf16"],
            "classifier_sha256": weights_sha256(out / "classifier.safetensors"),
            "generator_sha256": weights_sha256(out / "generator.safetensors")}


def test_short_run_matches_the_stored_fingerprint(tmp_path: Path) -> None:
    kind, kernels = machine_kind(), kernel_probe()
    stored = stored_entry(json.loads(FINGERPRINTS.read_text()), kind, kernels, cpu_vendor())
    if stored is None:
        pytest.skip(f"no stored fingerprint for {kind} with kernel probe {kernels}; "
                    "record one: python tests/test_fingerprint.py --record REASON")
    got = fingerprint(tmp_path / "run")
    assert got["metrics"] == stored["metrics"], "results changed: re-record only if the change is meant to"
    assert got["classifier_sha256"] == stored["classifier_sha256"]
    assert got["generator_sha256"] == stored["generator_sha256"]


def test_weights_hash_sees_one_changed_bit(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    save_file(a, tmp_path / "a.safetensors")
    save_file({"b": torch.zeros(2), "w": torch.ones(3)}, tmp_path / "b.safetensors", metadata={"x": "y"})
    assert weights_sha256(tmp_path / "a.safetensors") == weights_sha256(tmp_path / "b.safetensors")
    a["w"][1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    save_file(a, tmp_path / "c.safetensors")
    assert weights_sha256(tmp_path / "a.safetensors") != weights_sha256(tmp_path / "c.safetensors")


def test_an_entry_matches_only_a_machine_like_its_own() -> None:
    probed = {"kind": "cpu-avx512-bf16-torch2.14", "kernels": "abc", "vendor": "GenuineIntel"}
    legacy = {"kind": "cpu-avx2-fp32-torch2.14", "vendor": "AuthenticAMD"}  # recorded before probes
    table = {"a": probed, "b": legacy}
    assert stored_entry(table, "cpu-avx512-bf16-torch2.14", "abc", "GenuineIntel") is probed
    assert stored_entry(table, "cpu-avx512-bf16-torch2.14", "abd", "GenuineIntel") is None  # other kernels
    assert stored_entry(table, "cpu-avx512-bf16-torch2.15", "abc", "GenuineIntel") is None  # other torch
    assert stored_entry(table, "cpu-avx2-fp32-torch2.14", "zzz", "AuthenticAMD") is legacy
    # an Intel CPU that dispatches AVX2 rounds differently from the AMD one the legacy entry saw
    assert stored_entry(table, "cpu-avx2-fp32-torch2.14", "zzz", "GenuineIntel") is None
    # a probed entry of the same kind is the better match, whatever the keys' order
    probed_amd = {"kind": "cpu-avx2-fp32-torch2.14", "kernels": "zzz", "vendor": "AuthenticAMD"}
    assert stored_entry({"0": legacy, "1": probed_amd}, "cpu-avx2-fp32-torch2.14", "zzz", "AuthenticAMD") is probed_amd


def test_kernel_probe_is_repeatable_and_leaves_the_random_state() -> None:
    state = torch.random.get_rng_state()
    a, b = kernel_probe(), kernel_probe()
    assert a == b and len(a) == 12 and int(a, 16) >= 0
    assert torch.equal(torch.random.get_rng_state(), state)


if __name__ == "__main__":  # python tests/test_fingerprint.py --record REASON | --print
    import contextlib
    import tempfile

    if not (sys.argv[1:] == ["--print"] or (len(sys.argv) == 3 and sys.argv[1] == "--record")):
        sys.exit("usage: python tests/test_fingerprint.py --record REASON   (or --print: this machine's, stored nowhere)")
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        entry = fingerprint(Path(d) / "run")
    kind, kernels, vendor = machine_kind(), kernel_probe(), cpu_vendor()
    entry.update(kind=kind, kernels=kernels, vendor=vendor)
    if sys.argv[1] == "--print":  # e.g. with PYTHONPATH=<an older commit's worktree>/src, to compare commits
        print(json.dumps(entry, indent=2, sort_keys=True))
        sys.exit(0)
    entry.update(recorded=date.today().isoformat(), reason=sys.argv[2])
    table = json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.is_file() else {}
    old = stored_entry(table, kind, kernels, vendor)
    table = {k: v for k, v in table.items() if v is not old}  # a re-record replaces this machine's entry
    table[f"{kind}-{kernels}"] = entry
    FINGERPRINTS.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"recorded {kind}-{kernels} in {FINGERPRINTS}")
