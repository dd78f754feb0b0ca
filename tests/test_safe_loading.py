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
    err = capsys.readouterr().err
    assert "does not fit resnet18" in err and "missing key(s)" in err and "another architecture (--model)?" in err
    assert len(err) < 600  # a summary, not torch's list of every key
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    assert main(["import-model", str(tmp_path / "junk.safetensors"), "--model", "simplecnn", "--dataset", "digits",
                 "--out", str(tmp_path / "d")]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Polyfit may be poorly conditioned")  # SentiNet on 20 inputs of an untrained model
def test_an_imported_model_is_audited_as_unknown_not_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """defense.json of an imported model says "imported": an input detector has no backdoor inputs
    (its reason says why, not "clean model"), a model-level rule's verdict is flagged / not flagged,
    and the model enters no AUROC (its label is what the audit asks)."""
    import json

    from cuba.defenses import DEFENSES
    from cuba.defenses.base import model_verdict
    from cuba.defenses.model_level import model_auroc
    from cuba.defenses.verdict import verdict

    clf = build_classifier("simplecnn", 1, 10, 16)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, tmp_path / "w.safetensors")
    run = tmp_path / "suspect"
    assert main(["import-model", str(tmp_path / "w.safetensors"), "--model", "simplecnn", "--dataset", "digits",
                 "--out", str(run)]) == 0
    assert main(["defend", "entropy", str(run), "--device", "cpu", "--set", "n_eval=50", "--set", "n_calib=50"]) == 0
    f = json.loads((run / "defenses" / "entropy" / "defense.json").read_text())
    assert f["setting"] == "imported" and f["applicable"] is False
    assert f["reason"].startswith("imported model: its trigger, if any, is unknown")
    assert verdict(DEFENSES["entropy"], {**f, "applicable": True, "far_at_frr_1pct_two_sided": 0.0}) is None
    # the paper's input detectors too: their probe-patch numbers are no audit of an unknown trigger
    for name, small in (("strip", ["n_overlay=8", "n_eval=40", "n_calib=40"]),
                        ("sentinet", ["n_eval=20", "n_calib=20", "n_holdout=10"]),
                        ("scale-up", ["n_eval=40", "n_ref=40", "n_calib=40"])):
        sets = [a for v in small for a in ("--set", v)]
        assert main(["defend", name, str(run), "--device", "cpu", *sets]) == 0
        g = json.loads((run / "defenses" / name / "defense.json").read_text())
        assert g["applicable"] is False and g["reason"].startswith("imported model: its trigger, if any, is unknown"), name
    nc = DEFENSES["neural-cleanse"]
    assert verdict(nc, {"setting": "imported", **model_verdict(3.0, "high", True, True)}) == "flagged"
    assert verdict(nc, {"setting": "imported", **model_verdict(0.5, "high", False, True)}) == "not flagged"
    entries = [("imported", model_verdict(9.0, "high", True, True)), ("cuba-fra", model_verdict(2.0, "high", True, True)),
               ("clean", model_verdict(1.0, "high", False, True))]
    assert model_auroc(entries, ("cuba", "other")) == (1.0, 1, 1)
