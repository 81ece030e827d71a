"""The ``prune`` pass: structured channel pruning on torch-pruning's dependency graph.

One application removes, from every prunable channel group, the given fraction
of its *current* channels (the least important ones), so a stage with
``until: {total: N}`` repeats the pass in small steps until the budget holds.

What torch-pruning handles: tracing the model into a dependency graph and
coupling every layer that shares a channel dimension (conv -> BN -> conv chains,
depthwise convs, the residual adds around CBAM, BiFPN's weighted sums, SSH's
``torch.cat`` with its offsets, the CBAM MLP's ``fc1`` inputs / ``fc2`` outputs),
the group importance scores, and slicing the standard layers.

What this module handles itself, because the graph cannot (see the tests):

* ``DeformableConv2d`` calls ``deform_conv2d`` with ``regular_conv.weight``, so
  it is registered as a customised layer (:class:`DeformableConvPruner`): out
  channels slice ``regular_conv``'s rows, in channels slice the input columns of
  ``offset_conv``, ``modulator_conv`` and ``regular_conv`` together; the 2*k*k
  offset and k*k mask outputs are never touched.
* The channel shuffle (reshape -> transpose -> reshape) is a fixed permutation
  followed by the 1x1 ``reduce`` conv.  torch-pruning maps it as the identity,
  which removes the wrong columns of ``reduce``.  So the permutation is folded
  into ``reduce``'s input columns and the shuffle switched off while the graph is
  built and pruned, then put back: ``reduce``'s columns are re-ordered for the
  permutation of the new (even) width.  Exact: the pruned block computes what
  the original computes with the removed channels zeroed.
* ``FusionWeights`` (BiFPN's per-input scalars) is registered as a customised
  layer that prunes nothing, so its weights are never taken for a channel
  dimension (torch-pruning would otherwise treat them as free parameters with
  a prunable last dimension).
* ``SpatialGate``'s conv reads [max, mean] over the channels, which has no
  channel index: its conv and BN are left out of tracing, so the graph sees
  channel-preserving no-ops there and never gives the 2-channel conv the
  features' indices (it would, through ``amax``/``mean``, which it takes for
  element-wise ops).
* The heads' outputs are the detection contract: a group that reaches a model
  output (or prunes a head's output channels) is never pruned.  Heads' input
  widths shrink with the channel-shuffle outputs that feed them.
* A BiFPN cell has one width for all its layers: the groups that prune inside
  BiFPN cells are tied and remove the same number of channels.
* Grouped (not depthwise) convs, as ``ssh_slim`` can make, need every channel
  block to shrink alike; groups that touch one are left unpruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import pydantic
import torch
import torch_pruning as tp
from pydantic import Field
from torch import Tensor, nn
from torch_pruning.pruner import function

from compressor import Pass, hookimpl
from featherface.modules import BiFPNCell, ChannelShuffleBlock, DeformableConv2d, SpatialGate
from featherface.modules.bifpn import FusionWeights
from featherface.modules.shuffle import channel_shuffle

# Components whose layers never lose output channels: the heads' outputs are the contract.
UNPRUNABLE_COMPONENTS = ("heads",)


class DeformableConvPruner(function.BasePruningFunc):
    """Prunes a :class:`DeformableConv2d` as one layer.

    Out channels are ``regular_conv``'s rows.  In channels are the input columns
    of ``offset_conv``, ``modulator_conv`` and ``regular_conv`` together; the
    offset and mask outputs (2*k*k and k*k sampling parameters) are never pruned.
    """

    TARGET_MODULES = DeformableConv2d

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        conv = layer.regular_conv
        keep = _keep(conv.out_channels, idxs)
        conv.weight = self._prune_parameter_and_grad(conv.weight, keep, 0)
        if conv.bias is not None:
            conv.bias = self._prune_parameter_and_grad(conv.bias, keep, 0)
        conv.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = _keep(layer.regular_conv.in_channels, idxs)
        for conv in (layer.offset_conv, layer.modulator_conv, layer.regular_conv):
            conv.weight = self._prune_parameter_and_grad(conv.weight, keep, 1)
            conv.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.regular_conv.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.regular_conv.in_channels


class UntouchedPruner(function.BasePruningFunc):
    """A layer the graph passes through and never prunes (no channel dimension of its own).

    ``prune_in_channels is prune_out_channels`` makes the graph couple the
    layer's input and output channels, as for an element-wise op.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


DEFORMABLE_PRUNER = DeformableConvPruner()
UNTOUCHED_PRUNER = UntouchedPruner()
CUSTOMIZED_PRUNERS = {
    DeformableConv2d: DEFORMABLE_PRUNER,
    FusionWeights: UNTOUCHED_PRUNER,
}
ROOT_TYPES = (nn.Conv2d, nn.Linear, DeformableConv2d)
IMPORTANCES = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn_scale": tp.importance.BNScaleImportance,
    "taylor": tp.importance.GroupTaylorImportance,
}


class PruneParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    importance: Literal["magnitude", "bn_scale", "taylor"] = Field(
        "magnitude",
        description=(
            "How channels are ranked within a group: 'magnitude' (squared L2 norm of their weights, "
            "averaged over the group's layers), 'bn_scale' (|BN gamma|; groups without BN fall back to "
            "magnitude) or 'taylor' (|w * dL/dw| with L the output energy sum(mean(y^2)) on the example "
            "batch: there are no labels here)."
        ),
    )
    ratio: float | None = Field(
        None,
        description="Fraction of the current channels removed per application from every prunable component "
        "without an entry in 'ratios' (0 <= ratio < 1).",
    )
    ratios: dict[str, float] = Field(
        default_factory=dict,
        description="Per-component fraction of the current channels removed per application "
        "(backbone, cbam, bifpn, ssh, channel_shuffle); overrides 'ratio'.",
    )
    ignored_layers: list[str] = Field(
        default_factory=list,
        description="Module paths (e.g. 'backbone.stage1.0', 'bifpn') whose output channels are never pruned.",
    )
    round_to: int | None = Field(
        None, description="Keep every pruned group's channel count a multiple of this (e.g. 8)."
    )


@dataclass
class PrunedGroup:
    """What one pruned group removed: its owner component, root layer and every coupled layer's indices."""

    component: str
    root: str
    channels: int
    removed: list[int]
    # (module path, "out" | "in", removed indices) for every named layer the group touched.
    layers: list[tuple[str, str, list[int]]] = field(default_factory=list)


class Prune(Pass):
    """Structured channel pruning (torch-pruning's dependency graph), a fraction of the channels per application."""

    name = "prune"
    Params = PruneParams

    def check(self, model: nn.Module, params: Any, ctx: Any) -> None:
        components = tuple(ctx.family.components)
        prunable = [c for c in components if c not in UNPRUNABLE_COMPONENTS]
        for key, value in params.ratios.items():
            if key not in components:
                raise ValueError(f"ratios: unknown component {key!r} (components: {', '.join(prunable)})")
            if key in UNPRUNABLE_COMPONENTS:
                raise ValueError(
                    f"ratios: {key!r} cannot be pruned: its output channels are the model's outputs "
                    "(prune channel_shuffle to narrow the heads' inputs)"
                )
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ratios[{key!r}]: {value} is not in [0, 1)")
        if params.ratio is not None and not 0.0 <= params.ratio < 1.0:
            raise ValueError(f"ratio: {params.ratio} is not in [0, 1)")
        if params.ratio is None and not params.ratios:
            raise ValueError("ratio: give ratio or ratios (nothing to prune)")
        if params.round_to is not None and params.round_to < 1:
            raise ValueError(f"round_to: {params.round_to} must be at least 1")
        modules = dict(model.named_modules())
        for path in params.ignored_layers:
            if path not in modules or not path:
                raise ValueError(f"ignored_layers: no module {path!r} in the model")

    def apply(self, model: nn.Module, params: Any, ctx: Any) -> nn.Module:
        prune_model(model, params, ctx)
        return model


def prune_model(model: nn.Module, params: PruneParams, ctx: Any) -> list[PrunedGroup]:
    """Prune ``model`` in place by one step; returns what was removed, group by group."""
    was_training = model.training
    model.eval()
    example = ctx.example_input.to(ctx.device) if ctx.device is not None else ctx.example_input
    try:
        with torch.enable_grad():
            if params.importance == "taylor":
                _output_energy_gradients(model, example)
            with shuffles_folded(model):
                graph, order = _build_graph(model, example)
                plans = _plan(model, graph, order, params, ctx.family.component_of)
                done = _execute(graph, plans)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    _check_rebuilds(model, ctx.family)
    return done


# --- the graph ----------------------------------------------------------------


def dependency_graph(model: nn.Module, example_input: Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model`` with this module's customised layers registered.

    Does not fold channel shuffles: use :func:`prune_model` (or the pass) for a
    model that has them.
    """
    with torch.enable_grad():
        return _build_graph(model, example_input)[0]


def _build_graph(model: nn.Module, example: Tensor) -> tuple[tp.DependencyGraph, dict[nn.Module, int]]:
    """The dependency graph, and the order in which layers first ran during its tracing forward."""
    order: dict[nn.Module, int] = {}

    def record(module: nn.Module, inputs: object) -> None:
        order.setdefault(module, len(order))

    # A spatial gate's conv reads [max, mean] over the channels: it has no channel
    # index to couple.  Left out of tracing, its ops are channel-preserving no-ops
    # to the graph (one per call, so a gate shared by several levels couples nothing).
    untraced = [sub for gate in model.modules() if isinstance(gate, SpatialGate)
                for sub in gate.modules() if sub is not gate]
    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, ROOT_TYPES)]
    try:
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners=dict(CUSTOMIZED_PRUNERS),
            ignored_layers=untraced, verbose=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    if graph.unwrapped_parameters:
        names = [graph._param_to_name.get(p, "?") for p, _ in graph.unwrapped_parameters]
        raise RuntimeError(f"prune: parameters outside any known layer, no rule to prune them: {names}")
    return graph, order


# --- the channel shuffle ------------------------------------------------------


def shuffle_permutation(channels: int, groups: int) -> Tensor:
    """``p`` with ``channel_shuffle(x)[:, j] == x[:, p[j]]``."""
    index = torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1)
    return channel_shuffle(index, groups).view(-1).long()


class shuffles_folded:
    """Fold each block's shuffle into its ``reduce`` conv (exactly) for the duration of a with-block.

    ``reduce(shuffle(x)) == reduce'(x)`` with ``reduce'.weight[:, k] = reduce.weight[:, p^-1[k]]``:
    inside the block the shuffle is skipped, so the graph sees a plain
    channel-preserving path and couples SSH's channel ``k`` with column ``k``.
    On exit the permutation of the (possibly narrower) width is folded back out.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, ChannelShuffleBlock)]

    def __enter__(self) -> shuffles_folded:
        for block in self.blocks:
            perm = shuffle_permutation(block.reduce.in_channels, block.groups).to(block.reduce.weight.device)
            _permute_columns(block.reduce.weight, torch.argsort(perm))
            block.forward = _unshuffled_forward.__get__(block)  # instance attribute: the shuffle is skipped
        return self

    def __exit__(self, *exc: object) -> None:
        problems = []
        for block in self.blocks:
            del block.forward
            channels = block.reduce.in_channels
            if channels % block.groups:
                problems.append(f"{channels} channels into a {block.groups}-group shuffle")
                continue
            perm = shuffle_permutation(channels, block.groups).to(block.reduce.weight.device)
            _permute_columns(block.reduce.weight, perm)
        if problems and exc[0] is None:
            raise RuntimeError(f"prune: left {'; '.join(problems)}")


def _unshuffled_forward(self: ChannelShuffleBlock, x: Tensor) -> Tensor:
    x = self.reduce_bn(self.reduce(x))
    x = self.depthwise_bn(self.depthwise(x))
    return self.act(self.expand_bn(self.expand(x)))


def _permute_columns(weight: nn.Parameter, index: Tensor) -> None:
    """``weight[:, k] <- weight[:, index[k]]`` in place (and the gradient, when there is one)."""
    weight.data = weight.data[:, index].contiguous()
    if weight.grad is not None:
        weight.grad = weight.grad[:, index].contiguous()


# --- planning -----------------------------------------------------------------


@dataclass
class _Plan:
    group: Any
    component: str
    channels: int
    remove: int
    cells: set[int] = field(default_factory=set)
    importance: Tensor | None = None


def _plan(model: nn.Module, graph: tp.DependencyGraph, order: dict[nn.Module, int],
          params: PruneParams, component_of: Any) -> list[_Plan]:
    """How many channels each group loses, and which (the least important)."""
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    ignored = {m for path in params.ignored_layers for m in modules[path].modules()}
    cells = [m for m in model.modules() if isinstance(m, BiFPNCell)]
    in_cell = {sub: i for i, cell in enumerate(cells) for sub in cell.modules()}
    reduces = {block.reduce: block.groups for block in model.modules() if isinstance(block, ChannelShuffleBlock)}

    plans: list[_Plan] = []
    for group in graph.get_all_groups(root_module_types=ROOT_TYPES):
        outs = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        producers = [m for m in outs if m in order]
        if not producers:
            continue
        first = min(producers, key=order.__getitem__)
        component = component_of(f"{names[first]}.weight")
        plan = _Plan(group=group, component=component, channels=len(group[0].idxs), remove=0,
                     cells={in_cell[m] for m in outs if m in in_cell})
        plans.append(plan)
        out_components = {component_of(f"{names[m]}.weight") for m in outs if m in names}
        if (
            any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group)  # the output contract
            or out_components & set(UNPRUNABLE_COMPONENTS)
            or any(m in ignored for m in outs)
            or any(_grouped(dep.target.module) for dep, _ in group)
        ):
            continue
        ratio = params.ratios.get(component, params.ratio)
        if ratio:
            shuffle_groups = [
                g for dep, _ in group for layer, g in reduces.items()
                if dep.target.module is layer and dep.handler == function.prune_conv_in_channels
            ]
            plan.remove = _removal(plan.channels, ratio, params.round_to, shuffle_groups)

    _tie_bifpn_widths(plans, len(cells))
    plans = [p for p in plans if p.remove > 0]
    scorer = IMPORTANCES[params.importance]()
    fallback = IMPORTANCES["magnitude"]()
    for plan in plans:
        plan.importance = _importance(plan.group, scorer, fallback)
    return plans


def _grouped(module: Any) -> bool:
    """A grouped (not depthwise) conv: its channel blocks must shrink alike, which this pass does not do."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)


def _removal(channels: int, ratio: float, round_to: int | None, shuffle_groups: list[int]) -> int:
    """Channels to remove: ``ratio`` of ``channels``, keeping multiples of ``round_to`` and of shuffle groups."""
    keep = math.floor(channels * (1.0 - ratio) + 1e-9)
    if round_to:
        keep -= keep % round_to
    remove = channels - keep
    for g in shuffle_groups:  # the shuffle's width must stay divisible by its groups
        remove = math.ceil(remove / g) * g
        if remove >= channels:
            remove -= g
    return remove if 0 < remove < channels else 0


def _tie_bifpn_widths(plans: list[_Plan], cell_count: int) -> None:
    """Groups inside BiFPN cells remove the same number of channels: a cell has a single width.

    Cells are tied to each other through the groups that span them (a cell's
    outputs are the next cell's inputs); each connected set takes the smallest
    removal of its groups.
    """
    parent = list(range(cell_count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for plan in plans:
        cells = sorted(plan.cells)
        for other in cells[1:]:
            parent[find(other)] = find(cells[0])
    smallest: dict[int, int] = {}
    for plan in plans:
        if plan.cells:
            root = find(min(plan.cells))
            smallest[root] = min(smallest.get(root, plan.remove), plan.remove)
    for plan in plans:
        if plan.cells:
            plan.remove = smallest[find(min(plan.cells))]


def _importance(group: Any, scorer: Any, fallback: Any) -> Tensor:
    """torch-pruning's group importance, with each deformable conv scored as its regular conv."""
    view = []
    for item in group:
        dep, layer = item.dep, item.dep.target.module
        if isinstance(layer, DeformableConv2d):
            handler = (function.prune_conv_out_channels if dep.handler == DEFORMABLE_PRUNER.prune_out_channels
                       else function.prune_conv_in_channels)
            conv = layer.regular_conv
            dep = SimpleNamespace(target=SimpleNamespace(module=conv), handler=handler, layer=conv,
                                  pruning_fn=handler)
        entry = tp._helpers.GroupItem(dep=dep, idxs=list(item.idxs))
        entry.root_idxs = item.root_idxs
        view.append(entry)
    for estimator in (scorer, fallback):
        imp = estimator(view)
        if imp is not None and bool(torch.isfinite(imp).all()):
            return imp.detach().cpu()
    return torch.arange(len(group[0].idxs), dtype=torch.float32)  # nothing to rank by: keep the first ones


def _execute(graph: tp.DependencyGraph, plans: list[_Plan]) -> list[PrunedGroup]:
    names = {m: n for n, m in graph.model.named_modules()}
    done = []
    for plan in plans:
        root = plan.group[0].dep
        idxs = torch.argsort(plan.importance, stable=True)[: plan.remove].tolist()
        group = graph.get_pruning_group(root.target.module, root.handler, sorted(idxs))
        if not graph.check_pruning_group(group):
            continue
        layers = []
        for dep, dep_idxs in group:
            name = names.get(dep.target.module)
            if name is None:
                continue
            kind = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
            layers.append((name, kind, sorted(int(i) for i in dep_idxs)))
        group.prune()
        done.append(PrunedGroup(plan.component, names.get(root.target.module, "?"), plan.channels,
                                sorted(idxs), layers))
    return done


# --- Taylor -------------------------------------------------------------------


def _output_energy_gradients(model: nn.Module, example: Tensor) -> None:
    """Gradients of L = sum over outputs of mean(y^2) on the example batch, for Taylor importance.

    There is no data here, and a distillation loss against the model the stage
    started from is exactly zero (with zero gradient) on the first application,
    so the criterion ranks channels by their first-order share of the outputs' energy.
    """
    model.zero_grad(set_to_none=True)
    outputs = model(example)
    tensors = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    loss = sum(t.float().pow(2).mean() for t in tensors)
    loss.backward()


# --- checks -------------------------------------------------------------------


def _check_rebuilds(model: nn.Module, family: Any) -> None:
    """The pruned model must describe itself: its spec builds a model its weights load into."""
    try:
        rebuilt = family.build(family.spec_of(model))
        rebuilt.load_state_dict(model.state_dict())
    except Exception as err:
        raise RuntimeError(f"prune: the pruned model no longer rebuilds from its spec: {err}") from err


def _keep(channels: int, idxs: list[int]) -> list[int]:
    removed = set(int(i) for i in idxs)
    return [i for i in range(channels) if i not in removed]


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [Prune]
