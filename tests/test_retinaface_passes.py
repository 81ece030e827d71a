"""The passes on RetinaFace: unify_heads, prune per component, ssh_slim, and passes that do not apply.

RetinaFace is MobileNetV1-0.25 -> FPN (1x1 laterals, top-down additions, 3x3
merges) -> plain-conv SSH per level -> SeparateHeads, any input size.  No op in
it reduces over channels, so removing a channel computes exactly what the
original computes with that channel zeroed where it is made (its BN's weight and
bias): the tests below hold every narrowing to that, which checks that the FPN's
additions and the SSH concatenations were coupled right.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

from compressor import load_model
from compressor.accounting import count_parameters
from compressor.cli import cli
from compressor.passes import Pass, PassContext, PassResult
from compressor.validate import forward_eval, output_drift
from compressor_plugins.bifpn_slim import BiFPNSlim
from compressor_plugins.cbam_plus import CBAMPlus
from compressor_plugins.prune import Prune, PruneParams, prunable_components, prune_model
from compressor_plugins.retinaface_family import FAMILY
from compressor_plugins.shared_cbam import SharedCBAM
from compressor_plugins.ssh_slim import SSHSlim, SSHSlimParams, kept_channels, new_widths
from compressor_plugins.unify_heads import UnifyHeads
from facedet.modules import SeparateHeads, UnifiedHeads
from featherface import featherface_baseline
from retinaface import retinaface_mnet025

BASELINE = {"backbone": 213_072, "fpn": 103_040, "ssh": 104_256, "heads": 6_240, "other": 0}
# The sides are no multiples of 32: every FPN level upsamples to its finer level's odd size.
ODD = (61, 93)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """Random weights that carry signal: BN affine parameters random, statistics calibrated on a batch."""
    torch.manual_seed(0)
    model = retinaface_mnet025()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.momentum = 1.0
        model.train()(FAMILY.example_input(64, 96, seed=5))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def example() -> Tensor:
    return FAMILY.example_input(72, 100)


@pytest.fixture(scope="module")
def odd() -> Tensor:
    return FAMILY.example_input(*ODD, seed=1)


def ctx(example: Tensor) -> PassContext:
    return PassContext(family=FAMILY, example_input=example)


def run_pass(pass_cls: type[Pass], model: nn.Module, example: Tensor, **params) -> nn.Module:
    """check, then apply to a copy, as the runner does."""
    parsed = pass_cls.Params(**params)
    pass_cls().check(model, parsed, ctx(example))
    result = pass_cls().apply(copy.deepcopy(model), parsed, ctx(example))
    return (result.model if isinstance(result, PassResult) else result).eval()


def components(model: nn.Module) -> dict[str, int]:
    return count_parameters(model, FAMILY.component_of, FAMILY.components).components


def assert_spec_round_trip(model: nn.Module, x: Tensor) -> None:
    """spec_of -> JSON -> build -> load_state_dict reproduces the outputs exactly."""
    rebuilt = FAMILY.build(json.loads(json.dumps(FAMILY.spec_of(model))))
    rebuilt.load_state_dict(model.state_dict())
    for a, b in zip(forward_eval(model, x), forward_eval(rebuilt.eval(), x)):
        assert torch.equal(a, b)
    assert components(rebuilt) == components(model)


def assert_same_in_float64(narrow: nn.Module, zeroed: nn.Module, x: Tensor) -> None:
    # In float64: the identity is exact, but float32 rounding differs between a narrower
    # layer and a zeroed one, and the network amplifies it.
    for a, b in zip(forward_eval(copy.deepcopy(narrow).double(), x.double()),
                    forward_eval(copy.deepcopy(zeroed).double(), x.double())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def zero_channels(bn: nn.BatchNorm2d, dropped: list[int] | Tensor) -> None:
    """Make ``bn`` output exactly zero on ``dropped`` channels (eval mode): what removing them computes."""
    with torch.no_grad():
        bn.weight[dropped] = 0
        bn.bias[dropped] = 0


# --- unify_heads ------------------------------------------------------------------------------------


def test_unify_heads_is_lossless_on_the_real_weights(reference_dir: Path):
    trained = load_model(reference_dir / "retinaface_mnet025_widerface.pth")
    photo = torch.load(reference_dir / "retinaface_mnet025_reference.pt", weights_only=True)["input"]
    crop = photo[:, :, :301, :457]  # a real photograph at a size no multiple of 32
    assert UnifyHeads().applies_to(trained) is None
    unified = run_pass(UnifyHeads, trained, crop)
    assert isinstance(unified.heads, UnifiedHeads) and isinstance(trained.heads, SeparateHeads)
    assert components(unified) == components(trained) == BASELINE
    before, after = forward_eval(trained, crop), forward_eval(unified, crop)
    assert before[1].abs().max() > 1  # trained logits, not the near-zero outputs of default weights
    for a, b in zip(before, after):
        assert torch.equal(a, b)  # output channels of a conv are independent: bit-identical
    assert_spec_round_trip(unified, crop)


# --- prune ---------------------------------------------------------------------------------------------

# Parameters after pruning one component by half (the FPN and heads widths follow their inputs):
#   backbone: widths (4, 8, 16, 16, 32, 32), (64,) * 6, (128, 128): stage 1 3,112, stage 2 27,168,
#     stage 3 27,200 -> 57,480; FPN laterals read 32/64/128: 224 * 64 + 3 BN * 128 + merges 73,984 -> 88,704.
#   fpn: every level 32 wide (each lateral is tied to the coarser output it is added to):
#     laterals (64 + 128 + 256) * 32 + 192 = 14,528, merges 2 * (32 * 32 * 9 + 64) = 18,560 -> 33,088;
#     SSH reading 32: 9,280 + 4,640 + 3 * 2,336 = 20,928 per level -> 62,784.
#   ssh: branches 16/8/8/8/8 from 64: 9,248 + 4,624 + 3 * 592 = 15,648 per level -> 46,944;
#     the heads read 32 channels: 3 * (32 * 32 + 32) = 3,168.
PRUNED_BY_HALF = {
    "backbone": {"backbone": 57_480, "fpn": 88_704},
    "fpn": {"fpn": 33_088, "ssh": 62_784},
    "ssh": {"ssh": 46_944, "heads": 3_168},
}


def test_the_heads_are_the_protected_output_layers(model, example):
    assert prunable_components(model, FAMILY) == ["backbone", "fpn", "ssh"]
    with pytest.raises(ValueError, match="^ratios: 'heads' cannot be pruned: its layers are the model's output"):
        Prune().check(model, PruneParams(ratios={"heads": 0.5}), ctx(example))


@pytest.mark.parametrize("component", sorted(PRUNED_BY_HALF))
def test_prune_one_component_by_half(component, model, example, odd):
    pruned = copy.deepcopy(model)
    params = PruneParams(ratios={component: 0.5})
    Prune().check(pruned, params, ctx(example))
    record = prune_model(pruned, params, ctx(example))
    assert record and all(group.component == component for group in record)
    assert all(group.channels - len(group.removed) == group.channels // 2 for group in record)

    after = components(pruned)
    assert after == {**BASELINE, **PRUNED_BY_HALF[component]}
    assert sum(after.values()) < sum(BASELINE.values())

    # Exactly the original with the removed channels zeroed where they are made, at an odd size too.
    zeroed = copy.deepcopy(model)
    modules = dict(zeroed.named_modules())
    for group in record:
        for name, kind, idxs in group.layers:
            if kind == "out" and isinstance(modules[name], nn.BatchNorm2d):
                zero_channels(modules[name], idxs)
    for x in (example, odd):
        assert_same_in_float64(pruned, zeroed, x)
    assert output_drift(forward_eval(model, odd), forward_eval(pruned, odd)) > 0.1  # the check is not vacuous
    assert_spec_round_trip(pruned, odd)


def test_prune_keeps_the_fpn_additions_tied(model, example):
    """Lateral i and the upsampled coarser output it is added to lose the same channels."""
    pruned = copy.deepcopy(model)
    record = prune_model(pruned, PruneParams(ratios={"fpn": 0.25}), ctx(example))
    fpn = pruned.fpn.spec_args()
    assert fpn["lateral_channels"] == [48, 48, 48] and fpn["merge_channels"] == [48, 48]
    # Three groups, one per FPN output; the ones with an addition hold both addends' producers.
    touched = [{name for name, kind, _ in group.layers if kind == "out" and name.endswith(".conv")}
               for group in record]
    assert sorted(map(sorted, touched)) == [["fpn.lateral.0.conv", "fpn.merge.1.conv"],
                                            ["fpn.lateral.1.conv", "fpn.lateral.2.conv"],
                                            ["fpn.merge.0.conv"]]
    assert [ssh.conv3x3.in_channels for ssh in pruned.ssh] == [48, 48, 48]


def test_sensitivity_command_on_retinaface():
    result = CliRunner().invoke(cli, ["sensitivity", "retinaface", "--input-size", "64x96", "--ratios", "0.5",
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {row["component"]: row for row in json.loads(result.output)}
    assert sorted(rows) == ["backbone", "fpn", "ssh"]
    for component, counts in PRUNED_BY_HALF.items():
        assert rows[component]["component_params"] == counts[component]


# --- ssh_slim ------------------------------------------------------------------------------------------

# conv=grouped, groups=2 from 64 inputs: 64 * 32 * 9 / 2 + 64 = 9,280, 64 * 16 * 9 / 2 + 32 = 4,640,
#   3 * (16 * 16 * 9 / 2 + 32) = 3,552 -> 17,472 per level -> 52,416; the heads are untouched.
@pytest.mark.parametrize(("params", "ssh", "heads"), [
    ({"width_ratio": 0.5}, 46_944, 3_168),
    ({"conv": "grouped", "groups": 2}, 52_416, 6_240),
])
def test_ssh_slim_counts(params, ssh, heads, model, example, odd):
    assert SSHSlim().applies_to(model) is None
    slim = run_pass(SSHSlim, model, example, **params)
    assert components(slim) == {**BASELINE, "ssh": ssh, "heads": heads}
    assert [t.shape for t in forward_eval(slim, odd)] == [t.shape for t in forward_eval(model, odd)]
    assert_spec_round_trip(slim, odd)


@pytest.mark.parametrize("unified", [False, True], ids=["separate_heads", "unified_heads"])
def test_narrow_ssh_keeps_the_trained_weights_of_its_kept_channels(unified, model, example, odd):
    """The narrowed SSH and the heads' narrowed inputs are the original with the dropped channels zeroed."""
    start = run_pass(UnifyHeads, model, example) if unified else model
    slim = run_pass(SSHSlim, start, example, width_ratio=0.6)
    zeroed = copy.deepcopy(start)
    for ssh in zeroed.ssh:
        widths = new_widths(ssh, 0.6, 1, 0)
        for unit, keep in kept_channels(ssh, widths).items():
            bn = getattr(ssh, unit).bn
            zero_channels(bn, [i for i in range(bn.num_features) if i not in set(keep.tolist())])
    # 32/16/16/16/16 x 0.6 -> 19/10/10/10/10: no shuffle, so no evening out; 39 head inputs per level.
    assert [ssh.out_channels for ssh in slim.ssh] == [39] * 3
    convs = slim.heads.convs if unified else [*slim.heads.class_convs, *slim.heads.box_convs,
                                               *slim.heads.landmark_convs]
    assert {conv.in_channels for conv in convs} == {39}
    assert_same_in_float64(slim, zeroed, odd)
    assert output_drift(forward_eval(start, odd), forward_eval(slim, odd)) > 0.1  # the check is not vacuous
    assert_spec_round_trip(slim, odd)


def test_ssh_slim_refuses_heads_shared_between_levels(model, example):
    shared = copy.deepcopy(model)
    shared.heads.class_convs[1] = shared.heads.class_convs[0]
    with pytest.raises(ValueError, match=r"^levels: the layers reading ssh\[0\] are shared with another level"):
        SSHSlim().check(shared, SSHSlimParams(width_ratio=0.5), ctx(example))
    SSHSlim().check(shared, SSHSlimParams(width_ratio=0.5, levels=[2]), ctx(example))  # level 2 reads its own


# --- passes that do not apply -----------------------------------------------------------------------

@pytest.mark.parametrize(("pass_cls", "reason"), [
    (BiFPNSlim, "the model has no BiFPN cells"),
    (CBAMPlus, "the model has no CBAM modules"),
    (SharedCBAM, "the model has no CBAM modules"),
    (UnifyHeads, None),
    (SSHSlim, None),
    (Prune, None),
])
def test_applies_to_retinaface(pass_cls, reason, model):
    assert pass_cls().applies_to(model) == reason


def test_every_built_in_pass_applies_to_featherface():
    featherface = featherface_baseline()
    for pass_cls in (BiFPNSlim, CBAMPlus, SharedCBAM, UnifyHeads, SSHSlim, Prune):
        assert pass_cls().applies_to(featherface) is None, pass_cls.name


def test_unify_heads_does_not_apply_to_unified_heads(model, example):
    unified = run_pass(UnifyHeads, model, example)
    assert UnifyHeads().applies_to(unified) == "heads is already UnifiedHeads (unify_heads was applied before)"


def _validate(tmp_path: Path, stages: str):
    recipe = tmp_path / "retinaface.yaml"
    recipe.write_text(f"model: {{family: retinaface}}\ninput_size: [72, 100]\nstages:\n{stages}")
    return recipe, CliRunner().invoke(cli, ["validate", str(recipe)], catch_exceptions=False)


def test_validate_a_retinaface_recipe(tmp_path):
    _, result = _validate(tmp_path, "  - pass: unify_heads\n"
                                    "  - pass: ssh_slim\n    params: {width_ratio: 0.5}\n"
                                    "  - pass: prune\n    params: {ratios: {fpn: 0.5}}\n")
    assert result.exit_code == 0, result.output
    assert "ok (retinaface, 3 stages: unify_heads, ssh_slim, prune)" in result.output


@pytest.mark.parametrize(("stage", "shown", "reason"), [
    ("bifpn_slim\n    params: {channels: 32}", "bifpn_slim", "the model has no BiFPN cells"),
    ("bifpn_slim\n    name: slim_neck", "slim_neck: bifpn_slim", "the model has no BiFPN cells"),
    ("cbam_plus", "cbam_plus", "the model has no CBAM modules"),
    ("shared_cbam", "shared_cbam", "the model has no CBAM modules"),
])
def test_validate_says_in_one_line_that_a_pass_does_not_apply(stage, shown, reason, tmp_path):
    recipe, result = _validate(tmp_path, f"  - pass: unify_heads\n  - pass: {stage}\n")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {recipe}: stages[1] ({shown}): does not apply to this model (family retinaface): {reason}"]
