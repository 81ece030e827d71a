"""The ``prune`` pass: structured channel pruning on torch-pruning's dependency graph.

One application removes, from every prunable channel group, the given fraction
of its *current* channels (the least important ones), so a stage with
``until: {total: N}`` repeats the pass in small steps until the budget holds.

What torch-pruning handles: tracing the model into a dependency graph and
coupling every layer that shares a channel dimension (conv -> BN -> conv chains,
depthwise convs, residual adds, weighted sums, ``torch.cat`` with its offsets,
linear layers), the group importance scores, and slicing the standard layers.

What the model's family says (``ModelFamily.output_layers`` and
``ModelFamily.pruning_hints``), because the graph cannot know it:

* The output layers' output channels are the model's outputs: a group that
  would prune them, or that reaches a model output, is never pruned.  Their
  input widths shrink with the layers that feed them.  The components the pass
  can prune are the ones with parameters outside the output layers
  (:func:`prunable_components`).
* Customised pruners for layers that apply their weights functionally or hold
  weights with no channel axis; a pruner with an ``importance_layer(layer)``
  method is scored as that standard layer.
* Modules left out of tracing (ops with no channel index, e.g. a reduction over
  the channels), tied sets of modules that keep one width (their groups remove
  the same number of channels), input widths that must stay divisible by a
  channel-group size, and a context entered around building the graph and
  pruning (e.g. to fold a fixed channel permutation into the next layer).

What this module handles itself: grouped (not depthwise) convs need every
channel block to shrink alike; groups that touch one are left unpruned.  With
``fit_images``, every dense conv that lost input channels is refitted by least
squares (:mod:`compressor.refit`) to reproduce what it produced before the
application, one conv at a time in forward order, so each reads the
already-refitted outputs of the ones before it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import pydantic
import torch
import torch_pruning as tp
from pydantic import Field
from torch import Tensor, nn
from torch_pruning.pruner import function

from compressor import Pass, hookimpl
from compressor.family import ModelFamily, PruningHints
from compressor.passes import PassResult
from compressor.refit import MAX_FIT_IMAGES, ConvRefit, fit_reference, refit_convs

# The standard layers that root channel groups (customised layers with channels are added per model).
STANDARD_ROOTS = (nn.Conv2d, nn.Linear)
IMPORTANCES = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn_scale": tp.importance.BNScaleImportance,
    "taylor": tp.importance.GroupTaylorImportance,
}

# A fraction of the current channels: 0 removes nothing (e.g. to exempt one component from 'ratio').
Ratio = Annotated[float, Field(ge=0.0, lt=1.0)]


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
        None, ge=0.0, lt=1.0,
        description="Fraction of the current channels removed per application from every prunable component "
        "without an entry in 'ratios' (0 <= ratio < 1).",
    )
    ratios: dict[str, Ratio] = Field(
        default_factory=dict,
        description="Per-component fraction of the current channels removed per application "
        "(0 <= ratio < 1; any component with parameters outside the model's output layers); overrides 'ratio'.",
    )
    ignored_layers: list[str] = Field(
        default_factory=list,
        description="Module paths (as the model's named_modules gives them) whose layers' output channels are "
        "never pruned, with everything inside them.",
    )
    round_to: int | None = Field(
        None, ge=1, description="Keep every pruned group's channel count a multiple of this (e.g. 8); at least 1."
    )
    fit_images: int = Field(
        0, ge=0, le=MAX_FIT_IMAGES,
        description="After each application, refit every dense conv that lost input channels by least squares to "
                    "reproduce its outputs before the application, on this many of the run's images (at most "
                    f"{MAX_FIT_IMAGES}); 0: the sliced weights only.",
    )

    @pydantic.model_validator(mode="after")
    def _something_to_prune(self) -> PruneParams:
        if self.ratio is None and not self.ratios:
            raise ValueError("ratio: give ratio or ratios (nothing to prune)")
        return self


@dataclass
class PrunedGroup:
    """What one pruned group removed: its owner component, root layer and every coupled layer's indices."""

    component: str
    root: str
    channels: int
    removed: list[int]
    # (module path, "out" | "in", removed indices) for every named layer the group touched.
    layers: list[tuple[str, str, list[int]]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """JSON-able summary: component, root layer, channels before, kept, and the removed indices."""
        return {"component": self.component, "root": self.root, "channels": self.channels,
                "kept": self.channels - len(self.removed), "removed": [int(i) for i in self.removed]}


def prunable_components(model: nn.Module, family: ModelFamily) -> list[str]:
    """The family's components with at least one parameter outside ``model``'s output layers, in display order."""
    protected = {id(p) for layer in family.output_layers(model) for p in layer.parameters()}
    found = {family.component_of(name) for name, p in model.named_parameters() if id(p) not in protected}
    return [c for c in family.components if c in found]


class Prune(Pass):
    """Structured channel pruning (torch-pruning's dependency graph), a fraction of the channels per application."""

    name = "prune"
    Params = PruneParams

    def check(self, model: nn.Module, params: Any, ctx: Any) -> None:
        components = tuple(ctx.family.components)
        prunable = prunable_components(model, ctx.family)
        for key in params.ratios:
            if key not in components:
                raise ValueError(f"ratios: unknown component {key!r} (prunable: {', '.join(prunable)})")
            if key not in prunable:
                raise ValueError(
                    f"ratios: {key!r} cannot be pruned: its layers are the model's output layers, whose output "
                    "channels are the outputs (prune the components that feed them to narrow their inputs)"
                )
        modules = dict(model.named_modules())
        for path in params.ignored_layers:
            if path not in modules or not path:
                raise ValueError(f"ignored_layers: no module {path!r} in the model")

    def apply(self, model: nn.Module, params: Any, ctx: Any) -> PassResult:
        reference = fit_reference(model, params.fit_images, ctx.sample_inputs)
        done = prune_model(model, params, ctx)
        record: dict[str, Any] = {"groups": [group.record() for group in done]}
        if reference is not None and done:
            record["fit_relative_error"] = refit_readers(model, reference, done, ctx.sample_inputs(params.fit_images))
        return PassResult(model, record)


def prune_model(model: nn.Module, params: PruneParams, ctx: Any) -> list[PrunedGroup]:
    """Prune ``model`` in place by one step; returns what was removed, group by group."""
    family = ctx.family
    hints = family.pruning_hints(model)
    protected = list(family.output_layers(model))
    was_training = model.training
    model.eval()
    example = ctx.example_input.to(ctx.device) if ctx.device is not None else ctx.example_input
    try:
        with torch.enable_grad():
            if params.importance == "taylor":
                _output_energy_gradients(model, example)
            with hints.context(model):
                graph, order = _build_graph(model, example, hints)
                plans = _plan(model, graph, order, params, family.component_of, hints, protected)
                done = _execute(graph, plans)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    check_rebuilds(model, family)
    return done


@contextlib.contextmanager
def first_calls(layers: list[nn.Module]) -> Iterator[dict[nn.Module, int]]:
    """Within the block, the yielded dict fills with each of ``layers`` as it is first called: its position."""
    order: dict[nn.Module, int] = {}

    def record(module: nn.Module, inputs: object) -> None:
        order.setdefault(module, len(order))

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        yield order
    finally:
        for handle in handles:
            handle.remove()


# --- the graph ----------------------------------------------------------------


def dependency_graph(model: nn.Module, example_input: Tensor, hints: PruningHints | None = None) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model`` with the hints' customised pruners and untraced modules.

    Does not enter ``hints.context``: use :func:`prune_model` (or the pass), or
    enter it around this call, for a model that needs it.
    """
    with torch.enable_grad():
        return _build_graph(model, example_input, hints or PruningHints())[0]


def root_types(model: nn.Module, hints: PruningHints) -> tuple[type[nn.Module], ...]:
    """Standard layers, and the customised layers whose pruners give them output channels."""
    custom = []
    for module in model.modules():
        kind = type(module)
        pruner = hints.custom_pruners.get(kind)
        if pruner is not None and kind not in custom and pruner.get_out_channels(module) is not None:
            custom.append(kind)
    return (*STANDARD_ROOTS, *custom)


def _build_graph(model: nn.Module, example: Tensor,
                 hints: PruningHints) -> tuple[tp.DependencyGraph, dict[nn.Module, int]]:
    """The dependency graph, and the order in which layers first ran during its tracing forward."""
    roots = root_types(model, hints)
    with first_calls([m for m in model.modules() if isinstance(m, roots)]) as order:
        # Untraced modules' ops are channel-preserving no-ops to the graph (one per call).
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners=dict(hints.custom_pruners),
            ignored_layers=list(hints.untraced), verbose=False,
        )
    if graph.unwrapped_parameters:
        names = [graph._param_to_name.get(p, "?") for p, _ in graph.unwrapped_parameters]
        raise RuntimeError(f"prune: parameters outside any known layer, no rule to prune them: {names}")
    return graph, order


# --- planning -----------------------------------------------------------------


@dataclass
class _Plan:
    group: Any
    component: str
    channels: int
    remove: int
    tied: set[int] = field(default_factory=set)
    importance: Tensor | None = None


def _plan(model: nn.Module, graph: tp.DependencyGraph, order: dict[nn.Module, int], params: PruneParams,
          component_of: Any, hints: PruningHints, protected: list[nn.Module]) -> list[_Plan]:
    """How many channels each group loses, and which (the least important)."""
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    ignored = {m for path in params.ignored_layers for m in modules[path].modules()}
    outputs = set(protected)
    in_set = {sub: i for i, members in enumerate(hints.tied) for module in members for sub in module.modules()}

    plans: list[_Plan] = []
    for group in graph.get_all_groups(root_module_types=root_types(model, hints)):
        outs = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        producers = [m for m in outs if m in order]
        if not producers:
            continue
        first = min(producers, key=order.__getitem__)
        component = component_of(f"{names[first]}.weight")
        plan = _Plan(group=group, component=component, channels=len(group[0].idxs), remove=0,
                     tied={in_set[m] for m in outs if m in in_set})
        plans.append(plan)
        if (
            any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group)  # the output contract
            or any(m in outputs for m in outs)
            or any(m in ignored for m in outs)
            or any(is_grouped(dep.target.module) for dep, _ in group)
        ):
            continue
        ratio = params.ratios.get(component, params.ratio)
        if ratio:
            divisors = [
                d for dep, _ in group for layer, d in hints.divisors
                if dep.target.module is layer and graph.is_in_channel_pruning_fn(dep.handler)
            ]
            plan.remove = _removal(plan.channels, ratio, params.round_to, divisors)

    _tie_widths(plans, len(hints.tied))
    plans = [p for p in plans if p.remove > 0]
    scorer = IMPORTANCES[params.importance]()
    fallback = IMPORTANCES["magnitude"]()
    for plan in plans:
        plan.importance = _importance(plan.group, scorer, fallback, hints)
    return plans


def is_grouped(module: Any) -> bool:
    """A grouped (not depthwise) conv: its channel blocks must shrink alike, which this pass does not do."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)


def _removal(channels: int, ratio: float, round_to: int | None, divisors: list[int]) -> int:
    """Channels to remove: ``ratio`` of ``channels``, keeping multiples of ``round_to`` and of the divisors."""
    keep = math.floor(channels * (1.0 - ratio) + 1e-9)
    if round_to:
        keep -= keep % round_to
    remove = channels - keep
    for d in divisors:  # an input width that must stay divisible (e.g. by a channel shuffle's groups)
        remove = math.ceil(remove / d) * d
        if remove >= channels:
            remove -= d
    return remove if 0 < remove < channels else 0


def _tie_widths(plans: list[_Plan], set_count: int) -> None:
    """Groups inside one tied set remove the same number of channels: the set has a single width.

    Sets are tied to each other through the groups that span them (e.g. one
    set's outputs are the next one's inputs); each connected union of sets takes
    the smallest removal of its groups.
    """
    parent = list(range(set_count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for plan in plans:
        tied = sorted(plan.tied)
        for other in tied[1:]:
            parent[find(other)] = find(tied[0])
    smallest: dict[int, int] = {}
    for plan in plans:
        if plan.tied:
            root = find(min(plan.tied))
            smallest[root] = min(smallest.get(root, plan.remove), plan.remove)
    for plan in plans:
        if plan.tied:
            plan.remove = smallest[find(min(plan.tied))]


def scoring_view(group: Any, hints: PruningHints) -> list[Any]:
    """``group`` as torch-pruning's importance estimators should see it.

    A customised layer whose pruner names a standard stand-in (``importance_layer``,
    e.g. a deformable conv's regular conv) is shown as that layer, so its weights
    are scored like any conv's instead of being skipped.
    """
    view = []
    for item in group:
        dep, layer = item.dep, item.dep.target.module
        pruner = hints.custom_pruners.get(type(layer))
        stand_in = getattr(pruner, "importance_layer", None)
        if stand_in is not None:
            standard = stand_in(layer)
            box = function.PrunerBox[tp.ops.module2type(standard)]
            handler = box.prune_out_channels if dep.handler == pruner.prune_out_channels else box.prune_in_channels
            dep = SimpleNamespace(target=SimpleNamespace(module=standard), handler=handler, layer=standard,
                                  pruning_fn=handler)
        entry = tp._helpers.GroupItem(dep=dep, idxs=list(item.idxs))
        entry.root_idxs = item.root_idxs
        view.append(entry)
    return view


def _importance(group: Any, scorer: Any, fallback: Any, hints: PruningHints) -> Tensor:
    """torch-pruning's group importance, with each customised layer that names one scored as its standard layer."""
    view = scoring_view(group, hints)
    for estimator in (scorer, fallback):
        imp = estimator(view)
        if imp is not None and bool(torch.isfinite(imp).all()):
            return imp.detach().cpu()
    return torch.arange(len(group[0].idxs), dtype=torch.float32)  # nothing to rank by: keep the first ones


def _execute(graph: tp.DependencyGraph, plans: list[_Plan]) -> list[PrunedGroup]:
    names = {m: n for n, m in graph.model.named_modules()}
    done = []
    for plan in plans:
        idxs = torch.argsort(plan.importance, stable=True)[: plan.remove].tolist()
        root = plan.group[0].dep
        pruned = prune_group(graph, names, root, idxs, plan.component, names.get(root.target.module, "?"),
                             plan.channels)
        if pruned is not None:
            done.append(pruned)
    return done


def prune_group(graph: tp.DependencyGraph, names: dict[nn.Module, str], root: Any, idxs: list[int],
                component: str, root_name: str, channels: int) -> PrunedGroup | None:
    """Remove channels ``idxs`` of ``root``'s group, and say what went from each named layer.

    None when torch-pruning refuses the group (``check_pruning_group``); nothing is changed then.
    """
    group = graph.get_pruning_group(root.target.module, root.handler, sorted(idxs))
    if not graph.check_pruning_group(group):
        return None
    layers = []
    for dep, dep_idxs in group:
        name = names.get(dep.target.module)
        if name is None:
            continue
        kind = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
        layers.append((name, kind, sorted(int(i) for i in dep_idxs)))
    group.prune()
    return PrunedGroup(component, root_name, channels, sorted(idxs), layers)


# --- refitting the readers ------------------------------------------------------


def refit_readers(model: nn.Module, reference: nn.Module, done: list[PrunedGroup],
                  images: Tensor) -> dict[str, dict[str, float]]:
    """Refit each dense conv of ``model`` that lost input channels in ``done`` to reproduce its output in
    ``reference`` (the model before the application), its own removed output channels left out; one conv
    per call, in forward order.  The relative errors before and after, per conv."""
    removed_out: dict[str, set[int]] = {}
    readers: dict[str, None] = {}
    for group in done:
        for name, kind, idxs in group.layers:
            if kind == "out":
                removed_out.setdefault(name, set()).update(idxs)
            else:
                readers[name] = None
    modules = dict(model.named_modules())
    dense = [name for name in readers if isinstance(modules.get(name), nn.Conv2d) and modules[name].groups == 1]
    order = forward_order(model, [modules[name] for name in dense], images[:1])
    errors = {}
    for name in sorted(dense, key=lambda n: order[modules[n]]):
        old = reference.get_submodule(name)
        gone = removed_out.get(name, set())
        keep = torch.tensor([i for i in range(old.out_channels) if i not in gone]) if gone else None
        [error] = refit_convs([ConvRefit(modules[name], old, keep)], model, reference, images)
        errors[name] = error.as_record()
    return errors


@torch.no_grad()
def forward_order(model: nn.Module, layers: list[nn.Module], example: Tensor) -> dict[nn.Module, int]:
    """The position of each of ``layers`` in the order of their first call during one forward of ``example``."""
    was_training = model.training
    try:
        with first_calls(layers) as order:
            model.eval()
            model(example)
    finally:
        model.train(was_training)
    missing = [layer for layer in layers if layer not in order]
    if missing:
        raise RuntimeError(f"prune: {len(missing)} of the layers to refit never ran on the fit images")
    return order


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


def check_rebuilds(model: nn.Module, family: Any) -> None:
    """The pruned model must describe itself: its spec builds a model its weights load into."""
    try:
        rebuilt = family.build(family.spec_of(model))
        rebuilt.load_state_dict(model.state_dict())
    except Exception as err:
        raise RuntimeError(f"prune: the pruned model no longer rebuilds from its spec: {err}") from err


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [Prune]
