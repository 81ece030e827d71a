"""The runner end to end, with a third-party pass plugin from a .py file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner

from compressor import load_model
from compressor.cli import cli

TOY = Path(__file__).parent / "fixtures" / "toy_passes.py"


def recipe(tmp_path: Path, stages: str, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    family = "" if "model:" in extra else "model: {family: featherface}\n"
    path.write_text(f"{family}plugins: [{TOY}]\ninput_size: 64\nseed: 3\n{extra}stages:\n{stages}")
    return path


def run(*args: str):
    """Structural runs: --no-finetune skips training and evaluation (tests/test_finetune.py covers those)."""
    return CliRunner().invoke(cli, ["run", "--quiet", "--no-finetune", *args], catch_exceptions=False)


STAGES = (
    "  - pass: scale_heads\n    params: {factor: 0.5}\n"
    "  - pass: identity\n"
    "  - pass: plain_ssh\n    name: narrow\n    until: {components: {ssh: 160000}, max_repeats: 3}\n"
    "    budget: {components: {ssh: 160000}}\n"
)


def test_end_to_end_with_third_party_pass(tmp_path):
    out = tmp_path / "run"
    result = run(str(recipe(tmp_path, STAGES, "budget: {total: 510000}\n")), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["params"]["total"] == 592_371
    assert [s["status"] for s in report["stages"]] == ["ok", "ok", "ok"]
    assert [s["name"] for s in report["stages"]] == ["scale_heads", "identity", "narrow"]
    scale, identity, narrow = report["stages"]
    assert scale["output_drift"] > 0
    assert identity["output_drift"] == 0.0
    # Each application swaps one DCN SSH (77,655) for a plain one (34,752): 190,062 after one, 147,159 after two.
    assert narrow["repeats"] == 2 and narrow["params"]["components"]["ssh"] <= 160_000
    assert sum(narrow["params"]["components"].values()) == narrow["params"]["total"]
    assert report["final"]["params"]["total"] == narrow["params"]["total"]
    assert identity["finetune"]["skipped"] == "--no-finetune"
    for name in ("report.md", "final.pt", "plots/params_by_component.png", "plots/params_vs_accuracy.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "stage-01-scale_heads.pt", "stage-02-identity.pt", "stage-03-narrow.pt"]

    model = load_model(out)
    assert sum(p.numel() for p in model.parameters()) == report["final"]["params"]["total"]
    content = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert content["spec"]["type"] == "FeatherFace" and content["recipe"]["seed"] == 3
    inspected = CliRunner().invoke(cli, ["inspect", str(out), "--json", "--input-size", "64"])
    assert json.loads(inspected.output)["params"]["total"] == report["final"]["params"]["total"]

    again = run(str(recipe(tmp_path, STAGES, "budget: {total: 510000}\n")), "--out", str(out), "--resume")
    assert again.exit_code == 0
    refused = run(str(recipe(tmp_path, STAGES, "budget: {total: 510000}\n")), "--out", str(out))
    assert refused.exit_code == 2 and "--resume" in refused.output


def test_stage_budget_failure_names_stage_component_and_overshoot(tmp_path):
    stages = "  - pass: identity\n  - pass: plain_ssh\n    budget: {components: {ssh: 60000}}\n"
    out = tmp_path / "run"
    result = run(str(recipe(tmp_path, stages)), "--out", str(out))
    assert result.exit_code == 1
    assert "stage 2 (plain_ssh): ssh = 190,062 > budget 60,000 (+130,062)" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["ok", "failed"]
    assert (out / "checkpoints" / "stage-01-identity.pt").is_file()
    assert not (out / "final.pt").exists()


def test_final_budget_failure(tmp_path):
    result = run(str(recipe(tmp_path, "  - pass: identity\n", "budget: {total: 510000}\n")), "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "final budget: total = 592,371 > budget 510,000 (+82,371)" in result.output


def test_until_that_cannot_be_reached(tmp_path):
    stages = "  - pass: identity\n    until: {total: 1000, max_repeats: 2}\n"
    result = run(str(recipe(tmp_path, stages)), "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "stage 1 (identity): until not reached after 2 repeats" in result.output


def test_pass_that_raises_is_named(tmp_path):
    result = run(str(recipe(tmp_path, "  - pass: identity\n  - pass: explode\n")), "--out", str(tmp_path / "r"))
    assert result.exit_code == 1
    assert "stage 2 (explode): pass explode raised RuntimeError: kaboom" in result.output
    assert "Traceback" not in result.output


def test_pass_that_breaks_the_contract_is_named(tmp_path):
    result = run(str(recipe(tmp_path, "  - pass: break_contract\n")), "--out", str(tmp_path / "r"))
    assert result.exit_code == 1
    assert "stage 1 (break_contract): pass break_contract broke the output contract" in result.output
    assert "(2, 168, 4)" in result.output


def test_params_that_cannot_apply_fail_before_any_work(tmp_path):
    result = run(str(recipe(tmp_path, "  - pass: plain_ssh\n    params: {mid: 32}\n")), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "stage 1 (plain_ssh): plain_ssh: params.mid" in result.output


def test_overrides_on_run(tmp_path):
    out = tmp_path / "run"
    result = run(str(recipe(tmp_path, STAGES)), "--out", str(out), "--set", "stages[0].params.factor=1.0")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["stages"][0]["params"]["factor"] == 1.0
    assert report["stages"][0]["output_drift"] == 0.0
    assert report["stages"][0]["finetune"]["skipped"] == "--no-finetune"


def _final_state(out: Path) -> dict:
    return torch.load(out / "final.pt", map_location="cpu", weights_only=True)["state_dict"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    stages = "  - pass: scale_heads\n    params: {factor: 0.5}\n  - pass: sleep\n  - pass: plain_ssh\n"
    path = recipe(tmp_path, stages)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "compressor", "run", str(path), "--out", str(out), "--quiet", "--no-finetune"]
    process = subprocess.Popen(command, env={**os.environ, "TOY_SLEEP_SECONDS": "60"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "stage-01-scale_heads.pt"
    deadline = time.monotonic() + 120
    while not first.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert first.exists(), process.communicate()
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    report = json.loads((out / "report.json").read_text())  # never torn
    assert [s["status"] for s in report["stages"]] == ["ok", "pending", "pending"]
    assert not list(out.rglob("*.tmp"))
    load_model(first)

    changed = run(str(path), "--out", str(out), "--resume", "--set", "seed=4")
    assert changed.exit_code == 2 and "differs" in changed.output

    result = run(str(path), "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference"
    assert run(str(path), "--out", str(reference)).exit_code == 0
    a, b = _final_state(out), _final_state(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
