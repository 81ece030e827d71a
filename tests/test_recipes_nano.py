"""recipes/nano.yaml: valid, and it reaches its 100,000-parameter budget structurally.

The run is structural only (--no-finetune), at a 160x160 input and without the ONNX
export: every pass ranks channels by their weights, so the input size changes the
MACs and the drift but not one parameter, and tests/test_recipes_v2.py already
exercises the export path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from compressor.checkpoint import open_model
from compressor.cli import cli
from compressor.validate import contract_violations, forward_eval, non_finite_outputs, output_contract

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE = RECIPES / "nano.yaml"
TEACHER = RECIPES / "checkpoints" / "featherface_embedded.pt"
SIZE = 160


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_nano_recipe_validates():
    result = invoke("validate", str(RECIPE))
    assert result.exit_code == 0, result.output


def test_nano_without_finetuning_is_at_most_100k_with_every_stage_ok(tmp_path, one_thread, fewer_fit_images):
    out = tmp_path / "nano"
    result = invoke("run", str(RECIPE), "--no-finetune", "--quiet", "--out", str(out),
                    "--set", f"input_size={SIZE}", "--set", "export=null", *fewer_fit_images(RECIPE))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["params"]["total"] == 592_371
    assert [stage["status"] for stage in report["stages"]] == ["ok"] * 10
    final = report["final"]["params"]
    assert final["total"] <= 100_000
    # A sensible allocation: no component is left near nothing, the backbone still holds most.
    for component in ("backbone", "cbam", "bifpn", "ssh", "channel_shuffle", "heads"):
        assert final["components"][component] >= 2_000, (component, final["components"][component])
    assert final["components"]["backbone"] >= 40_000
    unify = next(s for s in report["stages"] if s["pass"] == "unify_heads")
    assert unify["output_drift"] < 1e-5
    verdicts = {v["what"]: v["status"] for v in report["budget_check"]["verdicts"]}
    assert verdicts == {"total": "pass", "accuracy drop (ap)": "not checked"}

    # final.pt loads on its own, counts what the report says and keeps the teacher's output contract.
    loaded = open_model(out)
    assert loaded.family.name == "featherface"
    assert sum(p.numel() for p in loaded.model.parameters()) == final["total"]
    teacher = open_model(TEACHER)
    example = teacher.family.example_input(SIZE, SIZE)
    expected = output_contract(forward_eval(teacher.model, example))
    outputs = forward_eval(loaded.model, example)
    assert contract_violations(expected, outputs) == []
    assert non_finite_outputs(outputs) == []
    # The stem was never pruned (the recipe's ignored_layers), every pruned width kept at least a quarter.
    convs = {name: m for name, m in loaded.model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs["backbone.stage1.0.conv"].out_channels == 8
    assert min(m.out_channels for name, m in convs.items() if name.startswith("backbone.")) >= 8
    assert convs["backbone.stage3.1.pointwise"].out_channels >= 64
