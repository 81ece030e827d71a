"""The prune pass: every component on its own, the DCN pruner, the shuffle, until, reload, drift, bad params."""

from __future__ import annotations

import copy
import json

import pydantic
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from click.testing import CliRunner
from torch import nn

import featherface
from compressor import load_model
from compressor.accounting import count_parameters, unique_parameters
from compressor.checkpoint import save_checkpoint
from compressor.cli import cli
from compressor.passes import PassContext, PassResult
from compressor.plugins import load_registry
from compressor.validate import output_drift
from facedet.modules import SSH, DeformableConv2d
from featherface.modules import ChannelShuffleBlock
from featherface.modules.bifpn import FusionWeights
from featherface.modules.shuffle import channel_shuffle, shuffle_permutation
from compressor_plugins.featherface_family import FAMILY
from compressor_plugins.featherface_pruning import DEFORMABLE_PRUNER, shuffles_folded
from compressor_plugins.prune import Prune, dependency_graph, prunable_components, prune_model
from compressor_plugins.prune import PruneParams as Params
from facedet.spec import from_spec, to_spec

HEAD_OUT = {"class_convs": 4, "box_convs": 8, "landmark_convs": 20}


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


@pytest.fixture(scope="module")
def baseline() -> nn.Module:
    return _alive(featherface.featherface_baseline())


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return FAMILY.example_input(64, 64)


def _ctx(example: torch.Tensor) -> PassContext:
    return PassContext(family=FAMILY, example_input=example)


def _outputs(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model.eval()(x)


def _zeroed(model: nn.Module, record) -> nn.Module:
    """A copy of ``model`` whose pruned channels are zero right where they are made (BN / Linear outputs)."""
    copy_ = copy.deepcopy(model)
    modules = dict(copy_.named_modules())
    with torch.no_grad():
        for group in record:
            for name, kind, idxs in group.layers:
                layer = modules[name]
                if kind == "out" and isinstance(layer, (nn.BatchNorm2d, nn.Linear)):
                    layer.weight[idxs] = 0
                    layer.bias[idxs] = 0
    return copy_


def _assert_same_outputs(a, b, tol: float = 1e-4) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _fusion_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, FusionWeights)}


# Removing a channel == zeroing it where it is made, as long as no op downstream
# reduces over the channel dimension.  CBAM's spatial gate does (max and mean over
# channels), so that holds exactly for the groups after the last CBAM (ssh,
# channel_shuffle) and for the CBAM MLP's hidden units, not for backbone/bifpn widths.
EXACT = {"ssh", "channel_shuffle", "cbam"}


@pytest.mark.parametrize("component", ["backbone", "cbam", "bifpn", "ssh", "channel_shuffle"])
def test_prune_one_component(component, baseline, example):
    model = copy.deepcopy(baseline)
    params = Params(ratios={component: 0.25})
    Prune().check(model, params, _ctx(example))
    record = prune_model(model, params, _ctx(example))
    assert record and all(group.component == component for group in record)

    before = count_parameters(baseline, FAMILY.component_of, FAMILY.components)
    after = count_parameters(model, FAMILY.component_of, FAMILY.components)
    assert after.total == sum(p.numel() for _, p in unique_parameters(model)) == sum(after.components.values())
    assert after.components[component] < before.components[component]
    assert after.components["other"] == 0

    # The contract, the fusion weights and the heads' output widths hold.
    original, pruned = _outputs(baseline, example), _outputs(model, example)
    assert [o.shape for o in pruned] == [o.shape for o in original]
    fused_before, fused_after = _fusion_weights(baseline), _fusion_weights(model)
    assert fused_before.keys() == fused_after.keys()
    assert all(torch.equal(fused_before[k], fused_after[k]) for k in fused_before)
    for attr, width in HEAD_OUT.items():
        assert [conv.out_channels for conv in getattr(model.heads, attr)] == [width] * 3

    # The spec describes the pruned model: it rebuilds it and reproduces its outputs exactly.
    rebuilt = from_spec(to_spec(model))
    rebuilt.load_state_dict(model.state_dict())
    for a, b in zip(_outputs(rebuilt, example), pruned):
        assert torch.equal(a, b)

    if component in EXACT:
        # In float64: the identity is exact, but float32 rounding differs between a
        # narrower layer and a zeroed one, and the network amplifies it to ~1e-3.
        zeroed = copy.deepcopy(_zeroed(baseline, record)).double()
        _assert_same_outputs(_outputs(copy.deepcopy(model).double(), example.double()),
                             _outputs(zeroed, example.double()))
        assert output_drift(original, pruned) > 1.0  # the check above is not vacuous


def test_widths_after_pruning_each_component_by_a_quarter(baseline, example):
    spec = {}
    for component in ("backbone", "bifpn", "ssh", "channel_shuffle", "cbam"):
        model = copy.deepcopy(baseline)
        prune_model(model, Params(ratios={component: 0.25}), _ctx(example))
        spec[component] = to_spec(model)["args"]
    assert spec["backbone"]["backbone"]["args"]["widths"] == [[6, 12, 24, 24, 48, 48], [96] * 6, [192, 192]]
    assert {cell["args"]["channels"] for cell in spec["bifpn"]["bifpn"]} == {48}
    assert spec["bifpn"]["heads"]["args"]["in_channels"] == [64] * 3
    ssh = spec["ssh"]["ssh"][0]["args"]
    assert (ssh["in_channels"], ssh["out3x3"], ssh["mid5x5"], ssh["out5x5"], ssh["mid7x7"], ssh["out7x7"]) == (
        64, 24, 12, 12, 12, 12)
    assert spec["ssh"]["shuffle"][0]["args"]["in_channels"] == 48
    shuffle = spec["channel_shuffle"]["shuffle"][0]["args"]
    assert (shuffle["in_channels"], shuffle["mid_channels"], shuffle["out_channels"]) == (64, 24, 48)
    assert spec["channel_shuffle"]["heads"]["args"]["in_channels"] == [48] * 3
    cbams = spec["cbam"]["backbone_cbam"] + spec["cbam"]["bifpn_cbam"]
    hidden = [c["args"]["channel_gate"]["args"]["hidden"] for c in cbams]
    assert hidden == [3, 6, 12, 3, 3, 3]


def test_shuffle_is_mapped_through_its_permutation(baseline, example):
    """Channels feeding the shuffle are removed from the right columns of ``reduce``.

    Pruning SSH's outputs (which the shuffle permutes before the 1x1 ``reduce``)
    must equal the original model with those channels zeroed; torch-pruning on
    its own maps the shuffle as the identity and removes the wrong columns.
    """
    model = copy.deepcopy(baseline)
    record = prune_model(model, Params(ratios={"ssh": 0.25}), _ctx(example))
    feeding = [g for g in record if any(name.endswith("reduce") and kind == "in" for name, kind, _ in g.layers)]
    assert len(feeding) == 9  # three branches per level
    assert all(len(g.removed) % 2 == 0 for g in feeding)  # widths stay divisible by the 2 shuffle groups
    _assert_same_outputs(_outputs(model, example), _outputs(_zeroed(baseline, record), example))

    # The same by hand on one block, removing odd and even channels alike.
    class Feed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 64, 1, bias=False)
            self.bn = nn.BatchNorm2d(64)
            self.block = ChannelShuffleBlock(64, 32, 64)

        def forward(self, x):
            return self.block(F.relu(self.bn(self.conv(x))))

    x = torch.randn(2, 8, 8, 8)
    original = _alive_tiny(Feed(), x)
    removed = [0, 3, 10, 11, 40, 63]
    zeroed = copy.deepcopy(original)
    with torch.no_grad():
        zeroed.bn.weight[removed] = 0
        zeroed.bn.bias[removed] = 0
    expected = _outputs(zeroed, x)

    model = copy.deepcopy(original)
    with shuffles_folded(model):
        graph = dependency_graph(model, x)
        graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, removed).prune()
    assert model.block.reduce.in_channels == 58 and model.block.groups == 2
    _assert_same_outputs([_outputs(model, x)], [expected], tol=1e-5)

    # torch-pruning alone maps reshape -> transpose -> reshape as the identity: wrong columns go.
    naive = copy.deepcopy(original)
    graph = dependency_graph(naive, x)
    graph.get_pruning_group(naive.conv, tp.prune_conv_out_channels, removed).prune()
    assert not torch.allclose(_outputs(naive, x), expected, atol=1e-3)

    perm = shuffle_permutation(8, 2)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_deformable_conv_pruner_on_a_lone_ssh():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            self.ssh = SSH(16, out3x3=8, mid5x5=8, out5x5=8, mid7x7=8, out7x7=8)

        def forward(self, x):
            return self.ssh(F.relu(self.bn(self.stem(x))))

    x = torch.randn(2, 3, 16, 16)
    original = _alive_tiny(Tiny(), x)
    reference = _outputs(original, x)

    # In channels: remove stem channels -> the DCNs lose the same input columns of all three convs.
    removed = [1, 4, 9]
    keep = [i for i in range(16) if i not in removed]
    model = copy.deepcopy(original)
    graph = dependency_graph(model, x, FAMILY.pruning_hints(model))
    graph.get_pruning_group(model.stem, tp.prune_conv_out_channels, removed).prune()
    for name in ("conv3x3", "conv5x5_1"):
        pruned, before = getattr(model.ssh, name).conv, getattr(original.ssh, name).conv
        assert (pruned.offset_conv.out_channels, pruned.modulator_conv.out_channels) == (18, 9)
        for conv in ("offset_conv", "modulator_conv", "regular_conv"):
            assert torch.equal(getattr(pruned, conv).weight, getattr(before, conv).weight[:, keep])
            assert getattr(pruned, conv).in_channels == 13
    zeroed = copy.deepcopy(original)
    with torch.no_grad():
        zeroed.bn.weight[removed] = 0
        zeroed.bn.bias[removed] = 0
    _assert_same_outputs([_outputs(model, x)], [_outputs(zeroed, x)], tol=1e-5)

    # Out channels: remove rows of the 3x3 branch's regular conv -> those output channels go, the rest stay.
    model = copy.deepcopy(original)
    graph = dependency_graph(model, x, FAMILY.pruning_hints(model))
    graph.get_pruning_group(model.ssh.conv3x3.conv, DEFORMABLE_PRUNER.prune_out_channels, [0, 5]).prune()
    conv = model.ssh.conv3x3.conv
    widths = (conv.regular_conv.out_channels, conv.offset_conv.out_channels, conv.modulator_conv.out_channels)
    assert widths == (6, 18, 9)
    kept_out = [i for i in range(24) if i not in (0, 5)]
    _assert_same_outputs([_outputs(model, x)], [reference[:, kept_out]], tol=1e-5)

    # A shared middle width: conv5x5_1's outputs feed two DCNs (conv5x5_2 and conv7x7_2).
    graph.get_pruning_group(model.ssh.conv5x5_1.conv, DEFORMABLE_PRUNER.prune_out_channels, [2, 7]).prune()
    assert model.ssh.conv5x5_2.conv.in_channels == model.ssh.conv7x7_2.conv.in_channels == 6
    zeroed = copy.deepcopy(original)
    with torch.no_grad():
        zeroed.ssh.conv5x5_1.bn.weight[[2, 7]] = 0
        zeroed.ssh.conv5x5_1.bn.bias[[2, 7]] = 0
    _assert_same_outputs([_outputs(model, x)], [_outputs(zeroed, x)[:, kept_out]], tol=1e-5)

    rebuilt = from_spec(to_spec(model.ssh))
    rebuilt.load_state_dict(model.ssh.state_dict())
    assert to_spec(rebuilt)["args"]["mid5x5"] == 6


def _alive_tiny(model: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.momentum = 1.0
            if isinstance(m, DeformableConv2d):
                m.offset_conv.weight.normal_(0, 0.05)
                m.modulator_conv.weight.normal_(0, 0.05)
        model.train()
        model(x)
    return model.eval()


def test_ignored_layers_and_round_to(baseline, example):
    model = copy.deepcopy(baseline)
    params = Params(ratio=0.25, ignored_layers=["backbone.stage1.0", "bifpn.0.conv4_up"], round_to=4)
    prune_model(model, params, _ctx(example))
    args = to_spec(model)["args"]
    widths = args["backbone"]["args"]["widths"]
    assert widths[0][0] == 8 and widths[2] == [192, 192]
    # One ignored BiFPN layer holds every BiFPN width: a cell has a single width.
    assert {cell["args"]["channels"] for cell in args["bifpn"]} == {64}
    hidden = [c["args"]["channel_gate"]["args"]["hidden"] for c in args["backbone_cbam"]]
    assert hidden == [4, 4, 12]  # keep 3, 6, 12 rounded down to multiples of 4; 4 -> 0 is no step, it stays
    for c in args["ssh"]:
        assert all(c["args"][k] % 4 == 0 for k in ("out3x3", "mid5x5", "out5x5", "mid7x7", "out7x7"))


def test_shared_gates_and_grouped_convs(baseline, example):
    """Gates shared across levels (one spatial gate for all six CBAMs, one channel gate for
    the BiFPN's three) and a grouped-conv SSH, as other passes leave them."""
    model = copy.deepcopy(baseline)
    spatial = model.backbone_cbam[0].spatial_gate
    channel = model.bifpn_cbam[0].channel_gate
    for attention in [*model.backbone_cbam, *model.bifpn_cbam]:
        attention.spatial_gate = spatial
    for attention in model.bifpn_cbam:
        attention.channel_gate = channel
    model.ssh[2] = SSH(64, deformable=False, groups=4).eval()
    prune_model(model, Params(ratio=0.25), _ctx(example))

    args = to_spec(model)["args"]
    assert all(cbam["args"]["spatial_gate"] == {"ref": "backbone_cbam.0.spatial_gate"} for cbam in args["bifpn_cbam"])
    assert model.bifpn_cbam[2].channel_gate is model.bifpn_cbam[0].channel_gate
    assert args["bifpn_cbam"][0]["args"]["channel_gate"]["args"]["hidden"] == 3
    # The grouped SSH's input is the BiFPN width: neither is pruned, nor the grouped convs.
    assert {cell["args"]["channels"] for cell in args["bifpn"]} == {64}
    assert args["ssh"][2]["args"]["out3x3"] == 32 and args["ssh"][0]["args"]["out3x3"] == 24
    assert args["backbone"]["args"]["widths"][2] == [192, 192]
    rebuilt = from_spec(to_spec(model))
    rebuilt.load_state_dict(model.state_dict())
    for a, b in zip(_outputs(rebuilt, example), _outputs(model, example)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("importance", ["bn_scale", "taylor"])
def test_other_importances(importance, baseline, example):
    model = copy.deepcopy(baseline)
    prune_model(model, Params(ratios={"ssh": 0.25, "channel_shuffle": 0.25}, importance=importance), _ctx(example))
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert [o.shape for o in _outputs(model, example)] == [o.shape for o in _outputs(baseline, example)]


def test_pruned_checkpoint_reloads_exactly(baseline, example, tmp_path):
    model = copy.deepcopy(baseline)
    prune_model(model, Params(ratio=0.25), _ctx(example))
    save_checkpoint(tmp_path / "pruned.pt", model, FAMILY)
    loaded = load_model(tmp_path / "pruned.pt")
    for a, b in zip(_outputs(loaded, example), _outputs(model, example)):
        assert torch.equal(a, b)


def test_until_reaches_a_parameter_budget_in_steps(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {family: featherface}\n"
        "plugins: [compressor_plugins.prune]\ninput_size: 64\nseed: 3\nstages:\n"
        "  - pass: prune\n    params: {ratio: 0.1}\n    until: {total: 450000, max_repeats: 20}\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--quiet", "--no-finetune", str(recipe), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    (stage,) = report["stages"]
    assert stage["status"] == "ok" and stage["repeats"] >= 2
    assert stage["params"]["total"] <= 450_000
    assert report["final"]["params"]["total"] == stage["params"]["total"]

    final = load_model(out)
    assert sum(p.numel() for _, p in unique_parameters(final)) == stage["params"]["total"]
    stage_model = load_model(out / "checkpoints" / "stage-01-prune.pt")
    x = FAMILY.example_input(64, 64)
    for a, b in zip(_outputs(final, x), _outputs(stage_model, x)):
        assert torch.equal(a, b)
    assert [tuple(o.shape) for o in _outputs(final, x)] == [(2, 168, 4), (2, 168, 2), (2, 168, 10)]


def _mean_drift(before, after) -> float:
    return sum(float((a - b).abs().mean()) for a, b in zip(before, after)) / len(before)


@pytest.mark.parametrize(
    "ratios, margin",
    [
        # One-shot pruning of the trained detector without finetuning: backbone and
        # BiFPN channels are all load-bearing (a 10% step everywhere costs nearly the
        # outputs' whole scale), so the carried weights only just beat a re-init there.
        ({"backbone": 0.1, "cbam": 0.1, "bifpn": 0.1, "ssh": 0.1, "channel_shuffle": 0.1}, 1.0),
        ({"ssh": 0.25, "channel_shuffle": 0.25}, 0.75),
        ({"cbam": 0.25}, 0.3),
    ],
)
def test_carried_weights_drift_less_than_a_reinitialised_copy(ratios, margin, reference_dir, example):
    trained = featherface.load_original_checkpoint(torch.load(reference_dir / "featherface_baseline_seed0.pt", weights_only=True))
    model = copy.deepcopy(trained)
    prune_model(model, Params(ratios=ratios), _ctx(example))
    torch.manual_seed(0)
    fresh = from_spec(to_spec(model)).eval()
    reference = _outputs(trained, example)
    carried = _mean_drift(reference, _outputs(model, example))
    reinitialised = _mean_drift(reference, _outputs(fresh, example))
    assert 0 < carried < margin * reinitialised, (carried, reinitialised)


@pytest.mark.parametrize(
    "params, named",
    [
        ({"ratios": {"neck": 0.2}}, "ratios"),
        ({"ratios": {"heads": 0.2}}, "ratios"),
        ({"ratio": 0.1, "ignored_layers": ["backbone.stage9"]}, "ignored_layers"),
    ],
)
def test_bad_params_are_refused_by_check(params, named, baseline, example):
    registry = load_registry(["compressor_plugins.prune"])
    pass_cls = registry.get_pass("prune")
    model = copy.deepcopy(baseline)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^{named}\b"):
        pass_cls().check(model, pass_cls.Params(**params), _ctx(example))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "params, named",
    [
        ({"ratios": {"ssh": 1.0}}, "ratios.ssh"),
        ({"ratios": {"backbone": 1.5}}, "ratios.backbone"),
        ({"ratios": {"ssh": -0.1}}, "ratios.ssh"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({}, "ratio"),
        ({"ratio": 0.1, "round_to": 0}, "round_to"),
    ],
)
def test_bad_params_are_refused_without_a_model(params, named):
    """Range checks are declarative: recipe validation refuses them before any model is loaded."""
    with pytest.raises(pydantic.ValidationError) as caught:
        Params.model_validate(params)
    (error,) = caught.value.errors()
    where = ".".join(str(part) for part in error["loc"])
    assert where == named or (not where and error["msg"].startswith(f"Value error, {named}:")), error


def test_prunable_components_are_those_outside_the_output_layers(baseline):
    assert prunable_components(baseline, FAMILY) == ["backbone", "cbam", "bifpn", "ssh", "channel_shuffle"]
    protected = {id(p) for layer in FAMILY.output_layers(baseline) for p in layer.parameters()}
    assert protected == {id(p) for p in baseline.heads.parameters()}


def test_apply_returns_a_json_record_of_the_pruned_groups(baseline, example):
    model = copy.deepcopy(baseline)
    result = Prune().apply(model, Params(ratios={"ssh": 0.25}), _ctx(example))
    assert isinstance(result, PassResult) and result.model is model
    groups = json.loads(json.dumps(result.record))["groups"]
    assert groups and all(set(g) == {"component", "root", "channels", "kept", "removed"} for g in groups)
    assert all(g["component"] == "ssh" and g["kept"] + len(g["removed"]) == g["channels"] for g in groups)
    conv3x3 = next(g for g in groups if g["root"] == "ssh.0.conv3x3.conv")
    assert (conv3x3["channels"], conv3x3["kept"]) == (32, model.ssh[0].conv3x3.conv.out_channels) == (32, 24)


@pytest.mark.parametrize("channels, groups", [(8, 2), (12, 3), (64, 2), (6, 1), (24, 4)])
def test_shuffle_permutation_is_the_shuffle(channels, groups):
    x = torch.randn(2, channels, 3, 5)
    p = shuffle_permutation(channels, groups)
    assert sorted(p.tolist()) == list(range(channels))
    assert torch.equal(channel_shuffle(x, groups), x[:, p])
    assert torch.equal(channel_shuffle(x, groups)[:, torch.argsort(p)], x)  # the inverse


def test_params_forbid_unknown_keys():
    with pytest.raises(ValueError):
        Params(ratio=0.1, step=0.1)
    assert Prune.summary().startswith("Structured channel pruning")
    assert all(f.description for f in Params.model_fields.values())


def test_fit_images_refits_every_dense_reader_in_forward_order(reference_dir):
    trained = featherface.load_original_checkpoint(torch.load(reference_dir / "featherface_baseline_seed0.pt",
                                                              weights_only=True)).eval()
    fit = FAMILY.example_input(64, 64, batch_size=4, seed=3)
    held_out = FAMILY.example_input(64, 64, batch_size=4, seed=4)
    ctx = PassContext(family=FAMILY, example_input=FAMILY.example_input(64, 64), sample_inputs=lambda n: fit[:n])
    # Only stage 1 (strides 2 to 8) gives channels: at 64x64 its readers see enough positions (rows) on 4
    # images for a well-posed fit; the deeper layers' 2x2 to 4x4 maps would give fewer rows than columns.
    params = {"ratios": {"backbone": 0.25}, "ignored_layers": ["backbone.stage2", "backbone.stage3"]}
    sliced = Prune().apply(copy.deepcopy(trained), Params(**params), ctx)
    refitted = Prune().apply(copy.deepcopy(trained), Params(**params, fit_images=4), ctx)

    assert "fit_relative_error" not in sliced.record
    errors = refitted.record["fit_relative_error"]
    # The readers of the pruned channels: the next pointwise convs, not the depthwise convs (which only lose
    # channels); the stem's output is pruned, so stage1.1 reads it first.
    names = list(errors)
    assert names[0] == "backbone.stage1.1.pointwise" and not any("depthwise" in n for n in names)
    assert all(n.startswith("backbone.stage1.") and n.endswith(".pointwise") for n in names)
    order = [n for n, _ in refitted.model.named_modules() if n in errors]
    assert names == order  # FeatherFace declares its layers in the order they run
    assert all(e["fitted"] < e["start"] for e in errors.values()), errors
    reference = _outputs(trained, held_out)
    # On images it was not fitted on, too (this reference's weights are random, not trained: a small gain).
    assert _mean_drift(reference, _outputs(refitted.model, held_out)) < _mean_drift(reference, _outputs(sliced.model,
                                                                                                        held_out))
    assert count_parameters(refitted.model) == count_parameters(sliced.model)


def test_fit_images_without_run_images_is_refused(baseline, example):
    with pytest.raises(ValueError, match="fit_images: this run has no images"):
        Prune().apply(copy.deepcopy(baseline), Params(ratio=0.1, fit_images=2), _ctx(example))
