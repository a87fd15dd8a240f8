from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gpuline.errors import ConfigError
from gpuline.spec import json_schema, load_policy, load_spec, parse_duration


def edit(config: Path, old: str, new: str) -> Path:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))
    return config


def line_of(config: Path, needle: str) -> int:
    return next(i for i, line in enumerate(config.read_text().splitlines(), 1) if needle in line)


def test_a_valid_spec_loads_with_defaults(project: Path) -> None:
    spec = load_spec(project)
    assert spec.model.name == "tiny"
    assert spec.resources.max_duration == 600
    assert spec.backends.ledger == "sqlite:///.gpuline/ledger.db"
    assert spec.checkpoint.keep == 3


def test_wrong_type_names_field_and_line(project: Path) -> None:
    edit(project, "max_duration: 10m", "max_duration: 10m\n  gpu_count: two")
    with pytest.raises(ConfigError) as err:
        load_spec(project)
    assert err.value.location is not None
    assert err.value.location.field == "resources.gpu_count"
    assert err.value.location.line == line_of(project, "gpu_count: two")
    assert "two" in err.value.one_line()
    assert err.value.exit_code == 2


def test_missing_required_field_points_at_its_parent(project: Path) -> None:
    edit(project, "  team: vision\n", "")
    with pytest.raises(ConfigError) as err:
        load_spec(project)
    assert err.value.location is not None
    assert err.value.location.field == "model.team"
    assert err.value.location.line == line_of(project, "model:")
    assert "required" in err.value.message
    assert "team:" in (err.value.hint or "")


def test_unknown_key_suggests_the_close_one(project: Path) -> None:
    edit(project, "max_duration: 10m", "max_duraton: 10m")
    with pytest.raises(ConfigError) as err:
        load_spec(project)
    assert err.value.location is not None
    assert err.value.location.field == "resources.max_duraton"
    assert err.value.location.line == line_of(project, "max_duraton")
    assert "max_duration" in (err.value.hint or "")


def test_duplicate_keys_are_rejected(project: Path) -> None:
    edit(project, "  steps: 10\n", "  steps: 10\n  steps: 20\n")
    with pytest.raises(ConfigError) as err:
        load_spec(project)
    assert err.value.location is not None
    assert err.value.location.line == line_of(project, "steps: 20")
    assert "duplicate" in err.value.message


def test_yaml_syntax_error_has_a_line(project: Path) -> None:
    edit(project, "  team: vision", "  team: [vision")
    with pytest.raises(ConfigError) as err:
        load_spec(project)
    assert err.value.location is not None and err.value.location.line is not None


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_spec(tmp_path / "gpuline.yml")
    assert "--config" in (err.value.hint or "")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    config = tmp_path / "gpuline.yml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_spec(config)


def test_gate_without_threshold_is_an_error(project: Path) -> None:
    project.write_text(project.read_text() + "eval:\n  gates:\n    - metric: accuracy\n")
    with pytest.raises(ConfigError) as err:
        load_spec(project)
    assert err.value.location is not None and err.value.location.field == "eval.gates[0]"


@pytest.mark.parametrize(
    ("raw", "seconds"), [(90, 90), ("90", 90), ("90s", 90), ("20m", 1200), ("1h30m", 5400), ("2h", 7200)]
)
def test_durations(raw: object, seconds: int) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["soon", "", 0, -5, True, "1d"])
def test_bad_durations(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_tier_overrides_merge_and_change_the_config_hash(project: Path) -> None:
    project.write_text(project.read_text() + "tiers:\n  release:\n    hyperparameters: {steps: 99}\n")
    spec = load_spec(project)
    release = spec.for_tier("release")
    assert release.hyperparameters["steps"] == 99
    assert spec.for_tier("nightly").hyperparameters["steps"] == 10
    assert release.config_hash() != spec.config_hash()
    assert spec.for_tier("nightly").config_hash() == spec.config_hash()


def test_string_command_is_split(project: Path) -> None:
    edit(project, "command: [python, train.py]", 'command: "python train.py --fast"')
    assert load_spec(project).entrypoint.command == ["python", "train.py", "--fast"]


def test_json_schema_validates_the_example_shape(project: Path) -> None:
    schema = json_schema()
    data = yaml.safe_load(project.read_text())
    jsonschema.validate(data, schema)
    data["resources"]["bogus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
    assert json_schema(policy=True)["title"] == "policy.yml"
    json.dumps(schema)


def test_policy_soft_above_hard_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yml"
    path.write_text("version: 1\nbudgets:\n  teams:\n    vision:\n      usd: {soft: 10, hard: 5}\n")
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert err.value.location is not None
    assert err.value.location.field == "budgets.teams.vision.usd"
    assert err.value.location.line == 5


def test_empty_policy_allows_everything(tmp_path: Path) -> None:
    path = tmp_path / "policy.yml"
    path.write_text("")
    assert load_policy(path).budgets.teams == {}
