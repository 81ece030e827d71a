"""Hostile inputs and faults, through the CLI: one line, the right exit code, nothing written outside --out.

Each test stands for a class of inputs (recipes, run folders, checkpoints, outputs, plugins);
tests/test_fuzz.py throws seeded random members of the recipe and argument classes at the CLI.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import featherface
from compressor.checkpoint import save_checkpoint
from compressor.cli import cli
from compressor_plugins.featherface_family import FAMILY

TOY = Path(__file__).parent / "fixtures" / "toy_passes.py"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def recipe(tmp_path: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    family = "" if "model:" in body else "model: {family: featherface}\n"
    path.write_text(f"{family}plugins: [{TOY}]\ninput_size: 64\n{body}")
    return path


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ stage names end up in file names

@pytest.mark.parametrize("name", ["x/../../../../teacher", "../up", "/abs/path", "a\x00b", "a" * 300, ".hidden",
                                  "-dash", "with space", "semi;colon", "", "ünïcode"])
def test_unsafe_stage_names_are_refused_at_validation(tmp_path, name):
    path = recipe(tmp_path, f"stages:\n  - pass: identity\n    name: {json.dumps(name)}\n")
    for command in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "run"), "--no-finetune"]):
        line = one_line_error(invoke(*command))
        assert "stages[0].name" in line
    assert not (tmp_path / "run").exists()


def test_no_run_writes_outside_its_folder(tmp_path):
    start = tmp_path / "teacher.pt"
    save_checkpoint(start, featherface.featherface_baseline(), FAMILY)
    before = start.read_bytes()
    path = recipe(tmp_path, "model: {checkpoint: teacher.pt}\nstages:\n  - pass: identity\n"
                            "    name: ok_name\n  - pass: scale_heads\n")
    out = tmp_path / "runs" / "a"
    outside_before = files_under(tmp_path) - files_under(out)
    assert invoke("run", str(path), "--out", str(out), "--no-finetune", "--quiet").exit_code == 0
    assert files_under(tmp_path) - files_under(out) == outside_before
    assert start.read_bytes() == before


# ------------------------------------------------------------------ numbers in recipes

@pytest.mark.parametrize("field,value", [
    ("finetune.lr", "1e10"), ("finetune.lr", ".inf"), ("finetune.lr", ".nan"), ("finetune.lr", "-1"),
    ("finetune.steps", "1e12"), ("finetune.steps", "-5"), ("finetune.batch_size", "100000"),
    ("finetune.milestones", "[0.5, 1.5]"), ("finetune.milestones", "[.nan]"), ("finetune.gamma", ".inf"),
    ("finetune.temperature", "1e9"), ("finetune.warmup_steps", "1e9"), ("finetune.grad_clip", ".inf"),
    ("input_size", "100000"), ("input_size", "[64, -64]"), ("input_size", "0"), ("seed", "-1"), ("seed", "1e30"),
    ("budget.total", "-1"), ("budget.max_accuracy_drop", ".nan"), ("stages[0].until.max_repeats", "1000000"),
])
def test_non_finite_and_absurd_numbers_are_refused_with_the_field(tmp_path, field, value):
    path = recipe(tmp_path, "stages:\n  - pass: identity\n    until: {total: 600000}\n")
    line = one_line_error(invoke("validate", str(path), "--set", f"{field}={value}"))
    assert field.split("[")[0].split(".")[0] in line


def test_stage_finetune_overrides_are_bounded_too(tmp_path):
    path = recipe(tmp_path, "stages:\n  - pass: identity\n    finetune: {lr: 1.0e+10}\n")
    assert "stages[0].finetune.lr" in one_line_error(invoke("validate", str(path)))


# ------------------------------------------------------------------ recipe files

def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = recipe(tmp_path, "seed: 1\nstages:\n  - pass: identity\n    params: {}\n    params: {}\nseed: 2\n")
    line = one_line_error(invoke("validate", str(path)))
    assert "is given twice" in line and "lines" in line


@pytest.mark.parametrize("content", [b"seed: \xff\xfe\n", b"\x89PNG\r\n\x1a\n\x00\x00", "seed: 1\n".encode("utf-16")])
def test_non_utf8_recipes_are_one_line(tmp_path, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    line = one_line_error(invoke("validate", str(path)))
    assert "r.yaml" in line


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 3000)),
                                  "{a: " * 3000 + "1" + "}" * 3000])
def test_deep_nesting_is_one_line(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    assert "deep.yaml" in one_line_error(invoke("validate", str(path)))


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system ['echo pwned']\n", "seed: !!python/name:os.system\n",
                                  "- just\n- a list\n", "stages: 5\n", "model: [1, 2]\n", "&a [*a]\n"])
def test_hostile_yaml_is_refused(tmp_path, text):
    path = tmp_path / "h.yaml"
    path.write_text(text)
    assert "h.yaml" in one_line_error(invoke("validate", str(path)))


# ------------------------------------------------------------------ run folders

def test_resume_of_a_folder_without_a_run_is_refused(tmp_path):
    path = recipe(tmp_path, "stages:\n  - pass: identity\n")
    line = one_line_error(invoke("run", str(path), "--out", str(tmp_path / "typo"), "--resume", "--no-finetune"))
    assert "no run to resume" in line
    assert not (tmp_path / "typo" / "report.json").exists()


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    path = recipe(tmp_path, "stages:\n  - pass: identity\n")
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as handle:  # as a running `compress run` holds it
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("4242")
        handle.flush()
        child = subprocess.run([sys.executable, "-m", "compressor", "run", str(path), "--out", str(out),
                                "--no-finetune", "--quiet"], capture_output=True, text=True, timeout=300)
    assert child.returncode == 2, child.stderr
    assert child.stderr.strip().splitlines() == [
        f"error: {out}: another process (pid 4242) is running in this folder; wait for it to finish or use another --out"]
    assert not (out / "report.json").exists()


def test_interrupted_writes_leave_no_temporaries_for_long(tmp_path):
    path = recipe(tmp_path, "stages:\n  - pass: identity\n")
    out = tmp_path / "run"
    assert invoke("run", str(path), "--out", str(out), "--no-finetune", "--quiet").exit_code == 0
    stale = [out / ".report.json.abc123.tmp", out / "checkpoints" / ".stage-01-identity.pt.x.tmp"]
    for item in stale:
        item.write_bytes(b"half a write")
    assert invoke("run", str(path), "--out", str(out), "--resume", "--no-finetune", "--quiet").exit_code == 0
    assert not any(item.exists() for item in stale)


# ------------------------------------------------------------------ our own checkpoints, tampered with

def _tampered(tmp_path: Path, change) -> Path:
    path = tmp_path / "t.pt"
    save_checkpoint(path, featherface.featherface_baseline(), FAMILY)
    content = torch.load(path, weights_only=True)
    change(content)
    torch.save(content, path)
    return path


def _set_width(content: dict, value) -> None:
    content["spec"]["args"]["backbone"]["args"]["widths"][0][0] = value


@pytest.mark.parametrize("change", [
    lambda c: c.pop("state_dict"), lambda c: c.pop("spec"), lambda c: c.update(spec="not a spec"),
    lambda c: c.update(state_dict={"x": "not a tensor"}), lambda c: c.update(family="nosuchfamily"),
    lambda c: _set_width(c, -8), lambda c: _set_width(c, "wide"), lambda c: _set_width(c, 1.5),
    lambda c: c["spec"].update(type="NoSuchModule"), lambda c: c["spec"].pop("args"),
    lambda c: c["state_dict"].pop(next(iter(c["state_dict"]))),
])
def test_tampered_checkpoints_are_one_line(tmp_path, change):
    path = _tampered(tmp_path, change)
    assert "t.pt" in one_line_error(invoke("inspect", str(path)))


def test_tampered_checkpoint_through_the_pytest_marker(tmp_path, pytester=None):
    path = _tampered(tmp_path, lambda c: _set_width(c, -8))
    test = tmp_path / "test_user.py"
    test.write_text(f"import pytest\n@pytest.mark.compressor_model({str(path)!r})\n"
                    "def test_it(compressed_model):\n    pass\n")
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert child.returncode == 1
    assert "compressed_model:" in child.stdout and "t.pt" in child.stdout and "Traceback" not in child.stdout


# ------------------------------------------------------------------ outputs that cannot be written

@pytest.mark.parametrize("where", ["proc", "under_file"])
def test_unwritable_outputs_are_one_line_naming_the_path(tmp_path, where):
    blocker = tmp_path / "regular_file"
    blocker.write_text("x")
    bad = Path("/proc/compressor_test_x") if where == "proc" else blocker / "sub"
    path = recipe(tmp_path, "stages:\n  - pass: identity\n")
    line = one_line_error(invoke("run", str(path), "--out", str(bad), "--no-finetune"))
    assert str(bad) in line
    image = tmp_path / "face.png"
    from torchvision.io import write_png
    write_png(torch.zeros(3, 64, 64, dtype=torch.uint8), str(image))
    line = one_line_error(invoke("detect", "featherface", str(image), "--out", str(bad / "o.png")))
    assert str(bad) in line and "cannot write" in line


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import compressor.atomic as atomic

    def full(fd):
        raise OSError(28, "No space left on device")

    path = recipe(tmp_path, "stages:\n  - pass: identity\n")
    monkeypatch.setattr(atomic.os, "fsync", full)
    line = one_line_error(invoke("run", str(path), "--out", str(tmp_path / "run"), "--no-finetune"))
    assert "report.json: cannot write (No space left on device)" in line


# ------------------------------------------------------------------ plugins that misbehave

@pytest.mark.parametrize("body,fragment", [
    ("raise RuntimeError('boom')", "failed to import: RuntimeError: boom"),
    ("raise SystemExit(3)", "failed to import: SystemExit: 3"),
    ("from compressor import hookimpl\n@hookimpl\ndef compressor_passes():\n    raise ValueError('bad hook')",
     "raised in compressor_passes(): ValueError: bad hook"),
    ("from compressor import hookimpl\n@hookimpl\ndef compressor_passes():\n    return 42",
     "compressor_passes() returned a int, not a list"),
    ("from compressor import hookimpl\n@hookimpl\ndef compressor_models():\n    return ['x']", "is not a ModelFamily"),
    ("from compressor import hookimpl\n@hookimpl\ndef compressor_commands(cli):\n    raise KeyError('k')",
     "raised in compressor_commands(): KeyError"),
])
def test_broken_plugins_are_named(tmp_path, body, fragment):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text(body + "\n")
    child = subprocess.run([sys.executable, "-m", "compressor", "-p", str(plugin), "passes"],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 2, (child.returncode, child.stderr)
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken_plugin.py" in lines[0] and fragment in lines[0], child.stderr


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    plugin = tmp_path / "slow_plugin.py"
    plugin.write_text("raise KeyboardInterrupt\n")
    child = subprocess.run([sys.executable, "-m", "compressor", "-p", str(plugin), "passes"],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 130 and child.stderr.strip() == "error: interrupted", child.stderr


def test_unknown_environment_does_not_leak_tracebacks(tmp_path):
    env = {**os.environ, "COMPRESSOR_DATA": str(tmp_path / "nowhere" / "x")}
    child = subprocess.run([sys.executable, "-m", "compressor", "families"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert child.returncode == 0 and "Traceback" not in child.stderr
