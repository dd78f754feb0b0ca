"""cuba.api (your own model and data from Python) and external model names (torchvision:, timm:,
package.module:factory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cuba import api
from cuba.cli import main
from cuba.config import ConfigError, make_config
from cuba.models import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """A user's own classifier (top level, so its import path can rebuild it)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ViewNet(nn.Module):
    """Older code's habit: a convolution's output flattened with .view, which refuses channels_last strides."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * image_size * image_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def make_net(num_classes: int) -> nn.Module:  # a factory taking only what it needs
    return Net(1, num_classes)


def three_classes() -> nn.Module:  # ignores the data's K: the shape check must catch it
    return Net(1, 3)


def test_model_paths_for_names_factories_and_instances() -> None:
    from cuba.api import _model_path

    assert _model_path("simplecnn") == "simplecnn"
    assert _model_path(Net) == f"{__name__}:Net" and _model_path(make_net) == f"{__name__}:make_net"
    inst = Net(1, 3)
    assert _model_path(inst) == f"{__name__}:Net"
    built = build_classifier(f"{__name__}:Net", 1, 3, 8)
    assert all(torch.equal(a, b) for a, b in zip(inst.state_dict().values(), built.backbone.state_dict().values()))
    with pytest.raises(ConfigError, match="cannot be imported later; define it at the top level"):
        _model_path(lambda num_classes: Net(1, num_classes))
    with pytest.raises(ConfigError, match="a model name, a factory or an nn.Module, got int"):
        _model_path(3)


def test_external_model_names_are_checked() -> None:
    assert make_config({"model": "torchvision:resnet18"}).model == "torchvision:resnet18"
    for bad, needle in (("torchvision:", "needs an architecture name"), ("my model:x", "package.module:factory"),
                        ("lenet", "must be one of simplecnn")):
        with pytest.raises(ConfigError, match=needle):
            make_config({"model": bad})
    with pytest.raises(ValueError, match="torchvision:vgg11 cannot take 1x16x16 images"):
        build_classifier("torchvision:vgg11", 1, 10, 16)
    with pytest.raises(ValueError, match="no classification architecture 'get_model'"):
        build_classifier("torchvision:get_model", 1, 10, 16)
    with pytest.raises(ValueError, match="cannot import 'nowhere.at_all:f'"):
        build_classifier("nowhere.at_all:f", 1, 10, 16)
    with pytest.raises(ValueError, match=r"must map images to \(batch, 10\) logits, got \(2, 3\)"):
        build_classifier(f"{__name__}:three_classes", 1, 10, 8)


def test_own_model_module_is_found_from_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the console script does not put the working folder on sys.path; a module there is found anyway
    (tmp_path / "tinymod_cuba_test.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, in_channels, num_classes):\n"
        "        super().__init__()\n"
        "        self.f = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.f(x)\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    assert build_classifier("tinymod_cuba_test:Net", 1, 10, 8)(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="cannot import 'tinymod_cuba_test:Nope': module 'tinymod_cuba_test' has no 'Nope'"):
        build_classifier("tinymod_cuba_test:Nope", 1, 10, 8)
    with pytest.raises(ValueError, match=r"cannot import 'nowhere.at_all:f' .*run from the folder that holds it"):
        build_classifier("nowhere.at_all:f", 1, 10, 8)
    sys.modules.pop("tinymod_cuba_test", None)


def test_a_run_whose_model_cannot_be_imported_is_one_error_line(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from cuba.engine import make_engine
    from cuba.runs import RunFolder

    cfg = make_config({"model": "nowhere.at_all:f"})
    data = SimpleNamespace(channels=1, num_classes=10, image_size=8)
    with pytest.raises(ConfigError, match=f"^{tmp_path}: its model cannot be rebuilt: cannot import 'nowhere.at_all:f'"):
        RunFolder(tmp_path).models(cfg, data, make_engine("cpu", "fp32", channels_last=False))


def test_timm_names_need_timm_or_build(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_timm(name: str, *args: object, **kwargs: object):  # noqa: ANN202 -- a stand-in for import
        if name == "timm":
            raise ImportError("no timm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ValueError, match=r"timm:NAME needs timm \(pip install -e '.\[timm\]'\); it is optional"):
        build_classifier("timm:resnet18", 3, 10, 32)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_families_adapt_to_the_data(arch: str) -> None:
    clf = build_classifier(f"torchvision:{arch}", 1, 7, 32)
    assert clf(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    assert len(clf.stages()) == 3  # Fine-pruning / NAD / SentiNet can hook it


def test_attack_on_arrays_with_an_own_model_then_load_defend_and_the_cli(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    y = np.arange(240) % 3
    x = (g.random((240, 1, 8, 8)) * 0.3 + y[:, None, None, None] * 0.3).astype(np.float32)  # learnable classes
    run = api.attack(classifier=Net, train=(torch.from_numpy(x[:180]), y[:180]), test=(torch.from_numpy(x[180:]), y[180:]),
                     epochs=1, batch_size=32, out=tmp_path / "r", progress=False, val_fraction=0.1)
    assert (tmp_path / "r" / "data.npz").is_file() and run.config.model == f"{__name__}:Net"
    assert set(run.metrics) >= {"ca", "asr", "ds"} and run.metrics["n_test"] == 60
    again = api.load(tmp_path / "r")
    assert again.metrics == json.loads((tmp_path / "r" / "metrics.json").read_text())
    clf, gen = again.models()
    assert isinstance(clf.backbone, Net) and gen is not None
    fields = api.defend(run, "strip", n_overlay=4, n_eval=20, n_calib=16)
    assert "far_at_frr_1pct" in fields and (tmp_path / "r" / "defenses" / "strip" / "defense.json").is_file()
    with pytest.raises(ConfigError, match="strip has no parameter nope"):
        api.defend(run, "strip", nope=1)
    with pytest.raises(ConfigError, match="give both"):
        api.attack(classifier=Net, train=(x, y))


def test_cli_trains_a_torchvision_model(tmp_path: Path) -> None:
    rc = main(["train", "--dataset", "digits", "--model", "torchvision:resnet18", "--attack", "none", "--epochs", "0.05",
               "--n-train", "128", "--n-test", "40", "--batch-size", "32", "--no-progress", "--out", str(tmp_path / "tv")])
    assert rc == 0
    assert json.loads((tmp_path / "tv" / "metrics.json").read_text())["n_test"] == 40
    from cuba.runs import default_run_dir, safe_name

    assert safe_name("torchvision:resnet18") == "torchvision-resnet18"
    assert ":" not in default_run_dir(make_config({"model": "torchvision:resnet18"})).name


@pytest.mark.slow  # a real 30-epoch CUBA run of a user's model (about 1.5 min on 2 CPU cores)
def test_own_model_example_reaches_the_attack(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "own_model.py"), str(tmp_path / "own")],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert not m["degenerate"] and m["ca"] > 0.9 and m["asr"] >= 0.9, m
    assert "STRIP: FAR at FRR 1%" in out.stdout


def test_defenses_rebuild_a_model_that_refuses_channels_last_nchw(tmp_path: Path) -> None:
    """Defenses build the classifier channels_last (faster on a CPU); a model whose forward uses
    .view on a convolution's output cannot run so, and is rebuilt NCHW instead of failing."""
    from cuba.defenses import load_attack_run, run_defense
    from cuba.pipeline import run_training

    base = {"dataset": "digits", "attack": "badnets", "epochs": 1, "batch_size": 64, "progress": False, "device": "cpu",
            "precision": "fp32"}
    view_run = tmp_path / "view"
    # training needs the same: its engine is channels_last by default
    run_training(make_config({**base, "model": f"{__name__}:ViewNet", "channels_last": False, "out": str(view_run)}))
    run = load_attack_run(view_run, device="cpu")
    assert run.engine.channels_last is False
    res = run_defense("strip", run, tmp_path / "d", n_eval=20, n_calib=20, n_overlay=4)
    assert 0.0 <= res.fields["auroc"] <= 1.0
    plain = tmp_path / "plain"
    run_training(make_config({**base, "out": str(plain)}))
    assert load_attack_run(plain, device="cpu").engine.channels_last is True
