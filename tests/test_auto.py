"""Automatic allocation: the knapsack, the `auto` pass on a problem solvable by hand, and `compress auto`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from compressor.accounting import count_parameters
from compressor.checkpoint import open_model
from compressor.cli import cli
from compressor.family import ModelFamily
from compressor.passes import PassContext
from compressor_plugins.auto import Auto, AutoParams, Option, allocate, monotone
from compressor_plugins.auto_command import request_recipe
from facedet.data import generate_embedded_dataset


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ------------------------------------------------------------------ allocate


def test_allocate_finds_the_cheapest_combination_not_the_greedy_one():
    """Need 200 parameters.  By hand, every choice that removes >= 200:

    A.5 alone: 200 at 3.0;  B.5 + C.5: 200 at 2.6;  A.25 + B.5: 250 at 3.5;  A.25 + B.25 + C.5: 210 at 1.6;
    A.5 + anything costs more than A.5.  The cheapest is A.25 + B.25 + C.5, though greedy by damage per
    parameter would take C.5 (0.002/param) then A.25 (0.01) then B.25 (0.0083) ... and the single
    largest cut (A.5) is what "prune the biggest component" would pick.
    """
    options = [Option("A", 0.25, 100, 1.0), Option("A", 0.5, 200, 3.0),
               Option("B", 0.25, 60, 0.5), Option("B", 0.5, 150, 2.5),
               Option("C", 0.5, 50, 0.1)]
    assert allocate(options, 200) == {"A": 0.25, "B": 0.25, "C": 0.5}
    # Less to remove: C.5 + A.25 (150 at 1.1) beats A.25 + B.25 (160 at 1.5).
    assert allocate(options, 150) == {"A": 0.25, "C": 0.5}
    assert allocate(options, 0) == {}
    assert allocate(options, 401) is None  # A.5 + B.5 + C.5 remove 400 at most


def test_allocate_prefers_the_choice_closest_to_the_target_at_equal_damage():
    options = [Option("A", 0.25, 100, 1.0), Option("B", 0.25, 120, 1.0)]
    assert allocate(options, 90) == {"A": 0.25}
    # Also when the closer choice is a combination, found past an equally cheap single option.
    options = [Option("A", 0.5, 300, 2.0), Option("B", 0.25, 60, 1.0), Option("C", 0.25, 50, 1.0)]
    assert allocate(options, 100) == {"B": 0.25, "C": 0.25}


def test_monotone_raises_a_dip_to_the_damage_of_the_smaller_cut():
    """A saturated measurement (B at 0.5 cheaper than at 0.25) would make the knapsack take the bigger cut
    for free; raised, the two tie and the smaller cut, closer to the target, wins."""
    measured = [Option("B", 0.5, 200, 0.8), Option("B", 0.25, 100, 1.0), Option("B", 0.75, 300, 2.0),
                Option("A", 0.25, 10, 0.1)]
    raised = monotone(measured)
    assert [(o.component, o.ratio) for o in raised] == [("B", 0.5), ("B", 0.25), ("B", 0.75), ("A", 0.25)]
    assert raised[0] == Option("B", 0.5, 200, 1.0, measured=0.8)
    assert raised[1:] == measured[1:]
    assert allocate(measured, 100) == {"B": 0.5}
    assert allocate(raised, 100) == {"B": 0.25}


# ------------------------------------------------------------------ the pass on a toy


class TwoBranches(nn.Module):
    """Two 3x3 conv branches of widths ``a`` and ``b``, concatenated into a 1x1 head with 2 outputs."""

    def __init__(self, a: int = 16, b: int = 16) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, a, 3, padding=1)
        self.b = nn.Conv2d(3, b, 3, padding=1)
        self.head = nn.Conv2d(a + b, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))


class TwoBranchFamily(ModelFamily):
    name = "two_branches"
    components = ("a", "b", "head")

    def recognises(self, model: nn.Module) -> bool:
        return isinstance(model, TwoBranches)

    def baseline(self) -> nn.Module:
        return TwoBranches()

    def build(self, spec: dict) -> nn.Module:
        return TwoBranches(spec["a"], spec["b"])

    def spec_of(self, model: nn.Module) -> dict:
        return {"a": model.a.out_channels, "b": model.b.out_channels}

    def component_of(self, parameter_name: str) -> str:
        return parameter_name.split(".")[0]

    def output_layers(self, model: nn.Module) -> list[nn.Module]:
        return [model.head]


def _toy(quiet_branch: str) -> TwoBranches:
    """Seeded weights; the ``quiet_branch``'s output weights in the head are 1000x smaller, so it barely matters."""
    torch.manual_seed(0)
    model = TwoBranches().eval()
    with torch.no_grad():
        columns = slice(0, 16) if quiet_branch == "a" else slice(16, 32)
        model.head.weight[:, columns] *= 1e-3
    return model


# Each removed branch channel takes its 3x3x3 kernel and bias (28) and its column in the head (2): 30.
PER_CHANNEL = 30


@pytest.mark.parametrize("quiet", ["a", "b"])
def test_auto_prunes_the_branch_that_barely_matters(quiet):
    """Start 962 params, target 962 - 240: 8 channels must go.  By hand: the quiet branch at 0.5 (8 of 16
    channels, 240 params) costs almost nothing; any cut of the loud branch costs far more."""
    model = _toy(quiet)
    start = count_parameters(model).total
    assert start == 2 * (16 * 28) + 32 * 2 + 2
    ctx = PassContext(family=TwoBranchFamily(), example_input=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    params = AutoParams(target=start - 8 * PER_CHANNEL, ratios=[0.25, 0.5])
    result = Auto().apply(model, params, ctx)
    assert result.record["allocation"] == {quiet: 0.5}
    assert count_parameters(result.model).total == start - 8 * PER_CHANNEL
    assert getattr(result.model, quiet).out_channels == 8
    # The table holds each option's counted parameters.
    removed = {(o["component"], o["ratio"]): o["removed"] for o in result.record["sensitivity"]}
    assert removed == {("a", 0.25): 4 * PER_CHANNEL, ("a", 0.5): 8 * PER_CHANNEL,
                       ("b", 0.25): 4 * PER_CHANNEL, ("b", 0.5): 8 * PER_CHANNEL}


def test_auto_takes_the_rest_from_the_other_branch_when_the_quiet_one_is_spent():
    """12 channels must go, ratios up to 0.5: the quiet branch gives 8 and the loud one the 4 left (0.25)."""
    model = _toy("a")
    start = count_parameters(model).total
    ctx = PassContext(family=TwoBranchFamily(), example_input=torch.randn(2, 3, 8, 8))
    result = Auto().apply(model, AutoParams(target=start - 12 * PER_CHANNEL, ratios=[0.25, 0.5]), ctx)
    assert result.record["allocation"] == {"a": 0.5, "b": 0.25}


def test_auto_fit_images_refits_the_chosen_cut_not_the_probes():
    """8 channels must go at ratios up to 0.25: b (quiet) gives 4 and a (loud) the other 4.  With
    fit_images the head, which lost their columns, is refitted on the run's images: the same allocation and
    count, and the cut's damage lower than the sliced one's."""
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = PassContext(family=TwoBranchFamily(), example_input=images[:2], sample_inputs=lambda n: images[:n])
    target = count_parameters(_toy("b")).total - 8 * PER_CHANNEL
    sliced = Auto().apply(_toy("b"), AutoParams(target=target, ratios=[0.25]), ctx)
    fitted = Auto().apply(_toy("b"), AutoParams(target=target, ratios=[0.25], fit_images=16), ctx)
    assert sliced.record["allocation"] == fitted.record["allocation"] == {"a": 0.25, "b": 0.25}
    assert sliced.record["sensitivity"] == fitted.record["sensitivity"]
    assert count_parameters(fitted.model).total == target
    error = fitted.record["fit_relative_error"]["head"]
    assert error["fitted"] < error["start"]
    assert fitted.record["damage"] < sliced.record["damage"]
    assert "fit_relative_error" not in sliced.record


def test_auto_fit_images_without_run_images_is_refused_before_probing():
    ctx = PassContext(family=TwoBranchFamily(), example_input=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="fit_images: this run has no images to fit on"):
        Auto().check(_toy("a"), AutoParams(target=700, fit_images=8), ctx)


def test_auto_refuses_an_unreachable_target_in_one_line():
    ctx = PassContext(family=TwoBranchFamily(), example_input=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="target: 100 parameters cannot be reached from 962"):
        Auto().apply(_toy("a"), AutoParams(target=100, ratios=[0.25]), ctx)


def test_auto_params_are_checked_before_any_model():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        AutoParams(target=10, ratios=[0.5, 1.0])


# ------------------------------------------------------------------ compress auto


@pytest.fixture(scope="module")
def base_recipe(tmp_path_factory) -> Path:
    """A tiny FeatherFace base: random weights, 64x64, the deformable convs made plain, then auto appended."""
    root = tmp_path_factory.mktemp("auto")
    generate_embedded_dataset(root / "data", num_train=4, num_val=2, num_test=2, size=64)
    recipe = root / "base.yaml"
    recipe.write_text("model: {family: featherface}\ninput_size: 64\ndata: {root: data}\n"
                      "finetune: {steps: 1, batch_size: 2}\n"
                      "stages:\n  - {name: plain, pass: ssh_slim, params: {conv: plain}}\n"
                      # A small search, for speed: two components at two ratios.
                      "  - {name: cut, pass: auto, params: {target: 1, ratios: [0.3, 0.6], "
                      "components: [backbone, bifpn]}}\n")
    return recipe


def test_the_request_fills_in_the_budget_and_appends_an_auto_stage_when_there_is_none(base_recipe, tmp_path):
    request = request_recipe(base_recipe, 123_456, None)
    assert request["budget"]["total"] == 123_456
    assert [s["pass"] for s in request["stages"]] == ["ssh_slim", "auto"]
    assert request["stages"][1]["params"]["target"] == 123_456
    assert Path(request["data"]["root"]).is_absolute()  # the folder it is written to is elsewhere
    plain = tmp_path / "plain.yaml"
    plain.write_text(base_recipe.read_text().split("  - {name: cut")[0].replace("data: {root: data}",
                                                                                 f"data: {{root: {base_recipe.parent / 'data'}}}"))
    appended = request_recipe(plain, 5_000, base_recipe)
    assert [s["pass"] for s in appended["stages"]] == ["ssh_slim", "auto"]
    assert appended["stages"][1]["params"]["target"] == 5_000
    assert appended["model"]["checkpoint"] == str(base_recipe.resolve())


def test_compress_auto_meets_the_budget_and_writes_a_recipe_that_redoes_it(base_recipe, tmp_path):
    out = tmp_path / "auto"
    result = invoke("auto", "--budget", "300000", "--recipe", str(base_recipe), "--no-finetune", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["params"]["total"] <= 300_000
    stage = report["stages"][-1]
    assert stage["pass"] == "auto" and stage["pass_record"]["target"] == 300_000
    assert len(stage["pass_record"]["sensitivity"]) == 4  # backbone and bifpn at 0.3 and 0.6
    request = yaml.safe_load((out / "auto.yaml").read_text())
    assert request["budget"]["total"] == 300_000 and request["stages"][-1]["params"]["target"] == 300_000
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["stages"][-1]["pass"] == "prune"
    assert resolved["stages"][-1]["params"]["ratios"] == stage["pass_record"]["allocation"]
    assert f"recipe: {out / 'recipe.yaml'}" in result.output

    again = tmp_path / "again"
    rerun = invoke("run", str(out / "recipe.yaml"), "--no-finetune", "--quiet", "--out", str(again))
    assert rerun.exit_code == 0, rerun.output
    first, second = open_model(out / "final.pt").model, open_model(again / "final.pt").model
    assert first.state_dict().keys() == second.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_compress_auto_usage_errors_are_one_line(base_recipe, tmp_path):
    for args, expected in [
        ((), "--budget: give the total parameters"),
        (("--budget", "1000", "--recipe", str(tmp_path / "missing.yaml")), "no such recipe file"),
        (("--resume",), "--resume: give the run folder with --out"),
        (("--resume", "--out", str(tmp_path)), "no auto.yaml to resume"),
    ]:
        result = invoke("auto", *args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.output
