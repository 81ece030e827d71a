"""The attention and head passes: cbam_plus, shared_cbam, unify_heads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydantic
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import featherface
from compressor import load_model
from compressor.accounting import count_parameters
from compressor.cli import cli
from compressor.passes import PassContext, PassResult
from compressor.plugins import load_registry
from compressor.validate import forward_eval, output_drift
from facedet.modules import SeparateHeads, UnifiedHeads
from featherface.modules import cbam
from compressor_plugins.featherface_family import FAMILY
from compressor_plugins.unify_heads import unify
from facedet.spec import from_spec, to_spec

PLUGINS = ["compressor_plugins.cbam_plus", "compressor_plugins.shared_cbam", "compressor_plugins.unify_heads"]
CBAMS = ["backbone_cbam.0", "backbone_cbam.1", "backbone_cbam.2", "bifpn_cbam.0", "bifpn_cbam.1", "bifpn_cbam.2"]
BASELINE_TOTAL = 592_371
# Original CBAM: channel MLP c*h + h + h*c + c (h = c // 16), spatial 7x7 conv 2*49 = 98 + BN 2.
#   64 ch: 580 + 100 = 680;  128 ch: 2,184 + 100 = 2,284;  256 ch: 8,464 + 100 = 8,564.
#   3 backbone + 3 BiFPN (64 ch): 680 + 2,284 + 8,564 + 3 * 680 = 13,568.
BASELINE_CBAM = 13_568
# cbam_plus (reduction 32, min_hidden 4, no biases): hidden max(c // 32, 4), MLP 2*c*h, spatial 100 kept.
#   64 ch: h 4 -> 512 + 100 = 612;  128 ch: h 4 -> 1,024 + 100 = 1,124;  256 ch: h 8 -> 4,096 + 100 = 4,196.
#   612 + 1,124 + 4,196 + 3 * 612 = 7,768.
PLUS_CBAM = 7_768
# shared_cbam on the baseline: one spatial gate (100) for six; one 64-ch channel gate (580) for
# backbone_cbam.0 and the three BiFPN CBAMs; the 128/256-ch gates stay (2,184 + 8,464).
#   100 + 580 + 2,184 + 8,464 = 11,328.
SHARED_CBAM = 11_328
# cbam_plus then shared_cbam: spatial 100 + 64-ch 512 + 128-ch 1,024 + 256-ch 4,096 = 5,732.
PLUS_SHARED_CBAM = 5_732
# unify_heads: per level 64 * 32 + 32 = 2,080, three levels: 6,240, as before (2 * (2 + 4 + 10) = 32 outputs).
HEADS = 6_240


@pytest.fixture(scope="module")
def registry():
    return load_registry(PLUGINS)


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return FAMILY.example_input(64, 64, seed=0)


@pytest.fixture(scope="module")
def baseline() -> nn.Module:
    torch.manual_seed(0)
    return featherface.featherface_baseline().eval()


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> nn.Module:
    """Seeded weights that are not the defaults: every gate and BN shapes the outputs."""
    return featherface.load_original_checkpoint(torch.load(reference_dir / "featherface_baseline_seed0.pt", weights_only=True))


def run_pass(registry, name: str, model: nn.Module, example: torch.Tensor, **params) -> nn.Module:
    """check, then apply to a copy, as the runner does."""
    cls = registry.passes[name]
    parsed = cls.Params(**params)
    ctx = PassContext(family=FAMILY, example_input=example)
    cls().check(model, parsed, ctx)
    result = cls().apply(copy.deepcopy(model), parsed, ctx)
    return (result.model if isinstance(result, PassResult) else result).eval()


def check_pass(registry, name: str, model: nn.Module, example: torch.Tensor, **params) -> None:
    cls = registry.passes[name]
    cls().check(model, cls.Params(**params), PassContext(family=FAMILY, example_input=example))


def components(model: nn.Module) -> dict[str, int]:
    return count_parameters(model, FAMILY.component_of, FAMILY.components).components


def total(model: nn.Module) -> int:
    return count_parameters(model, FAMILY.component_of, FAMILY.components).total


def reinitialised(model: nn.Module, attributes: tuple[str, ...], seed: int) -> nn.Module:
    """The same structure with the given CBAM gates (each instance once) freshly initialised."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    done: set[int] = set()
    for path in CBAMS:
        for attribute in attributes:
            gate = getattr(model.get_submodule(path), attribute)
            if id(gate) in done:
                continue
            done.add(id(gate))
            for layer in gate.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.reset_running_stats()
    return model.eval()


def assert_same_shapes(before: nn.Module, after: nn.Module, example: torch.Tensor) -> None:
    want = [t.shape for t in forward_eval(before, example)]
    got = forward_eval(after, example)
    assert [t.shape for t in got] == want
    assert all(torch.isfinite(t).all() for t in got)


def assert_spec_round_trip(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """to_spec (through JSON) -> from_spec -> load_state_dict reproduces the outputs exactly."""
    spec = json.loads(json.dumps(to_spec(model)))
    rebuilt = from_spec(spec)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    for a, b in zip(forward_eval(model, example), forward_eval(rebuilt, example)):
        assert torch.equal(a, b)
    assert total(rebuilt) == total(model)
    return rebuilt


# --- cbam_plus ---------------------------------------------------------------


def test_cbam_plus_one_64_channel_module_680_to_612(registry, example):
    holder = nn.Sequential(cbam(64))
    assert sum(p.numel() for p in holder.parameters()) == 680
    slim = run_pass(registry, "cbam_plus", holder, example)
    gate = slim[0].channel_gate
    assert (gate.fc1.out_features, gate.fc1.bias, gate.fc2.bias) == (4, None, None)
    assert sum(p.numel() for p in slim.parameters()) == 612  # 2*64*4 + 98 + 2


def test_cbam_plus_counts_and_runs(registry, baseline, example):
    assert components(baseline)["cbam"] == BASELINE_CBAM
    slim = run_pass(registry, "cbam_plus", baseline, example)
    assert components(slim)["cbam"] == PLUS_CBAM
    assert total(slim) == BASELINE_TOTAL - (BASELINE_CBAM - PLUS_CBAM)
    assert [slim.get_submodule(p).channel_gate.fc1.out_features for p in CBAMS] == [4, 4, 8, 4, 4, 4]
    assert_same_shapes(baseline, slim, example)
    for path in CBAMS:  # spatial gates kept as they were
        torch.testing.assert_close(slim.get_submodule(path).spatial_gate.state_dict(),
                                   baseline.get_submodule(path).spatial_gate.state_dict(), rtol=0, atol=0)


def test_cbam_plus_keeps_the_most_important_hidden_units(registry, baseline, example):
    gate = baseline.backbone_cbam[2].channel_gate  # 256 ch, hidden 16 -> 8
    score = gate.fc1.weight.abs().sum(1) * gate.fc2.weight.abs().sum(0)
    keep = torch.topk(score, 8).indices.sort().values
    slim = run_pass(registry, "cbam_plus", baseline, example, targets=["backbone_cbam.2"])
    new = slim.backbone_cbam[2].channel_gate
    assert torch.equal(new.fc1.weight, gate.fc1.weight[keep])
    assert torch.equal(new.fc2.weight, gate.fc2.weight[:, keep])
    assert components(slim)["cbam"] == BASELINE_CBAM - 8_564 + 4_196
    assert slim.bifpn_cbam[0].channel_gate.fc1.bias is not None  # untouched


def test_cbam_plus_never_widens(registry, baseline, example):
    slim = run_pass(registry, "cbam_plus", baseline, example, reduction_ratio=4)
    # 64 // 4 = 16 > 4 current units: stays 4; 128 -> 8 (current 8); 256 -> 16 (current 16). Biases dropped.
    assert [slim.get_submodule(p).channel_gate.fc1.out_features for p in CBAMS] == [4, 8, 16, 4, 4, 4]


def test_cbam_plus_drifts_less_than_random_gates(registry, reference, example):
    slim = run_pass(registry, "cbam_plus", reference, example)
    before = forward_eval(reference, example)
    drift = output_drift(before, forward_eval(slim, example))
    random = [output_drift(before, forward_eval(reinitialised(slim, ("channel_gate",), s), example)) for s in range(3)]
    assert 0 < drift < min(random), (drift, random)


def test_cbam_plus_bad_params(registry, baseline, example):
    with pytest.raises(ValueError, match=r"targets.*'backbone_cbam\.9'.*valid: backbone_cbam\.0, .*bifpn_cbam\.2"):
        check_pass(registry, "cbam_plus", baseline, example, targets=["backbone_cbam.9"])
    with pytest.raises(ValueError, match="targets"):
        check_pass(registry, "cbam_plus", baseline, example, targets=[])
    with pytest.raises(ValueError, match=r"reduction_ratio.*backbone_cbam\.0"):
        check_pass(registry, "cbam_plus", baseline, example, reduction_ratio=128, min_hidden=0)
    with pytest.raises(ValueError, match="reduction_ratio"):  # pydantic: at least 1
        registry.passes["cbam_plus"].Params(reduction_ratio=0)


# --- shared_cbam -------------------------------------------------------------


def test_shared_cbam_shares_instances_and_counts_them_once(registry, baseline, example):
    shared = run_pass(registry, "shared_cbam", baseline, example)
    cbams = [shared.get_submodule(p) for p in CBAMS]
    assert len({id(c.spatial_gate) for c in cbams}) == 1
    assert len({id(c.channel_gate) for c in cbams}) == 3  # 64 (x4), 128, 256
    assert cbams[0].channel_gate is cbams[3].channel_gate is cbams[4].channel_gate is cbams[5].channel_gate
    assert components(shared)["cbam"] == SHARED_CBAM
    assert total(shared) == BASELINE_TOTAL - (BASELINE_CBAM - SHARED_CBAM)
    assert_same_shapes(baseline, shared, example)


def test_shared_cbam_starts_from_the_average(registry, baseline, example):
    shared = run_pass(registry, "shared_cbam", baseline, example)
    members = [baseline.get_submodule(p) for p in ("backbone_cbam.0", "bifpn_cbam.0", "bifpn_cbam.1", "bifpn_cbam.2")]
    gate = shared.bifpn_cbam[0].channel_gate
    torch.testing.assert_close(gate.fc1.weight, torch.stack([m.channel_gate.fc1.weight for m in members]).mean(0))
    torch.testing.assert_close(gate.fc2.bias, torch.stack([m.channel_gate.fc2.bias for m in members]).mean(0))
    spatial = shared.bifpn_cbam[0].spatial_gate
    originals = [baseline.get_submodule(p).spatial_gate for p in CBAMS]
    torch.testing.assert_close(spatial.conv.weight, torch.stack([g.conv.weight for g in originals]).mean(0))
    torch.testing.assert_close(spatial.bn.running_var, torch.stack([g.bn.running_var for g in originals]).mean(0))


def test_shared_cbam_options(registry, baseline, example):
    spatial_only = run_pass(registry, "shared_cbam", baseline, example, share_channel=False)
    assert components(spatial_only)["cbam"] == BASELINE_CBAM - 5 * 100
    channel_only = run_pass(registry, "shared_cbam", baseline, example, share_spatial=False)
    assert components(channel_only)["cbam"] == BASELINE_CBAM - 3 * 580
    some = run_pass(registry, "shared_cbam", baseline, example, targets=["bifpn_cbam.0", "bifpn_cbam.2"])
    assert some.bifpn_cbam[0].spatial_gate is some.bifpn_cbam[2].spatial_gate
    assert some.bifpn_cbam[1].spatial_gate is not some.bifpn_cbam[0].spatial_gate
    assert components(some)["cbam"] == BASELINE_CBAM - 100 - 580


def test_shared_cbam_drifts_less_than_random_gates(registry, reference, example):
    shared = run_pass(registry, "shared_cbam", reference, example)
    before = forward_eval(reference, example)
    drift = output_drift(before, forward_eval(shared, example))
    random = [output_drift(before, forward_eval(reinitialised(shared, ("channel_gate", "spatial_gate"), s), example))
              for s in range(3)]
    assert 0 < drift < min(random), (drift, random)


def test_shared_cbam_spec_round_trip_keeps_sharing(registry, baseline, example):
    shared = run_pass(registry, "shared_cbam", baseline, example)
    spec = to_spec(shared)
    assert spec["args"]["bifpn_cbam"][2]["args"]["spatial_gate"] == {"ref": "backbone_cbam.0.spatial_gate"}
    rebuilt = assert_spec_round_trip(shared, example)
    assert rebuilt.backbone_cbam[0].spatial_gate is rebuilt.bifpn_cbam[2].spatial_gate
    assert rebuilt.backbone_cbam[0].channel_gate is rebuilt.bifpn_cbam[1].channel_gate
    assert components(rebuilt)["cbam"] == SHARED_CBAM


def test_shared_cbam_after_cbam_plus(registry, baseline, example):
    slim = run_pass(registry, "cbam_plus", baseline, example)
    shared = run_pass(registry, "shared_cbam", slim, example)
    assert components(shared)["cbam"] == PLUS_SHARED_CBAM
    assert_same_shapes(baseline, shared, example)
    rebuilt = assert_spec_round_trip(shared, example)
    assert rebuilt.backbone_cbam[0].channel_gate is rebuilt.bifpn_cbam[2].channel_gate
    # And cbam_plus after sharing keeps the shared gate shared.
    again = run_pass(registry, "cbam_plus", run_pass(registry, "shared_cbam", baseline, example), example)
    assert again.backbone_cbam[0].channel_gate is again.bifpn_cbam[2].channel_gate
    assert components(again)["cbam"] == PLUS_SHARED_CBAM


def test_shared_cbam_bad_params(registry, baseline, example):
    mixed = run_pass(registry, "cbam_plus", baseline, example, targets=["backbone_cbam.0"])
    state = {k: v.clone() for k, v in mixed.state_dict().items()}
    with pytest.raises(ValueError, match=r"share_channel.*backbone_cbam\.0.*bifpn_cbam\.0.*bias=False.*bias=True"):
        check_pass(registry, "shared_cbam", mixed, example)
    assert all(torch.equal(v, mixed.state_dict()[k]) for k, v in state.items())  # check touched nothing
    check_pass(registry, "shared_cbam", mixed, example, share_channel=False)  # spatial gates still alike
    with pytest.raises(ValueError, match=r"targets.*'ssh\.0'"):
        check_pass(registry, "shared_cbam", baseline, example, targets=["ssh.0", "bifpn_cbam.0"])
    with pytest.raises(ValueError, match="targets"):
        check_pass(registry, "shared_cbam", baseline, example, targets=["bifpn_cbam.1"])
    with pytest.raises(ValueError, match="share_spatial"):
        check_pass(registry, "shared_cbam", baseline, example, share_spatial=False, share_channel=False)
    with pytest.raises(ValueError, match="share_channel"):
        check_pass(registry, "shared_cbam", baseline, example, share_spatial=False,
                   targets=["backbone_cbam.1", "backbone_cbam.2"])


# --- unify_heads -------------------------------------------------------------


def test_unify_heads_is_lossless(registry, reference, example):
    assert registry.passes["unify_heads"].lossless
    unified = run_pass(registry, "unify_heads", reference, example)
    assert isinstance(unified.heads, UnifiedHeads)
    assert components(unified)["heads"] == components(reference)["heads"] == HEADS
    assert total(unified) == BASELINE_TOTAL
    for size in (64, 96):
        x = FAMILY.example_input(size, size, seed=1)
        for a, b in zip(forward_eval(reference, x), forward_eval(unified, x)):
            assert torch.allclose(a, b, atol=1e-6)
            assert torch.equal(a, b)  # output channels of a conv are independent: bit-identical on CPU


def test_unify_heads_with_pruned_input_widths(example):
    torch.manual_seed(0)
    heads = SeparateHeads([48, 64, 16], num_anchors=3).eval()
    features = [torch.randn(2, c, s, s) for c, s in ((48, 8), (64, 4), (16, 2))]
    unified = unify(heads)
    assert unified.spec_args() == {"in_channels": [48, 64, 16], "num_anchors": 3}
    assert sum(p.numel() for p in unified.parameters()) == sum(p.numel() for p in heads.parameters())
    with torch.no_grad():
        for a, b in zip(heads(features), unified(features)):
            assert torch.equal(a, b)


def test_unify_heads_spec_round_trip(registry, baseline, example):
    unified = run_pass(registry, "unify_heads", baseline, example)
    spec = to_spec(unified)
    assert spec["args"]["heads"] == {"type": "UnifiedHeads", "args": {"in_channels": [64, 64, 64], "num_anchors": 2}}
    assert_spec_round_trip(unified, example)


def test_unify_heads_refuses_unified_heads(registry, baseline, example):
    unified = run_pass(registry, "unify_heads", baseline, example)
    with pytest.raises(ValueError, match="already UnifiedHeads"):
        check_pass(registry, "unify_heads", unified, example)


class _Holder(nn.Module):
    """Heads under names unify_heads cannot guess: found by type, replaced where they sit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.detector = SeparateHeads([8, 4])
        self.extra = nn.ModuleList([SeparateHeads([6])])
        self.alias = self.detector  # one instance at two places: it stays one

    def forward(self, features):
        return [*self.detector(features[:2]), *self.extra[0](features[2:])]


def test_unify_heads_finds_every_separate_heads_by_type(registry, example):
    holder = _Holder().eval()
    features = [torch.randn(2, c, s, s) for c, s in ((8, 4), (4, 2), (6, 2))]
    unified = run_pass(registry, "unify_heads", holder, example)
    assert isinstance(unified.detector, UnifiedHeads) and isinstance(unified.extra[0], UnifiedHeads)
    assert unified.alias is unified.detector
    assert not any(isinstance(m, SeparateHeads) for m in unified.modules())
    with torch.no_grad():
        for a, b in zip(holder(features), unified(features)):
            assert torch.equal(a, b)


def test_unify_heads_says_why_it_does_not_apply(registry, example):
    with pytest.raises(ValueError, match="^the model has no SeparateHeads"):
        check_pass(registry, "unify_heads", nn.Sequential(nn.Conv2d(3, 4, 1)), example)
    holder = _Holder()
    holder.extra[0].box_convs[0] = nn.Conv2d(6, 5, 1)
    with pytest.raises(ValueError, match=r"^extra\.0 level 0: output widths \[4, 5, 20\], expected \[4, 8, 20\]$"):
        check_pass(registry, "unify_heads", holder, example)


ATTENTION_BAD_PARAMS = [
    ("cbam_plus", {"reduction_ratio": 0}, "reduction_ratio"),
    ("cbam_plus", {"min_hidden": -1}, "min_hidden"),
    ("cbam_plus", {"targets": []}, "targets"),
    ("shared_cbam", {"targets": []}, "targets"),
    ("shared_cbam", {"targets": ["bifpn_cbam.1"]}, "targets"),
    ("shared_cbam", {"targets": ["bifpn_cbam.1", "bifpn_cbam.1"]}, "targets"),
    ("shared_cbam", {"share_spatial": False, "share_channel": False}, "share_spatial"),
]


@pytest.mark.parametrize(("name", "params", "field"), ATTENTION_BAD_PARAMS)
def test_bad_params_are_refused_without_a_model(registry, name, params, field):
    with pytest.raises(pydantic.ValidationError) as caught:
        registry.passes[name].Params.model_validate(params)
    (error,) = caught.value.errors()
    where = ".".join(str(part) for part in error["loc"])
    assert where == field or (not where and error["msg"].startswith(f"Value error, {field}")), error


def test_cbam_plus_spec_round_trip(registry, baseline, example):
    assert_spec_round_trip(run_pass(registry, "cbam_plus", baseline, example), example)


def test_passes_listed_with_params():
    result = CliRunner().invoke(cli, ["passes", *[arg for p in PLUGINS for arg in ("--plugin", p)]])
    assert result.exit_code == 0, result.output
    for line in ("cbam_plus  - CBAM_Plus", "shared_cbam  - SharedCBAMManager", "unify_heads  - Merge",
                 "reduction_ratio: int (default 32)", "share_spatial: bool (default True)"):
        assert line in result.output, result.output


# --- end to end --------------------------------------------------------------


def test_compress_run_end_to_end(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {family: featherface}\n"
        f"plugins: [{', '.join(PLUGINS)}]\ninput_size: 64\nseed: 0\nstages:\n"
        "  - pass: cbam_plus\n    params: {reduction_ratio: 32}\n"
        "  - pass: shared_cbam\n"
        "  - pass: unify_heads\n"
    )
    out = tmp_path / "run"
    # --no-finetune also skips the accuracy evaluation, which is not what this test is about.
    result = CliRunner().invoke(cli, ["run", "--quiet", "--no-finetune", str(recipe), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["ok", "ok", "ok"]
    plus, shared, unified = report["stages"]
    assert plus["params"]["components"]["cbam"] == PLUS_CBAM
    assert shared["params"]["components"]["cbam"] == PLUS_SHARED_CBAM
    assert unified["params"]["components"]["heads"] == HEADS and unified["output_drift"] == 0.0
    assert report["final"]["params"]["total"] == BASELINE_TOTAL - BASELINE_CBAM + PLUS_SHARED_CBAM  # 584,535
    model = load_model(out)
    assert model.backbone_cbam[0].spatial_gate is model.bifpn_cbam[2].spatial_gate
    assert isinstance(model.heads, UnifiedHeads)
    assert total(model) == report["final"]["params"]["total"]
