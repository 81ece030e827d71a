"""The recipes that point at ../shared/reference (real weights, real photos): they validate and hold their budgets."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from compressor.cli import cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_real_recipes_validate(reference_dir):
    for name in ("retinaface_half.yaml", "featherface_from_retinaface.yaml"):
        result = invoke("validate", str(RECIPES / name))
        assert result.exit_code == 0, result.output


def test_retinaface_half_without_finetuning_is_at_most_half(reference_dir, tmp_path):
    out = tmp_path / "half"
    result = invoke("run", str(RECIPES / "retinaface_half.yaml"), "--no-finetune", "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "retinaface" and report["metric"] == "agreement_ap"
    assert report["baseline"]["params"]["total"] == 426_608
    assert report["final"]["params"]["total"] <= 213_304
    assert [stage["status"] for stage in report["stages"]] == ["ok"]
    assert {v["what"]: v["status"] for v in report["budget_check"]["verdicts"]}["total"] == "pass"
