"""One set of CLI conventions, one App per command, and the engine's independence from any family."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compressor.cli import cli

ROOT = Path(__file__).resolve().parents[1]
TOY = Path(__file__).parent / "fixtures" / "toy_passes.py"
COMPUTING = ["run", "train", "inspect", "eval", "detect", "sensitivity"]
LOADING_PLUGINS = ["inspect", "passes", "families", "validate", "run", "train", "eval", "detect", "sensitivity"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def write_recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{family: featherface}}\nplugins: [{TOY}]\ninput_size: 64\nseed: 3\n{body}")
    return path


@pytest.mark.parametrize("command", LOADING_PLUGINS)
def test_every_plugin_loading_command_takes_plugin(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "--plugin" in result.output and "no:NAME" in result.output


@pytest.mark.parametrize("command", COMPUTING)
def test_every_computing_command_takes_device_and_refuses_an_unavailable_one(command, tmp_path):
    assert "--device" in invoke(command, "--help").output
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = write_recipe(tmp_path, "stages:\n  - pass: identity\n")
    train_recipe = tmp_path / "train.yaml"
    train_recipe.write_text("model: {family: featherface}\ninput_size: 64\ntrain: {steps: 1}\n")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    args = {
        "run": [str(recipe), "--out", str(tmp_path / "run")],
        "train": [str(train_recipe), "--out", str(tmp_path / "train")],
        "inspect": ["featherface"],
        "eval": ["featherface"],
        "detect": ["featherface", str(image), "--out", str(tmp_path / "o.png")],
        "sensitivity": ["featherface"],
    }[command]
    line = one_line_error(invoke(command, *args, "--device", "cuda"))
    assert "--device cuda: no CUDA device" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "train").exists() and not (tmp_path / "o.png").exists()


def test_a_builtin_plugin_can_be_disabled_like_pytest_p_no():
    listed = json.loads(invoke("passes", "--json").output)
    assert "cbam_plus" in listed and "prune" in listed
    without = json.loads(invoke("-p", "no:cbam_plus", "passes", "--json").output)
    assert "cbam_plus" not in without and "prune" in without
    assert "cbam_plus" not in json.loads(invoke("passes", "-p", "no:cbam_plus", "--json").output)
    result = invoke("-p", "no:sensitivity", "sensitivity", "featherface")
    assert result.exit_code == 2 and "No such command 'sensitivity'" in result.output
    assert "featherface" not in json.loads(invoke("-p", "no:featherface", "families", "--json").output)


def test_validate_checks_pass_params_without_loading_a_model(tmp_path, monkeypatch):
    import compressor.checkpoint
    from compressor_plugins.featherface_family import FAMILY

    def no_model(*args, **kwargs):
        raise AssertionError("validate loaded a model")

    monkeypatch.setattr(compressor.checkpoint, "open_model", no_model)
    monkeypatch.setattr(FAMILY, "baseline", no_model)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: {family: featherface, checkpoint: x.pt}\n"
                      "stages:\n  - pass: prune\n    params: {ratios: {backbone: 1.5}}\n")
    (tmp_path / "x.pt").write_bytes(b"not even read")
    line = one_line_error(invoke("validate", str(recipe)))
    assert "stages[0].params.ratios.backbone" in line


def test_engine_names_no_family_no_family_module_and_no_builtin_plugin():
    """`grep -rn featherface compressor/` finds prose only: no string or name in code."""
    found = []
    for path in sorted((ROOT / "compressor").glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                text = " ".join([getattr(node, "module", None) or "", *(a.name for a in node.names)])
            elif isinstance(node, ast.Name):
                text = node.id
            if text and any(word in text.lower() for word in ("featherface", "compressor_plugins", "heads")):
                found.append(f"{path.name}:{node.lineno}: {text!r}")
    assert not found, found


def test_the_wheel_installs_builtins_under_a_distinctive_name(tmp_path):
    """A non-editable install must not claim the generic import name `plugins`."""
    source = tmp_path / "src"  # a copy: building writes build/ beside the sources, and stale files there would ship
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("compressor", "plugins", "featherface"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "setuptools" in built.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top = {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name}
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert top == {"compressor", "compressor_plugins", "featherface"}
    assert "compressor_plugins/prune.py" in names and not any(n.startswith("plugins/") for n in names)
    assert "[compressor]" in entry_points and "prune = compressor_plugins.prune" in entry_points


def test_resume_refuses_another_mode_and_names_it(tmp_path):
    recipe = write_recipe(tmp_path, "stages:\n  - pass: identity\n")
    out = tmp_path / "run"
    assert invoke("run", str(recipe), "--out", str(out), "--no-finetune", "--quiet").exit_code == 0
    line = one_line_error(invoke("run", str(recipe), "--out", str(out), "--resume", "--quiet"))
    assert "another mode" in line and "finetune: False -> True" in line
    assert invoke("run", str(recipe), "--out", str(out), "--resume", "--no-finetune", "--quiet").exit_code == 0


def test_resume_names_the_recipe_field_that_differs(tmp_path):
    recipe = write_recipe(tmp_path, "stages:\n  - pass: identity\n")
    out = tmp_path / "run"
    assert invoke("run", str(recipe), "--out", str(out), "--no-finetune", "--quiet").exit_code == 0
    line = one_line_error(invoke("run", str(recipe), "--out", str(out), "--resume", "--no-finetune", "--quiet",
                                 "--set", "stages[0].name=other"))
    assert "stages[0].name: None -> 'other'" in line


def test_a_pass_declared_lossless_that_changes_outputs_fails_its_stage(tmp_path):
    recipe = write_recipe(tmp_path, "stages:\n  - pass: falsely_lossless\n")
    result = invoke("run", str(recipe), "--out", str(tmp_path / "run"), "--no-finetune", "--quiet")
    assert result.exit_code == 1
    assert "stage 1 (falsely_lossless): pass falsely_lossless declares itself lossless but changed the outputs" \
        in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["status"] == "failed"


def test_a_pass_record_lands_in_the_report_and_the_final_checkpoint_lists_every_pass(tmp_path):
    recipe = write_recipe(tmp_path, "stages:\n  - pass: recorded\n  - pass: scale_heads\n"
                                    "    params: {factor: 0.25}\n")
    out = tmp_path / "run"
    assert invoke("run", str(recipe), "--out", str(out), "--no-finetune", "--quiet").exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["pass_record"] == {"changed": 0, "note": "nothing to do"}
    final = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert final["passes"] == [{"stage": "recorded", "pass": "recorded", "params": {}},
                               {"stage": "scale_heads", "pass": "scale_heads", "params": {"factor": 0.25}}]
    assert "nothing to do" in (out / "report.md").read_text()


def test_one_app_per_command(monkeypatch, tmp_path):
    """The plugin manager is built once per command, however many places need the registry."""
    import compressor.plugins as plugins

    built = []
    real = plugins.build_plugin_manager

    def counting(*args, **kwargs):
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(plugins, "build_plugin_manager", counting)
    recipe = write_recipe(tmp_path, "stages:\n  - pass: identity\n")
    assert invoke("run", str(recipe), "--out", str(tmp_path / "run"), "--no-finetune", "--quiet").exit_code == 0
    assert len(built) == 1


def test_same_recipe_by_relative_and_absolute_path_resumes(tmp_path, monkeypatch):
    import featherface
    from compressor.checkpoint import save_checkpoint
    from compressor_plugins.featherface_family import FAMILY

    save_checkpoint(tmp_path / "start.pt", featherface.featherface_baseline(), FAMILY)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{checkpoint: start.pt}}\nplugins: [{TOY}]\ninput_size: 64\n"
                      "stages:\n  - pass: identity\n")
    out = tmp_path / "run"
    assert invoke("run", str(recipe), "--out", str(out), "--no-finetune", "--quiet").exit_code == 0
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "recipe.yaml", "--out", "run", "--resume", "--no-finetune")
    assert result.exit_code == 0 and "nothing to do" in result.output, result.output
