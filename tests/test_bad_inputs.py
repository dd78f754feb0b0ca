"""Bad inputs end in one line on stderr and exit code 2 (docs/cli.md's promise), and never in a
silent wrong result: damaged run files, --set values that are not YAML or a defense cannot take,
paths of the wrong kind, a grid of no cells, an import over a trained run, a one-class data set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cuba.cli import main
from cuba.config import ConfigError, make_config
from cuba.runs import save_config, write_json

TINY = ["--dataset", "digits", "--epochs", "0.05", "--n-train", "128", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def _one_line_error(capsys: pytest.CaptureFixture[str], needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cuba: error: ") and needle in err[0], err


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("metrics.json", "{not json", "metrics.json: not readable as JSON"),
    ("config.yaml", "[1, 2", "config.yaml: not readable as a run's config"),
    ("config.yaml", "- a\n- b\n", "a mapping of sections was expected, got list"),
    ("classifier.safetensors", "garbage", "classifier.safetensors: not readable as safetensors weights"),
])
def test_a_damaged_run_file_is_named_in_one_line(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  name: str, content: str, needle: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / name).write_text(content)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    _one_line_error(capsys, needle)


def test_status_json_that_is_not_a_record_is_not_finished(trained: Path, tmp_path: Path) -> None:
    from cuba.runs import is_finished

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "status.json").write_text('"finished"')
    assert not is_finished(run)


@pytest.mark.parametrize(("args", "needle"), [
    (["defend", "strip", "RUN", "--set", "frr=abc"], "strip: cannot take frr='abc'"),
    (["defend", "fine-pruning", "RUN", "--set", "ratios=5"], "fine-pruning: cannot take ratios=5"),
    (["defend", "all", "RUN", "--set", "no_such=1"], "--set: no defense takes the parameter no_such"),
    (["defend", "strip", "RUN", "--set", "n_eval=[1,"], "--set n_eval=[1,: the value is not valid YAML"),
    (["train", *TINY, "--set", "targets=[1,2"], "--set targets=[1,2: the value is not valid YAML"),
    (["train", *TINY, "--device", "mps"], "no Apple GPU"),
])
def test_bad_values_are_one_line_errors(trained: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                        needle: str) -> None:
    if "mps" in args and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    capsys.readouterr()
    assert main([str(trained) if a == "RUN" else a for a in args]) == 2
    _one_line_error(capsys, needle)
    assert not (trained / "defenses" / "strip").exists()  # nothing ran before the check


def test_an_existing_file_as_out_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["train", *TINY, "--out", str(tmp_path / "afile" / "run")]) == 2
    _one_line_error(capsys, "afile")


def test_import_model_never_writes_over_a_run(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (trained / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["import-model", str(trained / "classifier.safetensors"), "--model", "simplecnn", "--dataset", "digits",
                 "--out", str(trained)]) == 2
    _one_line_error(capsys, "exists and is not an empty folder")
    assert (trained / "config.yaml").read_text() == before


def test_a_grid_of_no_cells_and_zero_jobs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\ndatasets: [digits]\nattacks: {mnist: [cuba]}\nvariants: [fra]\nseeds: [0]\n")
    assert main(["reproduce", str(grid), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "expands to no cell")
    grid.write_text("name: g\ndatasets: [digits]\nattacks: [none]\nseeds: [0]\n")
    assert main(["reproduce", str(grid), "--out", str(tmp_path / "o"), "--executor", "local", "--jobs", "0"]) == 2
    _one_line_error(capsys, "--jobs: must be a positive number of processes, got 0")


def test_compare_name_must_stay_inside_out(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(trained), "--out", str(tmp_path / "o"), "--name", "../../x"]) == 2
    _one_line_error(capsys, "--name: a file name stem inside --out, not a path")
    assert not (tmp_path.parent / "x.md").exists()  # where o/../../x.md would have landed


def test_a_one_class_data_set_is_refused(tmp_path: Path) -> None:
    from cuba.data import DataError, load_dataset

    x = np.zeros((8, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", x_train=x, y_train=np.zeros(8, dtype=np.int64), x_test=x[:2],
             y_test=np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match="a classifier needs at least 2 classes, found 1"):
        load_dataset(str(tmp_path / "one.npz"))


def test_sweep_plot_over_a_field_of_names(tmp_path: Path) -> None:
    from cuba.figures import plot_sweep

    rows = [{"generator_mode": m, "n": 1, **{k: (v, 0.0) for k, v in (("ds", 90.0), ("asr", 99.0), ("ca", 98.0))},
             "ds_values": [90.0]} for m in ("residual", "image")]
    assert plot_sweep(rows, "generator_mode", tmp_path / "s.png").stat().st_size > 1000


def test_hand_made_run_with_a_list_config_is_refused(tmp_path: Path) -> None:
    from cuba.runs import RunFileError, load_run_config

    save_config(tmp_path, make_config({"dataset": "digits"}))
    write_json(tmp_path / "metrics.json", {"ca": 0.5})
    (tmp_path / "config.yaml").write_text(json.dumps([1]))
    with pytest.raises(RunFileError, match="config.yaml: not readable"):
        load_run_config(tmp_path)


def test_pack_refuses_damaged_weights(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "classifier.safetensors").write_bytes(b"\x08" + b"\x00" * 15)
    capsys.readouterr()
    assert main(["pack", str(run), "--out", str(tmp_path / "r.cuba")]) == 2
    _one_line_error(capsys, "classifier.safetensors: not readable as safetensors weights")
    assert not (tmp_path / "r.cuba").exists()


def test_from_predictions_refuses_an_attacked_run_without_backdoor_predictions(trained: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with np.load(run / "predictions.npz") as z:
        kept = {k: z[k] for k in z.files if k != "y_pred_backdoor"}
    np.savez(run / "predictions.npz", **kept)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--from-predictions"]) == 2
    _one_line_error(capsys, "lack the backdoor predictions")


def test_a_run_that_failed_before_its_first_checkpoint_takes_a_corrected_command(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "nra-20", "--out", str(out)]) == 2  # k 20 > 9 wrong classes
    # what the new path is for: a config and a failed status, no checkpoint
    assert json.loads((out / "status.json").read_text())["state"] == "failed" and (out / "config.yaml").is_file()
    assert not (out / "checkpoint.pt").exists()
    assert main(["train", *TINY, "--variant", "nra-2", "--out", str(out)]) == 0


def test_a_resumed_run_keeps_the_split_it_started_with(tmp_path: Path) -> None:
    from cuba.pipeline import _resumed_data

    cfg = make_config({"dataset": "digits", "n_train": 128, "out": str(tmp_path)})
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # only its presence matters here
    write_json(tmp_path / "split.json", {"val_indices": list(range(0, 1400, 10))})
    assert _resumed_data(cfg, tmp_path).val_indices.tolist() == list(range(0, 1400, 10))
    gtsrb = make_config({"dataset": "gtsrb", "out": str(tmp_path)}, check_paths=False)
    (tmp_path / "split.json").unlink()  # a checkpoint from before split.json was written first
    with pytest.raises(ConfigError, match="predates the track-aware validation split of gtsrb"):
        _resumed_data(gtsrb, tmp_path)
