"""The global_prune pass: torch-pruning's global magnitude pruning, held to the family's constraints and a target."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import featherface
from compressor import load_model
from compressor.accounting import count_parameters
from compressor.checkpoint import save_checkpoint
from compressor.cli import cli
from compressor.family import PruningHints
from compressor.passes import PassContext
from compressor.plugins import load_registry
from compressor_plugins.featherface_family import FAMILY
from compressor_plugins.global_prune import GlobalPrune, GlobalPruneParams, global_prune_model
from facedet.modules import DeformableConv2d
from featherface.modules import SpatialGate
from featherface.modules.bifpn import FusionWeights

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
HEAD_OUT = {"class_convs": 4, "box_convs": 8, "landmark_convs": 20}
TARGET = 420_000  # from 592,371: enough steps to reach every component, few enough to stay fast

pytestmark = pytest.mark.usefixtures("one_thread")


def _alive(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that carry signal: BN affine and statistics set from a batch, deformable offsets on."""
    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.momentum = 1.0
        for m in model.modules():
            if isinstance(m, DeformableConv2d):
                m.offset_conv.weight.normal_(0, 0.02)
                m.modulator_conv.weight.normal_(0, 0.02)
        model.train()
        model(FAMILY.example_input(64, 64, seed=seed + 1))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _outputs(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return FAMILY.example_input(64, 64)


@pytest.fixture(scope="module")
def baseline() -> nn.Module:
    torch.manual_seed(0)  # the initial weights too: what a global ranking picks depends on all of them
    return _alive(featherface.featherface_baseline())


@pytest.fixture(scope="module")
def pruned(baseline, example) -> tuple[nn.Module, dict[str, Any]]:
    """The baseline (deformable convs and all) pruned once to TARGET; shared by the tests that only look."""
    model = copy.deepcopy(baseline)
    params = GlobalPruneParams(target_params=TARGET, step=0.02)
    ctx = PassContext(family=FAMILY, example_input=example)
    GlobalPrune().check(model, params, ctx)
    result = GlobalPrune().apply(model, params, ctx)
    return result.model, result.record


def test_registered_as_a_pass():
    assert load_registry().get_pass("global_prune") is GlobalPrune


def test_reaches_the_target_on_the_whole_model(baseline, pruned):
    model, record = pruned
    before = count_parameters(baseline, FAMILY.component_of, FAMILY.components)
    after = count_parameters(model, FAMILY.component_of, FAMILY.components)
    assert before.total == 592_371
    assert after.total <= TARGET
    # One step (2% of the channels) before the end it was still over: it stops at the first step under.
    steps = [step["params"] for step in record["steps"]]
    assert len(steps) >= 2 and steps[-1] == after.total and steps[-2] > TARGET
    assert steps == sorted(steps, reverse=True)
    # Global: every component with channels of its own gave some, by whatever the ranking chose.
    shrunk = {c for c in FAMILY.components if after.components[c] < before.components[c]}
    assert {"backbone", "bifpn", "ssh", "channel_shuffle"} <= shrunk
    assert after.components["other"] == 0
    groups = [group for step in record["steps"] for group in step["groups"]]
    assert groups and all(group["kept"] >= 1 for group in groups)


def test_keeps_the_output_contract_and_the_special_layers(baseline, pruned, example):
    model, record = pruned
    assert [o.shape for o in _outputs(model, example)] == [o.shape for o in _outputs(baseline, example)]
    # The output layers keep their output channels and are never a pruned group's root.
    for attr, width in HEAD_OUT.items():
        assert [conv.out_channels for conv in getattr(model.heads, attr)] == [width] * 3
    assert not any(group["root"].startswith("heads.") for step in record["steps"] for group in step["groups"])
    # Deformable convs pruned through their pruner: the offsets and masks keep their 2k*k and k*k outputs.
    deformable = [m for m in model.modules() if isinstance(m, DeformableConv2d)]
    assert deformable and all(
        m.offset_conv.out_channels == 2 * 9 and m.modulator_conv.out_channels == 9
        and m.offset_conv.in_channels == m.regular_conv.in_channels for m in deformable)
    assert any(m.regular_conv.out_channels < o.regular_conv.out_channels
               for m, o in zip(deformable, (m for m in baseline.modules() if isinstance(m, DeformableConv2d))))
    # Spatial gates untraced: their conv still reads [max, mean] and writes one map, and is no part of
    # the features' groups.  (Traced, the graph couples it to the 64 channels of the features it gates,
    # and torch-pruning then never prunes those groups: its 1-channel output cannot shrink.)
    gates = [m for m in model.modules() if isinstance(m, SpatialGate)]
    assert gates and all(conv.in_channels == 2 and conv.out_channels == 1
                         for g in gates for conv in g.modules() if isinstance(conv, nn.Conv2d))
    spec, original = FAMILY.spec_of(model)["args"], FAMILY.spec_of(baseline)["args"]
    assert spec["bifpn"][0]["args"]["channels"] < original["bifpn"][0]["args"]["channels"]
    gated = [stage[-1] for stage in spec["backbone"]["args"]["widths"]]  # each stage's output feeds a CBAM
    assert all(a < b for a, b in zip(gated, (stage[-1] for stage in original["backbone"]["args"]["widths"])))
    # Fusion weights untouched; BiFPN cells keep one width each; shuffle inputs stay even.
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(
        (m for m in model.modules() if isinstance(m, FusionWeights)),
        (m for m in baseline.modules() if isinstance(m, FusionWeights))))
    assert len({cell["args"]["channels"] for cell in spec["bifpn"]}) == 1
    assert all(block["args"]["in_channels"] % block["args"]["groups"] == 0 for block in spec["shuffle"])


def test_round_trips_through_its_spec_and_checkpoint(pruned, example, tmp_path):
    model, _ = pruned
    rebuilt = FAMILY.build(FAMILY.spec_of(model))
    rebuilt.load_state_dict(model.state_dict())
    for a, b in zip(_outputs(rebuilt, example), _outputs(model, example)):
        assert torch.equal(a, b)
    save_checkpoint(tmp_path / "pruned.pt", model, FAMILY)
    for a, b in zip(_outputs(load_model(tmp_path / "pruned.pt"), example), _outputs(model, example)):
        assert torch.equal(a, b)


def test_an_ignored_layer_keeps_its_width(baseline, example):
    model = copy.deepcopy(baseline)
    params = GlobalPruneParams(target_params=540_000, step=0.02, ignored_layers=["backbone"])
    global_prune_model(model, params, PassContext(family=FAMILY, example_input=example))
    assert count_parameters(model).total <= 540_000
    assert FAMILY.spec_of(model)["args"]["backbone"] == FAMILY.spec_of(baseline)["args"]["backbone"]


# --- global ranking, on a toy -------------------------------------------------


class Toy(nn.Module):
    """conv a -> BN -> ReLU -> conv b -> BN -> ReLU -> head: two channel groups (a's and b's), one output layer."""

    def __init__(self, a: int = 16, b: int = 16) -> None:
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(4, a, 3, padding=1, bias=False), nn.BatchNorm2d(a)
        self.b, self.b_bn = nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)
        self.head = nn.Conv2d(b, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a_bn(self.a(x)))
        return self.head(torch.relu(self.b_bn(self.b(x))))


class ToyFamily:
    """Just what the pass asks of a family."""

    def output_layers(self, model: Toy) -> list[nn.Module]:
        return [model.head]

    def pruning_hints(self, model: nn.Module) -> PruningHints:
        return PruningHints()

    def component_of(self, name: str) -> str:
        return name.split(".")[0]

    def spec_of(self, model: Toy) -> dict[str, int]:
        return {"a": model.a.out_channels, "b": model.b.out_channels}

    def build(self, spec: dict[str, int]) -> Toy:
        return Toy(**spec)


def _toy(scale_a: torch.Tensor) -> Toy:
    """Random weights with a's channels scaled by ``scale_a`` wherever they appear (a's rows, a_bn, b's columns)."""
    torch.manual_seed(0)
    toy = Toy()
    with torch.no_grad():
        for bn in (toy.a_bn, toy.b_bn):
            bn.weight.fill_(1.0)
        toy.a.weight.mul_(scale_a.view(-1, 1, 1, 1))
        toy.a_bn.weight.mul_(scale_a)
        toy.b.weight.mul_(scale_a.view(1, -1, 1, 1))
    return toy.eval()


def _prune_toy(toy: Toy, **params: Any) -> dict[str, list[int]]:
    total = count_parameters(toy).total
    target = params.pop("target", total - 400)  # a few channels' worth
    ctx = PassContext(family=ToyFamily(), example_input=torch.randn(2, 4, 8, 8))
    done, _ = global_prune_model(toy, GlobalPruneParams(target_params=target, step=0.05, **params), ctx)
    assert count_parameters(toy).total <= target
    removed: dict[str, list[int]] = {"a": [], "b": []}
    for step in done:
        for group in step:
            removed[group.root] += group.removed
    return removed


def test_ranking_is_global_raw_magnitudes():
    """Raw magnitudes (normalizer none): the layer whose weights are all tiny loses more channels than the other."""
    toy = _toy(torch.full((16,), 0.01))
    removed = _prune_toy(toy, normalizer="none")
    assert len(removed["a"]) > len(removed["b"]) == 0
    assert toy.a.out_channels < 16 and toy.b.out_channels == 16


def test_ranking_is_global_default_normalizer():
    """torch-pruning's default (scores relative to their group's mean): the group with a weak half gives it first.

    Local (per-group) ranking would take the same share from both groups; the
    global threshold takes a's weak channels, exactly, and none of b's.
    """
    weak = [1, 2, 5, 8, 9, 12, 14, 15]
    scale = torch.ones(16)
    scale[weak] = 0.01
    toy = _toy(scale)
    removed = _prune_toy(toy, target=count_parameters(toy).total - 8 * (4 * 9 + 2 + 16 * 9) + 1)
    assert removed["b"] == [] and len(removed["a"]) == len(weak)
    # (Removed indices are each step's own; what is left shows which went: the strong channels stay.)
    assert toy.a.out_channels == 8 and torch.equal(toy.a_bn.weight, torch.ones(8)) and toy.b.out_channels == 16


# --- params and failures ------------------------------------------------------


def test_params_are_checked():
    with pytest.raises(pydantic.ValidationError, match="step"):
        GlobalPruneParams(target_params=1000, step=0.5, max_ratio=0.2)
    with pytest.raises(pydantic.ValidationError):
        GlobalPruneParams(target_params=1000, ratio=0.1)
    with pytest.raises(pydantic.ValidationError):
        GlobalPruneParams(target_params=0)
    toy = _toy(torch.ones(16))
    ctx = PassContext(family=ToyFamily(), example_input=torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="ignored_layers: no module 'nope'"):
        GlobalPrune().check(toy, GlobalPruneParams(target_params=1000, ignored_layers=["nope"]), ctx)


def test_an_unreachable_target_fails_and_one_already_met_does_nothing():
    toy = _toy(torch.ones(16))
    ctx = PassContext(family=ToyFamily(), example_input=torch.randn(2, 4, 8, 8))
    with pytest.raises(RuntimeError, match="over target_params 100"):
        global_prune_model(toy, GlobalPruneParams(target_params=100, step=0.05, max_ratio=0.1), ctx)
    toy = _toy(torch.ones(16))
    total = count_parameters(toy).total
    assert global_prune_model(toy, GlobalPruneParams(target_params=total), ctx) == ([], [])
    assert count_parameters(toy).total == total


# --- the shipped recipe -------------------------------------------------------


def test_shipped_recipe_without_finetuning_fits_the_budget(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--quiet", "--no-finetune", str(RECIPES / "global_prune.yaml"),
                                      "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    (stage,) = report["stages"]
    assert stage["status"] == "ok" and stage["repeats"] == 1
    assert report["baseline"]["params"]["total"] == 592_371
    assert stage["params"]["total"] <= 250_000 == report["recipe"]["budget"]["total"]
    assert report["final"]["params"]["total"] == stage["params"]["total"]
    assert count_parameters(load_model(out)).total == stage["params"]["total"]
