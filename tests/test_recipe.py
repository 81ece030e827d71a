"""Recipes: validation errors name the field path (and line), overrides, registry checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli import cli
from compressor.errors import UsageError
from compressor.recipe import apply_override, load_recipe

TOY = Path(__file__).parent / "fixtures" / "toy_passes.py"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def validate(path: Path, *extra: str):
    return CliRunner().invoke(cli, ["validate", str(path), *extra], catch_exceptions=False)


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def toy_recipe(stages: str, extra: str = "") -> str:
    return f"model: {{family: featherface}}\nplugins: [{TOY}]\ninput_size: 64\n{extra}stages:\n{stages}"


def test_valid_recipe(tmp_path):
    path = write(tmp_path, toy_recipe("  - pass: scale_heads\n    params: {factor: 0.9}\n  - pass: identity\n"))
    result = validate(path)
    assert result.exit_code == 0, result.output
    assert "scale_heads, identity" in result.output


def test_malformed_yaml_reports_line_and_column(tmp_path):
    path = write(tmp_path, "stages:\n  - pass: [unclosed\n")
    line = one_line_error(validate(path))
    assert "line 3" in line and "column" in line


def test_unknown_key_suggests(tmp_path):
    path = write(tmp_path, "model: {family: featherface}\n" "stages:\n  - pass: identity\n    parms: {}\n")
    line = one_line_error(validate(path))
    assert "stages[0].parms" in line and "did you mean params?" in line and "(line 4)" in line


def test_wrong_type_names_the_field(tmp_path):
    path = write(tmp_path, "model: {family: featherface}\n" "input_size: [64, big]\n")
    assert "input_size[1]" in one_line_error(validate(path))


def test_unknown_pass_suggests_close_match(tmp_path):
    path = write(tmp_path, toy_recipe("  - pass: scale_head\n"))
    line = one_line_error(validate(path))
    assert "stages[0].pass" in line and "did you mean scale_heads?" in line


def test_bad_params_have_their_path(tmp_path):
    path = write(tmp_path, toy_recipe("  - pass: identity\n  - pass: plain_ssh\n    params: {mid: -3}\n"))
    assert "stages[1].params.mid" in one_line_error(validate(path))
    path = write(tmp_path, toy_recipe("  - pass: plain_ssh\n    params: {md: 3}\n"))
    assert "stages[0].params.md" in one_line_error(validate(path))


def test_missing_checkpoint_and_plugin(tmp_path):
    path = write(tmp_path, "model: {checkpoint: nowhere.pt}\n")
    assert "model.checkpoint" in one_line_error(validate(path)) and "nowhere.pt" in validate(path).output
    path = write(tmp_path, "plugins: [missing_plugin_module_xyz]\n")
    line = one_line_error(validate(path))
    assert "missing_plugin_module_xyz" in line and "ModuleNotFoundError" in line


def test_broken_plugin_file_is_named(tmp_path):
    broken = write(tmp_path, "import nonexistent_dependency_abc\n", "broken_plugin.py")
    path = write(tmp_path, f"plugins: [{broken}]\n")
    line = one_line_error(validate(path))
    assert "broken_plugin.py" in line and "nonexistent_dependency_abc" in line


def test_budget_with_unknown_component(tmp_path):
    path = write(tmp_path, "model: {family: featherface}\n" "budget: {components: {shh: 100}}\n")
    line = one_line_error(validate(path))
    assert "budget.components.shh" in line and "did you mean ssh?" in line


def test_bad_input_size(tmp_path):
    assert "multiples of 32" in one_line_error(validate(write(tmp_path, "model: {family: featherface}\n" "input_size: 100\n")))


def test_duplicate_stage_names(tmp_path):
    path = write(tmp_path, toy_recipe("  - pass: identity\n  - pass: identity\n"))
    assert "used twice" in one_line_error(validate(path))


def test_missing_recipe_file(tmp_path):
    assert "no such recipe file" in one_line_error(validate(tmp_path / "none.yaml"))


def test_overrides(tmp_path):
    path = write(tmp_path, toy_recipe("  - pass: scale_heads\n    params: {factor: 0.9}\n"))
    recipe, raw = load_recipe(path, ["stages[0].params.factor=0.25", "seed=7", "finetune.steps=3"])
    assert raw["stages"][0]["params"]["factor"] == 0.25
    assert recipe.seed == 7 and recipe.finetune.steps == 3
    with pytest.raises(UsageError, match="stages\\[5\\]"):
        apply_override(raw, "stages.5.params.factor=1")
    with pytest.raises(UsageError, match="expected key.path=value"):
        apply_override(raw, "seed")
    assert validate(path, "--set", "stages.0.params.factor=oops").exit_code == 2


def test_schema_is_json_schema():
    result = CliRunner().invoke(cli, ["schema"])
    schema = json.loads(result.output)
    assert "stages" in schema["properties"] and "budget" in schema["properties"]


def test_passes_lists_params(tmp_path):
    result = CliRunner().invoke(cli, ["passes", "--plugin", str(TOY)])
    assert result.exit_code == 0, result.output
    assert "plain_ssh" in result.output and "mid" in result.output and "default 16" in result.output
