"""The run-folder contract (cuba.runs): one rule for a finished run, used by training, reproduce,
sweep, compare and the defenses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuba.runs import is_finished


@pytest.mark.parametrize(("files", "finished"), [
    ({}, False),                                                         # empty folder
    ({"status.json": {"state": "finished"}}, False),                     # no metrics
    ({"metrics.json": {"ca": 0.9}}, True),                               # written before status.json existed
    ({"metrics.json": {"ca": 0.9}, "status.json": {"state": "finished"}}, True),
    ({"metrics.json": {"ca": 0.9}, "status.json": {"state": "running"}}, False),  # crashed between the two writes
    ({"metrics.json": {"ca": 0.9}, "status.json": {"state": "failed"}}, False),
    ({"metrics.json": {"ca": 0.9}, "status.json": "{not json"}, False),  # a torn status file
])
def test_is_finished(tmp_path: Path, files: dict, finished: bool) -> None:
    for name, body in files.items():
        (tmp_path / name).write_text(body if isinstance(body, str) else json.dumps(body))
    assert is_finished(tmp_path) is finished
    assert is_finished(str(tmp_path)) is finished


def test_every_caller_uses_the_one_rule(tmp_path: Path) -> None:
    # a folder whose status says running: compare must not list it, a defense must refuse it
    from cuba.compare import find_runs
    from cuba.defenses import load_attack_run

    run = tmp_path / "r"
    run.mkdir()
    for name in ("config.yaml", "classifier.safetensors"):
        (run / name).write_text("x")
    (run / "metrics.json").write_text("{}")
    (run / "status.json").write_text(json.dumps({"state": "running"}))
    with pytest.raises(FileNotFoundError, match="holds no finished run"):
        find_runs([tmp_path])
    with pytest.raises(FileNotFoundError, match="is not a finished run folder"):
        load_attack_run(run)


def test_run_folder_reads_what_training_writes(tmp_path: Path) -> None:
    import torch

    from cuba.config import make_config
    from cuba.data import data_for
    from cuba.engine import make_engine
    from cuba.models import build_classifier
    from cuba.runs import RunFolder, save_config, save_weights, write_json

    run = RunFolder(tmp_path / "r")
    assert not run.is_run() and run.metrics() == {} and run.status() == {} and run.targets() is None
    with pytest.raises(FileNotFoundError, match=r"/r: no such file or directory$"):
        run.require("classifier.safetensors")
    run.path.mkdir()
    with pytest.raises(FileNotFoundError, match=r"is not a run folder \(no config.yaml, classifier.safetensors\)"):
        run.require("classifier.safetensors")
    cfg = make_config({"dataset": "digits", "attack": "none", "out": str(run.path)})
    data = data_for(cfg)
    torch.manual_seed(0)
    clf = build_classifier(cfg.model, data.channels, data.num_classes, data.image_size)
    save_config(run.path, cfg)
    save_weights(run.path / "classifier.safetensors", clf)
    write_json(run.path / "status.json", {"state": "running"})
    with pytest.raises(FileNotFoundError, match=r"is not a finished run folder \(status.json does not say finished\)"):
        run.require("classifier.safetensors", finished=True)
    write_json(run.path / "metrics.json", {"ca": 0.5})
    write_json(run.path / "status.json", {"state": "finished"})
    assert run.require("classifier.safetensors", finished=True) is run and run.metrics() == {"ca": 0.5}
    assert run.config() == cfg
    loaded, generator = run.models(run.config(), data, make_engine("cpu", "fp32", channels_last=False))
    assert generator is None and not loaded.training
    for (k, a), (_, b) in zip(clf.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
