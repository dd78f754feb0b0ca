"""Tests for cuba.config: defaults, variant parsing, validation messages, config files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cuba.config import ConfigError, TrainConfig, load_config_file, make_config, parse_variant


def test_defaults_validate() -> None:
    cfg = make_config({})
    assert cfg == TrainConfig()
    assert cfg.is_attack and cfg.full_range and cfg.label() == "cuba-fra"


def test_labels() -> None:
    assert make_config({"attack": "none"}).label() == "clean"
    assert make_config({"variant": "nra-5"}).label() == "cuba-nra5"
    assert make_config({"attack": "push-away"}).label() == "push-away-fra"


@pytest.mark.parametrize("value,expected", [
    ("nra-5", ("nra", 5)), ("nra5", ("nra", 5)), ("NRA-2", ("nra", 2)), ("nra", ("nra", None)),
    ("fra", ("fra", None)), (" fra ", ("fra", None)),
])
def test_parse_variant(value: str, expected: tuple) -> None:
    assert parse_variant(value) == expected


@pytest.mark.parametrize("value", ["xyz", "fra-2x", "nra-", "", "nra--3"])
def test_parse_variant_bad(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^variant: "):
        parse_variant(value)


def test_variant_sets_k() -> None:
    cfg = make_config({"variant": "nra-5"})
    assert (cfg.variant, cfg.k) == ("nra", 5)
    assert not cfg.full_range
    # a bare 'nra' keeps the given k
    assert make_config({"variant": "nra", "k": 3}).k == 3


def test_none_values_fall_back_to_defaults() -> None:
    cfg = make_config({"tau": None, "epochs": None})
    assert cfg.tau == TrainConfig.tau and cfg.epochs == TrainConfig.epochs


def test_int_accepted_for_float_field() -> None:
    assert make_config({"epochs": 2}).epochs == 2


@pytest.mark.parametrize("field,value", [
    ("tau", 0), ("tau", -1), ("eps", 0), ("eps", 1.5), ("k", 0), ("epochs", 0), ("batch_size", 1),
    ("batch_size", 2.5), ("k", True), ("attack", "foo"), ("model", "vgg"), ("generator_mode", "x"),
    ("dataset", "nope"), ("device", "tpu"), ("lr", "fast"), ("momentum", 1.0), ("n_train", 0),
    ("augment", "rotate"), ("progress", "yes"), ("vicinity", "near"),
])
def test_bad_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        make_config({field: value})
    assert str(e.value).startswith(f"{field}: "), str(e.value)
    assert "\n" not in str(e.value)


def test_explicit_vicinity_without_targets() -> None:
    with pytest.raises(ConfigError, match=r"^targets: "):
        make_config({"variant": "nra", "vicinity": "explicit"})
    cfg = make_config({"variant": "nra", "vicinity": "explicit", "targets": [1, 2, 3]})
    assert cfg.targets == [1, 2, 3]


def test_unknown_field() -> None:
    with pytest.raises(ConfigError, match=r"^unknown config field\(s\): 'bogus', 'foo';"):
        make_config({"foo": 1, "bogus": 2})


def test_dataset_path_accepted(tmp_path: Path) -> None:
    p = tmp_path / "set.npz"
    p.write_bytes(b"")
    assert make_config({"dataset": str(p)}).dataset == str(p)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "auto"])
def test_devices_accepted(device: str) -> None:
    assert make_config({"device": device}).device == device


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- files -------------------------------------------------------------------------------------

def test_load_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("tau: 0.2\nvariant: nra-3\nepochs: 1.5\ntargets: {0: [1]}\n")
    data = load_config_file(p)
    assert data == {"tau": 0.2, "variant": "nra-3", "epochs": 1.5, "targets": {0: [1]}}
    cfg = make_config(data)
    assert (cfg.tau, cfg.variant, cfg.k, cfg.epochs) == (0.2, "nra", 3, 1.5)


def test_load_toml(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('tau = 0.3\nmodel = "resnet18"\nbatch_size = 32\n')
    assert load_config_file(p) == {"tau": 0.3, "model": "resnet18", "batch_size": 32}


def test_load_empty_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yml"
    p.write_text("")
    assert load_config_file(p) == {}


def test_load_non_mapping_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("- tau\n- 0.2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of fields, got list"):
        load_config_file(p)


def test_load_invalid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("tau: [0.1\nmodel: : x\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as e:
        load_config_file(p)
    assert "\n" not in str(e.value)


def test_load_invalid_toml(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("tau = = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config_file(p)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config_file(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="config file not found: nopreset"):
        load_config_file("nopreset")


def test_a_shipped_preset_is_found_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no src/ here: as after a non-editable install, or from another folder
    demo = load_config_file("demo")
    assert demo and load_config_file("demo.yaml") == demo == load_config_file("src/cuba/configs/demo.yaml")
    (tmp_path / "demo.yaml").write_text("tau: 0.5\n")  # a file of that name wins over the preset
    assert load_config_file("demo.yaml") == {"tau": 0.5}
    with pytest.raises(ConfigError, match="config file not found: other/demo.yaml"):
        load_config_file("other/demo.yaml")  # a path into some other folder is not a preset name


def test_setting_differences_same_file_by_name_or_path(tmp_path: Path) -> None:
    """A run on ``path/mnist.npz`` and a grid cell naming ``mnist`` under data_dir=path train on
    the same file, so a grid may adopt the run; another file or another field still differs."""
    from cuba.config import setting_differences

    (tmp_path / "mnist.npz").write_bytes(b"x")
    (tmp_path / "other.npz").write_bytes(b"x")
    by_path = make_config({"dataset": str(tmp_path / "mnist.npz")})
    by_name = make_config({"dataset": "mnist", "data_dir": str(tmp_path)})
    assert setting_differences(by_path, by_name) == []
    other = make_config({"dataset": str(tmp_path / "other.npz")})
    assert setting_differences(other, by_name) == [f"dataset: {str(tmp_path / 'other.npz')!r} != 'mnist'"]
    elsewhere = make_config({"dataset": "mnist", "data_dir": str(tmp_path / "missing")})
    assert setting_differences(by_path, elsewhere) != []  # no file there: never called equal
    assert setting_differences(by_path, make_config({"dataset": "mnist", "data_dir": str(tmp_path), "lr": 0.5})) == [
        f"lr: {by_path.lr!r} != 0.5"]


def test_a_stored_run_config_loads_without_its_data_file() -> None:
    # compare/tables read a run's numbers from anywhere; its relative data path need not resolve here
    from cuba.config import config_from_run

    assert config_from_run({"dataset": "../elsewhere/mnist.npz"}).dataset == "../elsewhere/mnist.npz"
    with pytest.raises(ConfigError, match="^dataset: "):
        make_config({"dataset": "../elsewhere/mnist.npz"})


# --- sections -------------------------------------------------------------------------------------

def test_every_field_is_in_exactly_one_section() -> None:
    from cuba.config import FIELDS, SECTIONS

    listed = [name for names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(FIELDS) and len(listed) == len(set(listed))


def test_flat_dotted_and_sectioned_values_give_the_same_config() -> None:
    flat = make_config({"tau": 0.2, "lr": 0.03, "model": "preactresnet18", "attack": "cuba", "n_train": 100})
    dotted = make_config({"attack.tau": 0.2, "optimisation.lr": 0.03, "model.model": "preactresnet18", "data.n_train": 100})
    sectioned = make_config({"attack": {"tau": 0.2, "attack": "cuba"}, "optimisation": {"lr": 0.03},
                             "model": {"model": "preactresnet18"}, "data": {"n_train": 100}})
    assert flat == dotted == sectioned
    assert make_config(flat.to_sections()) == flat  # config.yaml is written by section and read back


def test_sections_reject_misplaced_and_contradicting_fields() -> None:
    with pytest.raises(ConfigError, match=r"^data\.tau: 'tau' is in section 'attack', not 'data'"):
        make_config({"data.tau": 0.2})
    with pytest.raises(ConfigError, match=r"^optimisation\.eps: 'eps' is in section 'attack'"):
        make_config({"optimisation": {"eps": 0.1}})
    with pytest.raises(ConfigError, match=r"^tau: given twice with different values \(0\.1, 0\.2\)"):
        make_config({"tau": 0.1, "attack.tau": 0.2})
    with pytest.raises(ConfigError, match=r"unknown config field\(s\): 'nope'"):
        make_config({"attack": {"nope": 1}})


def test_configs_written_before_the_sections_still_load() -> None:
    from cuba.config import config_from_run

    old = {k: v for k, v in make_config({}).to_dict().items() if k != "eval_each_epoch"}
    old["extra"] = {"eval_each_epoch": False}  # the free-form dict those configs carried
    cfg = config_from_run(old)
    assert cfg.eval_each_epoch is False and cfg.tau == 0.1
    assert config_from_run({**old, "extra": {}}).eval_each_epoch is True
