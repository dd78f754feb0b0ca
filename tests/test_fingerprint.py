"""Behaviour fingerprint: a short deterministic CUBA run on the bundled digits data must give the
metrics and weights stored in tests/fingerprints.json for this kind of machine.

Why: a refactoring of the training step, the run folder or the config (issue 17) must not change
a single result. With ``--deterministic`` on CPU a run is bit-exact on the same machine kind and
torch release, so any difference is a behaviour change. Floating-point results differ between CPU
kinds (bf16 units or not, which the engine's ``auto`` precision follows) and torch releases, hence
one entry per kind (:func:`machine_kind`); a kind without an entry skips, naming how to record it.

A change *meant* to change results re-records the fingerprint deliberately, with the reason in the
commit message:

    python tests/test_fingerprint.py --record "why the results changed"
"""

from __future__ import annotations

import hashlib
import json
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
    kind = machine_kind()
    stored = json.loads(FINGERPRINTS.read_text()).get(kind)
    if stored is None:
        pytest.skip(f"no stored fingerprint for {kind}; record one: python tests/test_fingerprint.py --record REASON")
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


if __name__ == "__main__":  # python tests/test_fingerprint.py --record REASON
    import tempfile

    if len(sys.argv) != 3 or sys.argv[1] != "--record":
        sys.exit("usage: python tests/test_fingerprint.py --record REASON")
    with tempfile.TemporaryDirectory() as d:
        entry = {**fingerprint(Path(d) / "run"), "recorded": date.today().isoformat(), "reason": sys.argv[2]}
    table = json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.is_file() else {}
    table[machine_kind()] = entry
    FINGERPRINTS.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"recorded {machine_kind()} in {FINGERPRINTS}")
