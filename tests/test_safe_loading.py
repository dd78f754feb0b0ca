"""Safe loading of foreign weights: pickle needs a flag, and a malicious pickle never runs code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cuba.cli import main
from cuba.importing import read_state_dict
from cuba.models import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


class _Exploit:
    """Unpickling this calls os.system: the classic pickle payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_never_executes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    with open(evil, "wb") as f:
        pickle.dump({"backbone.w": _Exploit(marker)}, f)
    # sanity: a plain unpickler *would* run it (so the test can fail)
    with open(evil, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    out = tmp_path / "run"
    assert main(["import-model", str(evil), "--model", "simplecnn", "--dataset", "digits", "--out", str(out)]) == 2
    assert "is a pickle file" in capsys.readouterr().err and not marker.exists()
    assert main(["import-model", str(evil), "--model", "simplecnn", "--dataset", "digits", "--out", str(out), "--allow-pickle"]) == 2
    assert "refused by the weights-only unpickler" in capsys.readouterr().err
    assert not marker.exists()


def test_import_safetensors_and_flagged_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clf = build_classifier("simplecnn", 1, 10, 16)
    save_file({k: v.contiguous() for k, v in clf.backbone.state_dict().items()}, tmp_path / "bb.safetensors")
    torch.save({"state_dict": clf.state_dict(), "epoch": 3}, tmp_path / "full.pth")
    assert main(["import-model", str(tmp_path / "bb.safetensors"), "--model", "simplecnn", "--dataset", "digits",
                 "--out", str(tmp_path / "a"), "--mean", "0.5", "--std", "0.25"]) == 0
    assert "audit it with: cuba defend all" in capsys.readouterr().out
    assert (tmp_path / "a" / "predictions.npz").is_file() and (tmp_path / "a" / "metrics.json").is_file()
    assert main(["import-model", str(tmp_path / "full.pth"), "--model", "simplecnn", "--dataset", "digits",
                 "--out", str(tmp_path / "b"), "--allow-pickle"]) == 0
    assert set(read_state_dict(tmp_path / "full.pth", allow_pickle=True)) == set(clf.state_dict())
    assert main(["import-model", str(tmp_path / "full.pth"), "--model", "resnet18", "--dataset", "digits",
                 "--out", str(tmp_path / "c"), "--allow-pickle"]) == 2
    assert "does not fit resnet18" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    assert main(["import-model", str(tmp_path / "junk.safetensors"), "--model", "simplecnn", "--dataset", "digits",
                 "--out", str(tmp_path / "d")]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err
