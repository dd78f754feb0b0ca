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
