"""Tests for the ``cuba`` command line and the run folder it writes (tiny real runs on digits)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cuba.cli import format_metrics_table, main
from cuba.runs import METRIC_KEYS, load_predictions, load_run_config, load_weights, read_json, save_weights

TINY = ["--dataset", "digits", "--epochs", "0.2", "--no-progress", "--n-train", "256", "--n-test", "100"]


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_one_line_error(capsys: pytest.CaptureFixture, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cuba: error: "), err
    for n in needles:
        assert n in lines[0], err
    return lines[0]


# --- user errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--tau", "0"], "tau: "),
    (["--variant", "xyz"], "variant: "),
    (["--model", "vgg"], "model: "),
    (["--dataset", "no-such-set"], "dataset: "),
    (["--set", "foo=1"], "unknown config field 'foo'"),
    (["--set", "eps_start"], "FIELD=VALUE"),
    (["--set", "eps_start=2"], "eps_start: "),
    (["--variant", "nra-2", "--k", "3"], "k: given twice with different values (3, and 2 from variant 'nra-2')"),
    (["--variant", "fra", "--k", "3"], "k: only NRA has a target-set size"),
])
def test_train_bad_values_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str], needle: str) -> None:
    rc = main(["train", "--out", str(tmp_path / "r"), "--no-progress", *argv])
    assert_one_line_error(capsys, rc, needle)
    assert not (tmp_path / "r").exists()  # failed before writing anything


def test_train_missing_config_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    rc = main(["train", "--config", str(tmp_path / "absent.yaml"), "--no-progress"])
    assert_one_line_error(capsys, rc, "config file not found", "absent.yaml")


def test_train_flags_override_config_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tau: 0\n")
    # the file's bad tau is reported ...
    assert_one_line_error(capsys, main(["train", "--config", str(cfg), "--no-progress"]), "tau: ")
    # ... and a flag overrides the file (then the bad model is the first error)
    rc = main(["train", "--config", str(cfg), "--tau", "0.5", "--model", "vgg", "--no-progress"])
    assert_one_line_error(capsys, rc, "model: ")


def test_version(capsys: pytest.CaptureFixture) -> None:
    from cuba import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cuba {__version__}"


def test_evaluate_folder_without_config(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    rc = main(["evaluate", str(tmp_path)])
    assert_one_line_error(capsys, rc, "is not a run folder", "config.yaml")
    rc = main(["evaluate", str(tmp_path / "missing"), "--from-predictions"])
    assert_one_line_error(capsys, rc, f"{tmp_path / 'missing'}: no such file or directory")
    (tmp_path / "x.cuba").write_bytes(b"not a folder")
    rc = main(["figures", str(tmp_path / "x.cuba")])
    assert_one_line_error(capsys, rc, "x.cuba is a file, not a run folder (a pack from `cuba pack` is read by")


def test_format_metrics_table_shows_dash_for_missing() -> None:
    table = format_metrics_table([("clean", {"ca": 0.9876, "asr": float("nan"), "psnr": None})])
    row = table.splitlines()[2]
    assert row.startswith("clean") and "98.76" in row and "–" in row and "nan" not in row and "None" not in row


# --- tiny real runs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuba_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "cuba"
    rc = main(["train", *TINY, "--attack", "cuba", "--out", str(run_dir)])
    assert rc == 0
    return run_dir


def test_run_folder_contents(cuba_run: Path) -> None:
    for name in ("config.yaml", "metrics.json", "history.json", "predictions.npz", "targets.json",
                 "classifier.safetensors", "generator.safetensors", "figures/triggers.png", "figures/histograms.png",
                 "figures/confidences.png"):
        assert (cuba_run / name).is_file(), name
    for png in ("figures/triggers.png", "figures/histograms.png", "figures/confidences.png"):
        assert (cuba_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = load_run_config(cuba_run)
    assert (cfg.dataset, cfg.attack, cfg.variant, cfg.epochs, cfg.n_train, cfg.n_test) == ("digits", "cuba", "fra", 0.2, 256, 100)
    assert cfg.progress is False
    targets = read_json(cuba_run / "targets.json")
    assert targets == {str(c): [t for t in range(10) if t != c] for c in range(10)}


def test_run_metrics(cuba_run: Path) -> None:
    m = read_json(cuba_run / "metrics.json")
    assert set(METRIC_KEYS) <= set(m)
    for key in ("ca", "asr", "asr_c"):
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0, key
    if m["asr"] > 0:
        assert 0.0 <= m["ds_min"] <= m["ds"] <= 1.0
    else:
        assert m["ds"] is None
    assert 0.0 <= m["d_p"] <= math.log(10) + 1e-9
    assert m["psnr"] > 0 and m["ssim"] <= 1.0
    # the residual generator keeps every backdoor image within eps (small slack for bf16 autocast)
    assert 0.0 <= m["linf"] <= 0.05 * (1 + 2**-7)
    assert m["psnr"] >= 20 * math.log10(1 / 0.05) - 0.1
    assert (m["n_train"], m["n_test"], m["num_classes"]) == (256, 100, 10)


def test_run_predictions(cuba_run: Path) -> None:
    with np.load(cuba_run / "predictions.npz") as z:
        n = 100
        for key in ("y_true", "y_pred_clean", "y_pred_backdoor", "psnr", "ssim", "linf"):
            assert z[key].shape == (n,), key
        ts = z["target_sets"]
        assert ts.shape == (n, 10) and ts.dtype == np.bool_
        # FRA: each sample's target row is every class but its own
        assert (ts.sum(1) == 9).all() and not ts[np.arange(n), z["y_true"]].any()
        ca = float((z["y_true"] == z["y_pred_clean"]).mean())
        asr = float((z["y_true"] != z["y_pred_backdoor"]).mean())
    m = read_json(cuba_run / "metrics.json")
    assert m["ca"] == pytest.approx(ca) and m["asr"] == pytest.approx(asr)


def test_evaluate_json(cuba_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(cuba_run), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    stored = read_json(cuba_run / "metrics.json")
    assert "ds_per_class" not in out
    assert out["stored"]["ca"] == stored["ca"]
    # same weights, same test subset: the recomputed label metrics match
    for key in ("ca", "asr", "asr_c"):
        assert out[key] == pytest.approx(stored[key], abs=0.02), key


def test_evaluate_from_predictions_reproduces_metrics(cuba_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(cuba_run), "--from-predictions", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    stored = read_json(cuba_run / "metrics.json")
    for key in ("ca", "asr", "asr_c", "ds", "ds_min", "d_p", "psnr", "ssim", "linf"):
        if stored[key] is None:
            assert out[key] is None or math.isnan(out[key]), key
        else:
            assert out[key] == pytest.approx(stored[key], rel=1e-6, abs=1e-9), key


def test_evaluate_table(cuba_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(cuba_run), "--from-predictions"]) == 0
    out = capsys.readouterr().out
    assert "recomputed" in out and "stored" in out


def test_saved_predictions_load_back(cuba_run: Path) -> None:
    pred, targets = load_predictions(cuba_run)
    assert targets is not None and targets.dtype == torch.bool and targets.shape == (10, 10)
    assert pred.y_pred_backdoor is not None and len(pred.y_true) == 100


def test_figures_command_redraws_a_runs_figures(cuba_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (cuba_run / "figures" / "confidences.png").unlink()  # as for a run trained before the figure existed
    assert main(["figures", str(cuba_run), "--device", "cpu"]) == 0
    assert "triggers.png, confidences.png, histograms.png" in capsys.readouterr().out
    assert (cuba_run / "figures" / "confidences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from cuba import pipeline

    seen = {}  # --data-dir reaches draw_figures, as for cuba evaluate (a run made in another folder)
    monkeypatch.setattr(pipeline, "draw_figures", lambda run_dir, device, data_dir: seen.setdefault("data_dir", data_dir) and [])
    assert main(["figures", str(cuba_run), "--data-dir", str(tmp_path)]) == 0
    assert seen["data_dir"] == str(tmp_path)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["figures", str(tmp_path)]) == 2
    assert "is not a finished run folder (no config.yaml, predictions.npz)" in capsys.readouterr().err


def test_confidence_figure_marks_the_true_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    from cuba import figures

    probs = np.full((2, 3), 0.25)
    probs[0, 0] = probs[1, 2] = 0.5
    targets = torch.tensor([[False, True, True], [True, False, True], [True, True, False]])
    seen = {}
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: seen.setdefault("fig", fig) and real_save(fig, path))
    assert figures.plot_confidences(probs, np.array([0, 2]), targets, tmp_path / "c.png").is_file()
    ax = seen["fig"].axes[0]
    boxes = [(p.get_x(), p.get_y()) for p in ax.patches]
    assert boxes == [(-0.5, -0.5), (1.5, 0.5)]  # row 0: true class 0; row 1: true class 2
    assert [t.get_text() for t in ax.texts] == ["0.25", "0.25", "0.25", "0.25"]  # numbers only on T(y)
    plt.close("all")


def test_clean_run_has_no_generator(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "clean"
    assert main(["train", *TINY, "--attack", "none", "--out", str(run_dir)]) == 0
    assert (run_dir / "classifier.safetensors").is_file()
    assert not (run_dir / "generator.safetensors").exists()
    assert not (run_dir / "targets.json").exists()
    assert not (run_dir / "figures" / "triggers.png").exists()
    m = read_json(run_dir / "metrics.json")
    assert 0.0 <= m["ca"] <= 1.0
    assert all(m[k] is None for k in ("asr", "asr_c", "ds", "ds_min", "d_p", "psnr", "ssim", "linf"))
    with np.load(run_dir / "predictions.npz") as z:
        assert set(z.files) == {"y_true", "y_pred_clean"}
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--from-predictions", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ca"] == pytest.approx(m["ca"])


def test_weights_round_trip(tmp_path: Path) -> None:
    from cuba.models import build_classifier

    torch.manual_seed(0)
    a = build_classifier("simplecnn", 1, 10, 16, torch.tensor([0.3]), torch.tensor([0.2])).eval()
    save_weights(tmp_path / "w.safetensors", a)
    torch.manual_seed(1)
    b = load_weights(tmp_path / "w.safetensors", build_classifier("simplecnn", 1, 10, 16)).eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert torch.equal(b.normalize.mean.flatten(), torch.tensor([0.3]))


def test_evaluate_write_updates_metrics(cuba_run: Path, tmp_path: Path) -> None:
    import json
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(cuba_run, run)
    m = json.loads((run / "metrics.json").read_text())
    m["ca"] = -1.0  # a stale value that --write must replace
    (run / "metrics.json").write_text(json.dumps(m))
    assert main(["evaluate", str(run), "--write"]) == 0
    new = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= new["ca"] <= 1.0 and new["previous"]["ca"] == -1.0


# --- validation split, presets, degenerate runs ----------------------------------------------------

def test_run_folder_has_its_validation_split(cuba_run: Path) -> None:
    import torch

    from cuba.data.split import indices_hash

    split = read_json(cuba_run / "split.json")
    val = torch.tensor(split["val_indices"])
    # carved from all 1,437 digits training images before --n-train 256 was drawn from the rest
    assert split["n_train_full"] == 1437 and split["n_val"] == len(val) == 142 and split["n_train"] == 256
    assert split["val_indices_sha256"] == indices_hash(val) and split["val_fraction"] == 0.1
    m = read_json(cuba_run / "metrics.json")
    assert set(m["val"]) >= {"ca", "asr", "asr_c", "ds"} and m["n_val"] == 142
    assert m["degenerate"] is (m["ca"] < 0.2)
    assert all(h["split"] == "val" for h in read_json(cuba_run / "history.json"))


def test_a_run_is_reloaded_with_the_validation_images_it_recorded(cuba_run: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    from cuba.data import DataError
    from cuba.defenses.base import load_attack_run
    from cuba.runs import RunFolder

    run = tmp_path / "run"
    shutil.copytree(cuba_run, run)
    split = read_json(run / "split.json")
    assert split["val_group_size"] == 1  # digits has no tracks
    # a run trained under an older rule for drawing the split: its readers must hold out what it held out
    split["val_indices"] = list(range(0, 1420, 10))
    (run / "split.json").write_text(json.dumps(split))
    folder = RunFolder(run)
    data = folder.data(folder.config())
    assert data.val_indices.tolist() == split["val_indices"] and len(data.y_train) == 256
    assert load_attack_run(run, device="cpu").data.val_indices.equal(torch.tensor(split["val_indices"]))
    split["val_indices"] = [0, 5000]
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match="recorded validation indices reach 5000, but the training set has 1437 images"):
        folder.data(folder.config())


def test_validation_split_is_the_same_for_every_seed_and_budget() -> None:
    from cuba.config import make_config
    from cuba.data import data_for as load_data

    a = load_data(make_config({"seed": 0}))
    b = load_data(make_config({"seed": 3, "n_train": 300}))
    assert torch.equal(a.val_indices, b.val_indices)
    assert len(b.y_train) == 300 and len(a.y_train) == 1437 - 142
    # stratified: each of the 10 classes gives 10% of its images (14, or 15 where it has 143+)
    assert torch.bincount(a.y_val).tolist() == [round(0.1 * int(n)) for n in torch.bincount(torch.cat([a.y_train, a.y_val]))]
    assert not load_data(make_config({"val_fraction": 0})).has_val


def test_old_run_folders_load_without_a_validation_split(tmp_path: Path) -> None:
    import yaml

    from cuba.config import make_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in make_config({}).to_dict().items() if k != "val_fraction"}))
    assert load_run_config(tmp_path).val_fraction == 0.0  # trained before the split existed


def test_bare_train_gets_the_data_sets_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--epochs", "0.2", "--n-train", "128", "--n-test", "50", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    assert "using the demo preset" in capsys.readouterr().out
    cfg = load_run_config(tmp_path / "a")
    assert (cfg.warmup_epochs, cfg.gamma_ramp_epochs, cfg.lr, cfg.epochs) == (1.0, 2.0, 0.05, 0.2)  # flags still win
    conf = tmp_path / "c.yaml"
    conf.write_text("epochs: 0.2\nn_train: 128\nn_test: 50\n")
    assert main(["train", "--config", str(conf), "--no-progress", "--out", str(tmp_path / "b")]) == 0
    assert "preset" not in capsys.readouterr().out and load_run_config(tmp_path / "b").warmup_epochs == 0.0


def test_preset_for_names_and_files() -> None:
    from cuba.cli import preset_for

    assert preset_for("digits") == "demo" and preset_for("MNIST") == "mnist"
    assert preset_for("../shared/data/gtsrb.npz") == "gtsrb" and preset_for("my-data.npz") is None


def test_degenerate_reason_is_chance_level_ca() -> None:
    from cuba.pipeline import degenerate_reason

    assert "chance" in degenerate_reason(0.10, 10) and degenerate_reason(0.199, 10) is not None
    assert degenerate_reason(0.2, 10) is None and degenerate_reason(0.05, 43) is None


def test_degenerate_run_is_flagged_in_words(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import cuba.pipeline as pipeline

    monkeypatch.setattr(pipeline, "degenerate_reason", lambda ca, k: "CA 0.00% is at chance level")
    assert main(["train", *TINY, "--out", str(tmp_path / "d")]) == 0
    assert "WARNING: degenerate run" in capsys.readouterr().out
    assert read_json(tmp_path / "d" / "metrics.json")["degenerate"] is True
    assert read_json(tmp_path / "d" / "status.json")["degenerate_reason"] == "CA 0.00% is at chance level"


def test_ds_scale_line_places_ds_between_collapse_and_uniform() -> None:
    from cuba.cli import ds_scale_line

    line = ds_scale_line("cuba-fra", {"ds": 0.9242, "ds_floor": 0.7, "ds_uniform": 0.9409, "effective_classes": 7.93})
    assert line == "cuba-fra: DS 92.42 between collapse 70.00 and uniform-random 94.09; 7.93 effective classes per source class"
    assert ds_scale_line("clean", {"ca": 0.9, "ds_uniform": float("nan")}) is None
    assert ds_scale_line("old run", {"ds": 0.9}) is None  # metrics.json from before the keys existed


def test_metrics_json_splits_asr_by_clean_correctness(cuba_run: Path) -> None:
    m = read_json(cuba_run / "metrics.json")
    assert {"asr_clean_wrong", "asr_pred", "ds_floor", "ds_uniform", "effective_classes"} <= set(m)


def test_val_fraction_flag(tmp_path: Path) -> None:
    assert main(["train", *TINY, "--attack", "none", "--val-fraction", "0", "--out", str(tmp_path / "v")]) == 0
    split = read_json(tmp_path / "v" / "split.json")
    assert split["n_val"] == 0 and split["val_indices"] == [] and "val" not in read_json(tmp_path / "v" / "metrics.json")


def test_set_takes_section_dotted_fields_and_overrides_the_preset(capsys: pytest.CaptureFixture) -> None:
    import argparse

    from cuba.cli.common import config_values, parse_set

    assert parse_set(["attack.tau=0.2", "optimisation.lr=0.03", "n-train=5"]) == {"tau": 0.2, "lr": 0.03, "n_train": 5}
    assert parse_set(["attack.tau=0.2"], sections=False) == {"attack.tau": 0.2}  # defense parameters: as given
    args = argparse.Namespace(config=None, set=["attack.tau=0.2"], dataset="digits")
    values = config_values(args)  # the digits preset says tau 0.1; the dotted --set wins
    assert values["tau"] == 0.2 and values["epochs"] == 30
    rc = main(["train", "--dataset", "digits", "--set", "data.tau=0.2", "--out", "x"])
    assert_one_line_error(capsys, rc, "data.tau: 'tau' is in section 'attack', not 'data'")
