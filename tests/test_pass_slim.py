"""bifpn_slim and ssh_slim: counts by hand, exactness where it is claimed, carried weights vs random ones."""

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
from compressor.accounting import count_parameters
from compressor.cli import cli
from compressor.passes import PassContext, PassResult
from compressor.plugins import load_registry
from compressor.validate import output_drift
from featherface.modules.bifpn import Projection, SeparableConvBN
from facedet.modules.deform import DeformableConv2d
from featherface.modules.shuffle import shuffle_permutation
from compressor_plugins import bifpn_slim, ssh_slim
from compressor_plugins.featherface_family import FAMILY
from facedet.spec import from_spec, to_spec

BASELINE_TOTAL = 592_371
BASELINE_BIFPN = 112_606
BASELINE_SSH = 232_965  # 3 x 77,655 (DCN)
BASELINE_SHUFFLE = 13_920  # 3 x 4,640
BASELINE_CBAM = 13_568


@pytest.fixture(scope="module")
def registry():
    return load_registry(["compressor_plugins.bifpn_slim", "compressor_plugins.ssh_slim"])


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return featherface.featherface_baseline().eval()


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return FAMILY.example_input(64, 64, batch_size=2, seed=0)


def run_pass(registry, name: str, model: nn.Module, example: torch.Tensor, **params) -> nn.Module:
    """What the runner does: validate params, check, apply to a copy."""
    pass_cls = registry.get_pass(name)
    instance, parsed = pass_cls(), pass_cls.Params(**params)
    ctx = PassContext(family=FAMILY, example_input=example)
    instance.check(model, parsed, ctx)
    result = instance.apply(copy.deepcopy(model), parsed, ctx)
    return (result.model if isinstance(result, PassResult) else result).eval()


def components(model: nn.Module) -> dict[str, int]:
    counted = count_parameters(model, FAMILY.component_of, FAMILY.components)
    assert sum(counted.components.values()) == counted.total
    return {**counted.components, "total": counted.total}


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor):
    return model.eval()(x)


# 64x64: (8*8 + 4*4 + 2*2) cells x 2 anchors = 168 priors.
OUTPUT_SHAPES = [(2, 168, 4), (2, 168, 2), (2, 168, 10)]


def assert_runs_and_round_trips(model: nn.Module, x: torch.Tensor) -> None:
    """The baseline's output shapes; rebuilt from its spec plus state_dict, identical outputs."""
    after = outputs(model, x)
    assert [tuple(o.shape) for o in after] == OUTPUT_SHAPES
    assert all(torch.isfinite(o).all() for o in after)
    rebuilt = from_spec(json.loads(json.dumps(to_spec(model))))
    rebuilt.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(after, outputs(rebuilt, x)))


# --- parameter counts, by hand -------------------------------------------------------------------

# BiFPN at width C with n cells (first cell has the 5 projections):
#   separable block: depthwise 9C + pointwise C*C + C + BN 2C;      four per cell
#   fusion weights: 2 + 2 + 3 + 3 = 10 per cell
#   projections: (64 + 128 + 256 + 128 + 256) * C weights + 5 * (C bias + 2C BN)
# C = 32: separable 288 + 1,056 + 64 = 1,408 -> cell 5,632 + 10 = 5,642
#         projections 832 * 32 + 15 * 32 = 27,104 -> first cell 32,746
# C = 64: separable 576 + 4,160 + 128 = 4,864 -> cell 19,466; projections 54,208 -> first 73,674
# bifpn_cbam at C = 32 keeps hidden 4: fc1 32*4 + 4, fc2 4*32 + 32, spatial 98 + 2 = 392 (was 680): -3 x 288
# SSH first convs (DCN) reading 32 instead of 64 channels, per SSH:
#   conv3x3:   offset 32*18*9, modulator 32*9*9, regular 32*32*9 fewer = 5,184 + 2,592 + 9,216 = 16,992
#   conv5x5_1: 5,184 + 2,592 + 32*16*9 = 4,608 -> 12,384;   per SSH 29,376, x3 = 88,128
BIFPN_CASES = [
    # params, bifpn, cbam, ssh, total
    ({"channels": 32}, 32_746 + 2 * 5_642, BASELINE_CBAM - 864, BASELINE_SSH - 88_128, 434_803),
    ({"cells": 2}, 73_674 + 19_466, BASELINE_CBAM, BASELINE_SSH, 572_905),
    ({"channels": 32, "cells": 2}, 32_746 + 5_642, BASELINE_CBAM - 864, BASELINE_SSH - 88_128, 429_161),
]


@pytest.mark.parametrize(("params", "bifpn", "cbam", "ssh", "total"), BIFPN_CASES)
def test_bifpn_slim_counts(registry, model, example, params, bifpn, cbam, ssh, total):
    assert components(model)["bifpn"] == BASELINE_BIFPN == 73_674 + 2 * 19_466
    slim = run_pass(registry, "bifpn_slim", model, example, **params)
    counted = components(slim)
    assert (counted["bifpn"], counted["cbam"], counted["ssh"], counted["total"]) == (bifpn, cbam, ssh, total)
    assert_runs_and_round_trips(slim, example)


def test_bifpn_slim_32_narrows_the_whole_group(registry, model, example):
    slim = run_pass(registry, "bifpn_slim", model, example, channels=32, cells=2)
    assert len(slim.bifpn) == 2 and all(cell.channels == 32 for cell in slim.bifpn)
    for cell in slim.bifpn:
        for name in bifpn_slim.SEPARABLES:
            depthwise = getattr(cell, name).depthwise
            assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 32  # still separable
    assert all(c.channel_gate.fc1.in_features == c.channel_gate.fc2.out_features == 32 for c in slim.bifpn_cbam)
    assert all(c.channel_gate.fc1.out_features == 4 for c in slim.bifpn_cbam)  # hidden width kept
    for ssh in slim.ssh:
        for name in bifpn_slim.SSH_INPUT_UNITS:
            conv = getattr(ssh, name).conv
            assert isinstance(conv, DeformableConv2d)
            assert conv.in_channels == conv.offset_conv.in_channels == conv.modulator_conv.in_channels == 32
    # Fusion weights are per-input scalars: untouched.
    assert torch.equal(slim.bifpn[1].p4_w2.weight, model.bifpn[2].p4_w2.weight)


def test_bifpn_slim_keeps_first_and_last_cells(registry, model, example):
    slim = run_pass(registry, "bifpn_slim", model, example, cells=2)
    assert torch.equal(slim.bifpn[0].conv3_up.pointwise.weight, model.bifpn[0].conv3_up.pointwise.weight)
    assert torch.equal(slim.bifpn[1].conv3_up.pointwise.weight, model.bifpn[2].conv3_up.pointwise.weight)
    assert bifpn_slim.kept_cells(5, 3) == [0, 3, 4] and bifpn_slim.kept_cells(3, 1) == [0]


# SSH with plain 3x3 convs at full width (64 in; 32 / 16 / 16 / 16 / 16):
#   conv3x3 64*32*9 + BN 64 = 18,496;  conv5x5_1 64*16*9 + 32 = 9,248;
#   conv5x5_2, conv7x7_2, conv7x7_3: 16*16*9 + 32 = 2,336 each -> 34,752 per SSH, x3 = 104,256
# width 0.5 (16 / 8 / 8 / 8 / 8): 64*16*9 + 32 = 9,248; 64*8*9 + 16 = 4,624; 3 x (8*8*9 + 16) = 1,776
#   -> 15,648 per SSH, x3 = 46,944; the shuffle's reduce conv reads 32 instead of 64 channels:
#   32*32 instead of 64*32 -> -1,024 per level: 13,920 - 3,072 = 10,848
# grouped, 2 groups, full width: 9,216 + 64; 4,608 + 32; 3 x (1,152 + 32) -> 17,472 per SSH, x3 = 52,416
# deformable, width 0.5: offset (18) and modulator (9) convs on the new input widths:
#   conv3x3 64*(18+9)*9 + 27 + 9,216 + 32 = 24,827; conv5x5_1 15,552 + 27 + 4,608 + 16 = 20,203;
#   3 x (8*27*9 + 27 + 576 + 16) = 3 x 2,563 = 7,689 -> 52,719 per SSH, x3 = 158,157
SSH_CASES = [
    # params, ssh, shuffle, total
    ({"conv": "plain"}, 104_256, BASELINE_SHUFFLE, BASELINE_TOTAL - BASELINE_SSH + 104_256),
    ({"conv": "plain", "width_ratio": 0.5}, 46_944, 10_848, 403_278),
    ({"conv": "grouped", "groups": 2}, 52_416, BASELINE_SHUFFLE, BASELINE_TOTAL - BASELINE_SSH + 52_416),
    ({"conv": "deformable", "width_ratio": 0.5}, 158_157, 10_848, 514_491),
]


@pytest.mark.parametrize(("params", "ssh", "shuffle", "total"), SSH_CASES)
def test_ssh_slim_counts(registry, model, example, params, ssh, shuffle, total):
    assert components(model)["ssh"] == BASELINE_SSH
    slim = run_pass(registry, "ssh_slim", model, example, **params)
    counted = components(slim)
    assert (counted["ssh"], counted["channel_shuffle"], counted["total"]) == (ssh, shuffle, total)
    assert_runs_and_round_trips(slim, example)


def test_ssh_slim_levels_touch_only_those(registry, model, example):
    slim = run_pass(registry, "ssh_slim", model, example, levels=[1])
    kinds = [ssh.spec_args()["deformable"] for ssh in slim.ssh]
    assert kinds == [True, False, True]
    assert slim.ssh[0] is not model.ssh[0] and torch.equal(
        slim.ssh[0].conv3x3.conv.regular_conv.weight, model.ssh[0].conv3x3.conv.regular_conv.weight)


# --- exactness where it is claimed ---------------------------------------------------------------

@pytest.mark.parametrize("fold_offsets", [True, False])
@pytest.mark.parametrize("conv", ["plain", "deformable"])
def test_dcn_with_zero_offsets_becomes_plain_losslessly(registry, model, example, conv, fold_offsets):
    # A fresh DCN has zero offset and modulator convs; make the rest of the SSH non-trivial.
    with torch.no_grad():
        for bn in (m for m in model.ssh.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    assert all(not m.offset_conv.weight.any() for m in model.modules() if isinstance(m, DeformableConv2d))
    slim = run_pass(registry, "ssh_slim", model, example, conv=conv, fold_offsets=fold_offsets)
    for before, after in zip(outputs(model, example), outputs(slim, example)):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    if conv == "plain":
        assert not any(isinstance(m, DeformableConv2d) for m in slim.ssh.modules())


def test_folded_kernel_equals_a_dcn_with_fixed_inward_offsets():
    torch.manual_seed(1)
    dcn = DeformableConv2d(6, 5)
    with torch.no_grad():
        # Constant offsets (biases only) that keep every sample inside the 3x3 window:
        # the folded plain kernel must then be the same operator.
        inward = torch.tensor([[(1 - i) * 0.6, (1 - j) * 0.3] for i in range(3) for j in range(3)])
        dcn.offset_conv.bias.copy_(inward.flatten())
        dcn.modulator_conv.bias.uniform_(-1, 1)
    plain = nn.Conv2d(6, 5, 3, padding=1, bias=False)
    with torch.no_grad():
        plain.weight.copy_(ssh_slim.folded_dcn_weight(dcn))
        x = torch.randn(2, 6, 9, 11)
        torch.testing.assert_close(plain(x), dcn(x), atol=1e-5, rtol=1e-5)


def _images(count: int, seed: int) -> torch.Tensor:
    return FAMILY.example_input(64, 64, batch_size=count, seed=seed)


def run_refit(registry, model: nn.Module, example: torch.Tensor, fit_images: int):
    """ssh_slim to plain convs, refitted on images of another seed than ``example``; the model and the record."""
    pass_cls = registry.get_pass("ssh_slim")
    parsed = pass_cls.Params(conv="plain", fit_images=fit_images)
    ctx = PassContext(family=FAMILY, example_input=example, sample_inputs=lambda count: _images(count, seed=7))
    result = pass_cls().apply(copy.deepcopy(model), parsed, ctx)
    return result.model.eval(), result.record


def test_refit_of_a_dcn_with_zero_offsets_is_lossless(registry, model, example):
    # A DCN with zero offset/modulator convs is a plain conv: the least-squares kernel is that conv's.
    slim, record = run_refit(registry, model, example, fit_images=2)
    for before, after in zip(outputs(model, example), outputs(slim, example)):
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    errors = [e for level in record["levels"] for e in level["fit_relative_error"].values()]
    assert len(errors) == 15 and all(e["fitted"] < 1e-6 and e["start"] < 1e-6 for e in errors)


def test_refit_reproduces_input_dependent_sampling_better_than_folding(registry, model, example):
    # Offsets that depend on the input cannot be folded into a kernel; the refit keeps more of them,
    # also on images it was not fitted on (``example`` has another seed).
    torch.manual_seed(3)
    with torch.no_grad():
        for dcn in (m for m in model.modules() if isinstance(m, DeformableConv2d)):
            dcn.offset_conv.weight.uniform_(-0.05, 0.05)
            dcn.offset_conv.bias.uniform_(-0.5, 0.5)
            dcn.modulator_conv.weight.uniform_(-0.05, 0.05)
    folded = run_pass(registry, "ssh_slim", model, example, conv="plain")
    fitted, record = run_refit(registry, model, example, fit_images=4)
    errors = [e for level in record["levels"] for e in level["fit_relative_error"].values()]
    assert all(e["fitted"] < e["start"] for e in errors), errors
    reference = outputs(model, example)

    def error(slim: nn.Module) -> float:
        return sum(float(((a - b) ** 2).mean()) for a, b in zip(reference, outputs(slim, example)))

    assert error(fitted) < error(folded)


def test_bifpn_refit_brings_the_ssh_inputs_back(registry, model, example):
    # On the plain-conv model v2 slims: the refitted SSH input convs reproduce their old outputs better.
    plain = run_pass(registry, "ssh_slim", model, example, conv="plain")
    pass_cls = registry.get_pass("bifpn_slim")
    ctx = PassContext(family=FAMILY, example_input=example, sample_inputs=lambda count: _images(count, seed=7))
    sliced = run_pass(registry, "bifpn_slim", plain, example, channels=32, cells=2)
    result = pass_cls().apply(copy.deepcopy(plain), pass_cls.Params(channels=32, cells=2, fit_images=4), ctx)
    errors = result.record["fit_relative_error"]
    assert sorted(errors) == [f"ssh.{level}.{unit}" for level in range(3) for unit in ("conv3x3", "conv5x5_1")]
    assert all(e["fitted"] < e["start"] for e in errors.values()), errors
    assert components(result.model) == components(sliced)
    reference = outputs(plain, example)

    def error(slim: nn.Module) -> float:
        return sum(float(((a - b) ** 2).mean()) for a, b in zip(reference, outputs(slim, example)))

    assert error(result.model.eval()) < error(sliced)


def test_ssh_narrowing_refit_refits_the_later_convs_and_the_reader(registry, model, example):
    plain = run_pass(registry, "ssh_slim", model, example, conv="plain")
    pass_cls = registry.get_pass("ssh_slim")
    ctx = PassContext(family=FAMILY, example_input=example, sample_inputs=lambda count: _images(count, seed=7))
    sliced = run_pass(registry, "ssh_slim", plain, example, conv="plain", width_ratio=0.5)
    result = pass_cls().apply(copy.deepcopy(plain), pass_cls.Params(conv="plain", width_ratio=0.5, fit_images=4), ctx)
    for level, entry in enumerate(result.record["levels"]):
        errors = entry["fit_relative_error"]
        assert sorted(errors) == sorted([*ssh_slim.UNITS, f"shuffle.{level}.reduce"])
        # The first convs lose only channels, which slicing keeps exactly; the rest gain from the refit.
        assert all(errors[unit]["start"] < 1e-9 for unit in ("conv3x3", "conv5x5_1")), errors
        assert all(e["fitted"] < e["start"] for unit, e in errors.items() if unit not in ("conv3x3", "conv5x5_1"))
    assert components(result.model) == components(sliced)
    reference = outputs(plain, example)

    def error(slim: nn.Module) -> float:
        return sum(float(((a - b) ** 2).mean()) for a, b in zip(reference, outputs(slim, example)))

    assert error(result.model.eval()) < error(sliced)


@pytest.mark.parametrize("name", ["ssh_slim", "bifpn_slim"])
def test_refit_needs_images(registry, model, example, name):
    pass_cls = registry.get_pass(name)
    with pytest.raises(ValueError, match="^fit_images:"):
        pass_cls().apply(copy.deepcopy(model), pass_cls.Params(fit_images=2),
                         PassContext(family=FAMILY, example_input=example))


def test_grouped_weight_is_the_diagonal_blocks():
    dense = torch.arange(4 * 6 * 1 * 1, dtype=torch.float32).view(4, 6, 1, 1)
    grouped = ssh_slim.grouped_weight(dense, 2)
    assert torch.equal(grouped[:2], dense[:2, :3]) and torch.equal(grouped[2:], dense[2:, 3:])
    conv = nn.Conv2d(6, 4, 1, groups=2, bias=False)
    conv.weight.data.copy_(grouped)
    assert torch.equal(ssh_slim.grouped_weight(ssh_slim.dense_weight(conv), 2), grouped)  # dense is exact


def test_shuffle_columns_follow_the_blocks_own_shuffle():
    # Two groups: channel c lands at (c % 2) * (C / 2) + c // 2.
    order = shuffle_permutation(8, 2)
    assert [int(torch.nonzero(order == c)) for c in range(8)] == [(c % 2) * 4 + c // 2 for c in range(8)]
    kept = torch.tensor([0, 3, 4, 5])  # new order after the shuffle: kept[0], kept[2], kept[1], kept[3]
    assert ssh_slim.shuffle_columns(kept, 8, 2).tolist() == [0, 2, 5, 6]


def _zero_dropped(module: nn.Module, keep: torch.Tensor):
    def hook(_module, _inputs, output):
        mask = torch.zeros(output.shape[1], dtype=torch.bool)
        mask[keep] = True
        return output * mask.view(1, -1, 1, 1).to(output.dtype)
    return module.register_forward_hook(hook)


def test_narrow_ssh_equals_the_original_with_dropped_channels_zeroed(registry, model, example):
    # Trained-looking DCNs (non-zero offsets) kept as DCNs: the only change is the dropped channels.
    with torch.no_grad():
        for dcn in (m for m in model.modules() if isinstance(m, DeformableConv2d)):
            dcn.offset_conv.bias.uniform_(-1, 1)
            dcn.modulator_conv.bias.uniform_(-1, 1)
    slim = run_pass(registry, "ssh_slim", model, example, conv="deformable", width_ratio=0.6)
    handles = []
    for ssh, shuffle in zip(model.ssh, model.shuffle):
        widths = ssh_slim.new_widths(ssh, 0.6, shuffle.groups, 0)
        assert widths.out_channels % 2 == 0
        for unit, keep in ssh_slim.kept_channels(ssh, widths).items():
            handles.append(_zero_dropped(getattr(ssh, unit), keep))
    try:
        reference = outputs(model, example)
    finally:
        for handle in handles:
            handle.remove()
    for want, got in zip(reference, outputs(slim, example)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert slim.shuffle[0].reduce.in_channels == slim.ssh[0].out_channels == 18 + 10 + 10  # 19/10/10 from 32/16/16 x 0.6, made even


def test_narrow_bifpn_equals_the_original_with_dropped_channels_zeroed(model, example):
    # Up to the BiFPN outputs (the CBAM's spatial gate pools over channels, so it differs by design).
    keep = bifpn_slim.top_k(bifpn_slim.group_importance(model, "l1"), 24)
    slim = copy.deepcopy(model)
    bifpn_slim.slice_group(slim, keep)
    handles = [_zero_dropped(module, keep) for module in model.bifpn.modules()
               if isinstance(module, (Projection, SeparableConvBN))]
    with torch.no_grad():
        features = [torch.relu(a(f) + f) for a, f in zip(model.backbone_cbam, model.backbone(example))]
        narrow, full = features, features
        for cell in slim.bifpn:
            narrow = cell(narrow)
        try:
            for cell in model.bifpn:
                full = cell(full)
        finally:
            for handle in handles:
                handle.remove()
    for want, got in zip(full, narrow):
        torch.testing.assert_close(got, want[:, keep], atol=1e-5, rtol=1e-5)


# --- carried weights vs random ones ---------------------------------------------------------------

def reinitialised(model: nn.Module, prefixes: tuple[str, ...], seed: int = 0) -> nn.Module:
    """The same structure with the parameters and BN statistics under ``prefixes`` freshly initialised."""
    torch.manual_seed(seed)
    fresh = from_spec(to_spec(model)).state_dict()
    state = {k: fresh[k] if k.startswith(prefixes) else v for k, v in model.state_dict().items()}
    rebuilt = from_spec(to_spec(model))
    rebuilt.load_state_dict(state)
    return rebuilt.eval()


SSH_FIRST = tuple(f"ssh.{i}.{unit}." for i in range(3) for unit in bifpn_slim.SSH_INPUT_UNITS)
GATES = tuple(f"bifpn_cbam.{i}.channel_gate." for i in range(3))
REDUCE = tuple(f"shuffle.{i}.reduce." for i in range(3))

# On the reference (seeded random weights: no redundancy to exploit, every channel
# matters), measured drift (max |diff| of all outputs, 64x64 example), pass vs re-init:
#   ssh_slim plain 5.15 vs 8.80 (7.84 with fold_offsets=false); plain width 0.5 7.13 vs 8.64;
#   bifpn_slim channels 56 6.60 vs 8.14; channels 32 7.97 vs 8.13 (barely: half the channels of a
#   random BiFPN carry half its signal); cells 2 8.11 vs 8.01 (dropping a random cell is as bad as
#   a random BiFPN), so cells are not held to it here.
DRIFT_CASES = [
    ("ssh_slim", {"conv": "plain"}, ("ssh.",)),
    ("ssh_slim", {"conv": "plain", "width_ratio": 0.5}, ("ssh.", *REDUCE)),
    ("bifpn_slim", {"channels": 56}, ("bifpn.", *GATES, *SSH_FIRST)),
]


@pytest.mark.parametrize(("name", "params", "reinit"), DRIFT_CASES)
def test_carried_weights_drift_less_than_random_ones(registry, reference_dir: Path, example, name, params, reinit):
    reference = featherface.load_original_checkpoint(torch.load(reference_dir / "featherface_baseline_seed0.pt", weights_only=True)).eval()
    before = outputs(reference, example)
    slim = run_pass(registry, name, reference, example, **params)
    carried = output_drift(before, outputs(slim, example))
    random_drifts = [output_drift(before, outputs(reinitialised(slim, reinit, seed), example)) for seed in range(2)]
    assert carried < min(random_drifts), (carried, random_drifts)


# --- params that cannot apply ---------------------------------------------------------------------

BAD_PARAMS = [
    ("bifpn_slim", {"channels": 65}, "channels"),
    ("bifpn_slim", {"cells": 4}, "cells"),
    ("ssh_slim", {"width_ratio": 0.02}, "width_ratio"),  # 16 x 0.02 rounds to 0 channels
    ("ssh_slim", {"levels": [3]}, "levels"),
    ("ssh_slim", {"conv": "grouped", "groups": 3}, "groups"),  # 3 divides neither 64 nor 32
    ("ssh_slim", {"conv": "grouped", "groups": 16, "width_ratio": 0.5}, "groups"),  # 8-wide convs
]


@pytest.mark.parametrize(("name", "params", "field"), BAD_PARAMS)
def test_bad_params_name_the_param_before_touching_weights(registry, model, example, name, params, field):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pass_cls = registry.get_pass(name)
    with pytest.raises(ValueError, match=rf"^{field}:"):
        pass_cls().check(model, pass_cls.Params(**params), PassContext(family=FAMILY, example_input=example))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# Refused by the params alone (recipe validation, before any model is loaded): (pass, params, error location).
MODEL_FREE_BAD_PARAMS = [
    ("bifpn_slim", {"channels": 0}, "channels"),
    ("bifpn_slim", {"cells": 0}, "cells"),
    ("ssh_slim", {"width_ratio": 0.0}, "width_ratio"),
    ("ssh_slim", {"width_ratio": 1.5}, "width_ratio"),
    ("ssh_slim", {"levels": [-1]}, "levels.0"),
    ("ssh_slim", {"levels": []}, "levels"),
    ("ssh_slim", {"conv": "grouped", "groups": 1}, "groups"),
    ("ssh_slim", {"conv": "plain", "groups": 2}, "groups"),
    ("ssh_slim", {"fit_images": -1}, "fit_images"),
]


@pytest.mark.parametrize(("name", "params", "field"), MODEL_FREE_BAD_PARAMS)
def test_bad_params_are_refused_without_a_model(registry, name, params, field):
    with pytest.raises(pydantic.ValidationError) as caught:
        registry.get_pass(name).Params.model_validate(params)
    (error,) = caught.value.errors()
    where = ".".join(str(part) for part in error["loc"])
    # A field's own bound is located at the field; a check across fields names it first in its message.
    assert where == field or (not where and error["msg"].startswith(f"Value error, {field}:")), error


def test_records_say_what_changed(registry, model, example):
    ctx = PassContext(family=FAMILY, example_input=example)
    result = registry.get_pass("bifpn_slim")().apply(copy.deepcopy(model), bifpn_slim.BiFPNSlimParams(
        channels=32, cells=2), ctx)
    assert isinstance(result, PassResult)
    assert result.record == {"before": {"channels": 64, "cells": 3}, "after": {"channels": 32, "cells": 2}}
    result = registry.get_pass("ssh_slim")().apply(copy.deepcopy(model), ssh_slim.SSHSlimParams(
        width_ratio=0.5, levels=[1]), ctx)
    (level,) = json.loads(json.dumps(result.record))["levels"]
    assert level == {"level": 1, "conv": "plain", "groups": 1,
                     "before": {"out3x3": 32, "mid5x5": 16, "out5x5": 16, "mid7x7": 16, "out7x7": 16},
                     "after": {"out3x3": 16, "mid5x5": 8, "out5x5": 8, "mid7x7": 8, "out7x7": 8}}


def test_unknown_params_are_refused(registry):
    with pytest.raises(ValueError, match="width"):
        registry.get_pass("bifpn_slim").Params(width=32)


def test_grouped_ssh_cannot_be_narrowed_from_the_bifpn(registry, model, example):
    grouped = run_pass(registry, "ssh_slim", model, example, conv="grouped", groups=2)
    with pytest.raises(ValueError, match="^channels:.*grouped"):
        run_pass(registry, "bifpn_slim", grouped, example, channels=32)


# --- the whole engine --------------------------------------------------------------------------------

def test_compress_run_with_both_passes(tmp_path, registry):
    assert registry.get_pass("bifpn_slim").summary() and registry.get_pass("ssh_slim").summary()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {family: featherface}\n"
        "plugins: [compressor_plugins.bifpn_slim, compressor_plugins.ssh_slim]\ninput_size: 64\nseed: 1\nstages:\n"
        "  - pass: bifpn_slim\n    params: {channels: 32, cells: 2}\n"
        "  - pass: ssh_slim\n    params: {conv: plain, width_ratio: 0.5}\n"
    )
    out = tmp_path / "run"
    # --no-finetune also skips the accuracy evaluation: this test is about the counts.
    result = CliRunner().invoke(cli, ["run", "--quiet", "--no-finetune", str(recipe), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["ok", "ok"]
    # bifpn 38,388; cbam 12,704; ssh at 32 inputs, plain, width 0.5:
    #   (32*16*9 + 32) + (32*8*9 + 16) + 1,776 = 4,640 + 2,320 + 1,776 = 8,736 per SSH -> 26,208
    assert report["stages"][1]["params"]["components"]["ssh"] == 26_208
    assert report["final"]["params"]["total"] == 213_072 + 12_704 + 38_388 + 26_208 + 10_848 + 6_240
