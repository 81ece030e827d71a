"""The ``global_prune`` pass: torch-pruning's own global magnitude pruning of the whole model.

A peer baseline for hand-written recipes (``recipes/v2.yaml``) and for uniform
pruning (``recipes/uniform_prune.yaml``): instead of us deciding which component
gives how much, torch-pruning's pruner (``tp.pruner.MetaPruner`` with
``global_pruning=True`` and ``GroupMagnitudeImportance(p=2)``, its documented
global-magnitude set-up) ranks every prunable channel of the model against every
other and removes the lowest ones, wherever they are.

How the budget is met: the pass steps the pruner itself.  One pruner is built
per application with ``pruning_ratio=max_ratio`` and ``iterative_steps =
round(max_ratio / step)`` (torch-pruning's linear schedule), so step ``k``
brings the model's prunable channels, all groups together, down to
``1 - k * step`` of what they were when the pass began.  After each step the
pass counts the model's parameters (``compressor.accounting``, once per tensor)
and stops at the first step at or under ``target_params``; it fails if the
schedule ends first.  So one stage, with no ``until``, lands just under the
budget, with the overshoot of one step (``step`` of the channels).

What the family says, as for the ``prune`` pass (see ``plugins/prune.py``),
and how it reaches torch-pruning's pruner:

* Output layers (``ModelFamily.output_layers``) and the ``ignored_layers``
  params are the pruner's ``ignored_layers``: their output channels are never
  pruned, their input widths shrink with what feeds them.  Groups that reach a
  model output are dropped as well (the output contract).
* Customised pruners (e.g. FeatherFace's deformable convs and BiFPN fusion
  weights) are the pruner's ``customized_pruners``; a pruner with an
  ``importance_layer`` has its layer scored as that standard layer (otherwise
  torch-pruning's magnitude would not see a deformable conv's weights at all).
* Untraced modules (e.g. CBAM's spatial gate, a reduction over channels): the
  pruner builds its graph itself and has no parameter for modules to leave out
  of tracing, so its tracing forward (its ``forward_fn``) runs with those
  modules' forward hooks set aside: the graph it builds is the one
  ``prune.dependency_graph`` builds with the same hints.  (Traced, a spatial
  gate's 1-channel conv joins the groups of the features it gates, and the
  pruner never prunes a group with a 1-channel layer: BiFPN and the backbone's
  stage outputs would never shrink.)
* Tied sets (e.g. one width per BiFPN cell) and input widths that must stay
  divisible (e.g. by a channel shuffle's groups) are not something a global
  threshold knows, so the pass adjusts what torch-pruning picks (``_constrain``):
  the groups of a tied set (joined with the sets they span) each remove the
  mean of what torch-pruning picked from them, rounded down, so the set loses
  as many channels as the ranking chose for it (the smallest pick, as in the
  ``prune`` pass, would hold a BiFPN cell at full width whenever one of its
  groups ranks high), or nothing when torch-pruning left one of its groups out
  (ignored, capped by ``max_layer_ratio``); a divisor-bound group rounds its
  pick down.  Each group
  then loses its least important channels.  The schedule counts channels left,
  not channels removed, so the next step makes up for what was held back.
* The hints' context (e.g. the shuffle folded into the next conv) is entered
  around building the graph and every step.

Grouped (not depthwise) convs are pruned by torch-pruning itself (block by
block); a tied or divisor-bound group that holds one is left unpruned.  The
pruned model must rebuild from its spec (``prune.check_rebuilds``), so
checkpoints load as for every other pass.

What it does to the trained FeatherFace (592,371 -> 250,000): the threshold
ranks channels, not parameters, and with torch-pruning's default mean
normaliser (scores relative to their group's mean) it takes the backbone's
many cheap channels long before the deformable SSH's dear ones; at
``max_layer_ratio`` 1.0 (torch-pruning's default) every backbone layer ends at
1-3 channels.  ``recipes/global_prune.yaml`` caps layers at 0.8 and says why.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
import torch
import torch_pruning as tp
from pydantic import Field
from torch import Tensor, nn

from compressor import Pass, hookimpl
from compressor.accounting import count_parameters
from compressor.family import PruningHints
from compressor.passes import PassResult
from compressor_plugins.prune import PrunedGroup, check_rebuilds, is_grouped, prune_group, root_types, scoring_view


class GlobalPruneParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    target_params: int = Field(
        ..., ge=1,
        description="Stop at the first pruner step that leaves at most this many parameters "
        "(the model's total, each tensor counted once).",
    )
    step: float = Field(
        0.01, gt=0.0, lt=1.0,
        description="Fraction of the model's prunable channels (all groups together, counted when the pass "
        "starts) each pruner step removes, wherever the global ranking finds the least important ones.",
    )
    max_ratio: float = Field(
        0.9, gt=0.0, lt=1.0,
        description="The furthest the schedule goes (the pruner's pruning_ratio): the pass fails if the target "
        "is not reached once this fraction of the prunable channels is gone.",
    )
    max_layer_ratio: float = Field(
        1.0, gt=0.0, le=1.0,
        description="torch-pruning's max_pruning_ratio: a layer that has lost this fraction of its channels "
        "(since the pass began) is not pruned further; 1.0 (torch-pruning's default) lets a layer go down to one.",
    )
    normalizer: Literal["mean", "max", "sum", "lamp", "none"] = Field(
        "mean",
        description="How GroupMagnitudeImportance scales each group's scores before they are ranked against the "
        "other groups' ('mean', torch-pruning's default: relative to the group's mean; 'none': raw squared "
        "L2 norms, so layers with more weights per channel rank higher).",
    )
    round_to: int | None = Field(
        None, ge=1, description="Keep every pruned group's channel count a multiple of this (torch-pruning's round_to)."
    )
    ignored_layers: list[str] = Field(
        default_factory=list,
        description="Module paths (as the model's named_modules gives them) whose layers' output channels are "
        "never pruned, with everything inside them.",
    )

    @pydantic.model_validator(mode="after")
    def _step_fits(self) -> GlobalPruneParams:
        if self.step > self.max_ratio:
            raise ValueError(f"step: {self.step} is more than max_ratio {self.max_ratio}")
        return self


class GlobalPrune(Pass):
    """torch-pruning's own global magnitude pruning of the whole model, stepped until a parameter target holds."""

    name = "global_prune"
    Params = GlobalPruneParams

    def check(self, model: nn.Module, params: Any, ctx: Any) -> None:
        modules = dict(model.named_modules())
        for path in params.ignored_layers:
            if path not in modules or not path:
                raise ValueError(f"ignored_layers: no module {path!r} in the model")

    def apply(self, model: nn.Module, params: Any, ctx: Any) -> PassResult:
        done, totals = global_prune_model(model, params, ctx)
        # One entry per pruner step: removed indices are that step's (the widths it found).
        return PassResult(model, {"steps": [{"params": total, "groups": [group.record() for group in groups]}
                                            for groups, total in zip(done, totals)]})


def global_prune_model(model: nn.Module, params: GlobalPruneParams,
                       ctx: Any) -> tuple[list[list[PrunedGroup]], list[int]]:
    """Prune ``model`` in place until it has at most ``params.target_params`` parameters.

    Returns, for every pruner step, what it removed (group by group) and the total after it.
    """
    family = ctx.family
    hints = family.pruning_hints(model)
    modules = dict(model.named_modules())
    ignored = [*family.output_layers(model), *(modules[path] for path in params.ignored_layers)]
    example = ctx.example_input.to(ctx.device) if ctx.device is not None else ctx.example_input
    total = count_parameters(model).total
    if total <= params.target_params:
        return [], []
    steps = max(1, round(params.max_ratio / params.step))
    done: list[list[PrunedGroup]] = []
    totals: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), hints.context(model):
            pruner = tp.pruner.MetaPruner(
                model, example,
                importance=StandardLayerImportance(hints, None if params.normalizer == "none" else params.normalizer),
                global_pruning=True,
                pruning_ratio=params.max_ratio,
                iterative_steps=steps,
                max_pruning_ratio=params.max_layer_ratio,
                ignored_layers=ignored,
                round_to=params.round_to,
                customized_pruners=dict(hints.custom_pruners),
                root_module_types=list(root_types(model, hints)),
                forward_fn=_tracing_forward(hints.untraced),
            )
            graph = pruner.DG
            if graph.unwrapped_parameters:
                names = [graph._param_to_name.get(p, "?") for p, _ in graph.unwrapped_parameters]
                raise RuntimeError(f"global_prune: parameters outside any known layer, no rule to prune them: {names}")
            tied = _tied_groups(graph, hints, pruner.root_module_types)
            for _ in range(steps):
                picks = [_Pick.of(group, graph, family.component_of, hints, tied)
                         for group in pruner.step(interactive=True)]
                _constrain(picks, graph, tied, pruner.importance)
                done.append(_execute(graph, picks))
                total = count_parameters(model).total
                totals.append(total)
                if total <= params.target_params:
                    break
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if total > params.target_params:
        raise RuntimeError(
            f"global_prune: {total:,} parameters left after {len(totals)} steps, over target_params "
            f"{params.target_params:,} (raise max_ratio or max_layer_ratio, or lower the target)"
        )
    check_rebuilds(model, family)
    return done, totals


# --- what torch-pruning's pruner is given -------------------------------------


class StandardLayerImportance:
    """``GroupMagnitudeImportance(p=2)``, with each customised layer that names one scored as its standard layer.

    The same view as the prune pass's (``prune.scoring_view``); a group it cannot score returns
    None, which the pruner skips (there is nothing to rank it by against the others).
    """

    def __init__(self, hints: PruningHints, normalizer: str | None = "mean") -> None:
        self.hints = hints
        self.scorer = tp.importance.GroupMagnitudeImportance(p=2, normalizer=normalizer)

    def __call__(self, group: Any) -> Tensor | None:
        view = scoring_view(group, self.hints)
        imp = self.scorer(view)
        if imp is None or len(imp) == 0 or not bool(torch.isfinite(imp).all()):
            return None
        return imp


def _tracing_forward(untraced: Sequence[nn.Module]) -> Callable[[nn.Module, Tensor], Any]:
    """The pruner's ``forward_fn``: the forward it traces, with the untraced modules' forward hooks set aside.

    The graph maps a module's output to the module through the forward hook it
    registers on every layer it knows; a layer without one is, to the graph, an
    unknown channel-preserving op, which is what ``DependencyGraph.build_dependency``'s
    ``ignored_layers`` makes of it (the pruner does not pass that parameter on).
    """
    modules = list({id(module): module for module in untraced}.values())

    def forward(model: nn.Module, example: Tensor) -> Any:
        saved = [(module, module._forward_hooks) for module in modules]
        for module, _ in saved:
            module._forward_hooks = OrderedDict()
        try:
            return model(example)
        finally:
            for module, hooks in saved:
                module._forward_hooks = hooks

    return forward


# --- the family's constraints on torch-pruning's picks ------------------------


@dataclass
class _TiedGroups:
    """Every channel group that reaches into a tied set, pruned by the pass or not (they share the set's width)."""

    #: The group (index) each layer whose output channels it prunes belongs to.
    owner: dict[nn.Module, int]
    #: The tied sets each group reaches into, by group index (only groups that reach one).
    sets: dict[int, set[int]]


def _tied_groups(graph: tp.DependencyGraph, hints: PruningHints, roots: Sequence[type]) -> _TiedGroups:
    """The graph's groups that touch a tied set (their structure, not their widths, so once per pass).

    All groups, ignored ones included, as in ``prune._plan``: a group torch-pruning
    does not prune still holds its tied sets at their width.
    """
    in_set = {sub: i for i, members in enumerate(hints.tied) for module in members for sub in module.modules()}
    owner: dict[nn.Module, int] = {}
    sets: dict[int, set[int]] = {}
    for index, group in enumerate(graph.get_all_groups(root_module_types=roots)):
        outs = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        owner.update((m, index) for m in outs)
        reached = {in_set[m] for m in outs if m in in_set}
        if reached:
            sets[index] = reached
    return _TiedGroups(owner, sets)


@dataclass
class _Pick:
    """One group torch-pruning chose channels from, and how many of them the family's constraints let go."""

    group: Any
    component: str
    root: str
    channels: int
    idxs: list[int]
    remove: int
    owner: int | None = None  # its group's index in _TiedGroups.owner
    divisors: list[int] = field(default_factory=list)
    grouped: bool = False
    output: bool = False

    @classmethod
    def of(cls, group: Any, graph: tp.DependencyGraph, component_of: Callable[[str], str],
           hints: PruningHints, tied: _TiedGroups) -> _Pick:
        root = group[0].dep
        root_name = graph._module2name.get(root.target.module, "?")
        owner = tied.owner.get(root.target.module)
        return cls(
            group=group, component=component_of(f"{root_name}.weight"), root=root_name,
            channels=graph.get_out_channels(root.target.module), idxs=list(group[0].idxs),
            remove=len(group[0].idxs), owner=owner,
            divisors=[d for dep, _ in group for layer, d in hints.divisors
                      if dep.target.module is layer and graph.is_in_channel_pruning_fn(dep.handler)],
            grouped=any(is_grouped(dep.target.module) for dep, _ in group),
            output=any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group),
        )


def _constrain(picks: list[_Pick], graph: tp.DependencyGraph, tied: _TiedGroups, importance: Any) -> None:
    """Set each pick's removal to what the output contract, the tied sets and the divisors allow.

    A tied union (tied sets joined by the groups that span them) removes, from
    each of its groups, the mean of what torch-pruning picked from them (rounded
    down), so the union as a whole loses what the global ranking chose for it;
    nothing when torch-pruning left any of its groups out (ignored, capped by
    ``max_layer_ratio``, unscorable) or one of them is grouped.  Other groups
    round their picks down to a multiple of their divisors.
    """
    for pick in picks:
        if pick.output:
            pick.remove = 0
    by_owner = {pick.owner: pick for pick in picks if pick.owner in tied.sets}
    for members in _unions(tied.sets):
        chosen = [by_owner.get(index) for index in members]
        if any(pick is None or pick.output or pick.grouped for pick in chosen):
            remove = 0
        else:
            remove = sum(pick.remove for pick in chosen) // len(chosen)
            remove -= remove % _lcm([d for pick in chosen for d in pick.divisors])
        for pick in chosen:
            if pick is not None:
                pick.remove = min(remove, pick.channels - 1)
    for pick in picks:
        if pick.owner not in tied.sets:
            pick.remove -= pick.remove % _lcm(pick.divisors)
        if pick.remove == len(pick.idxs):
            continue  # torch-pruning's own picks
        if pick.grouped or pick.remove <= 0:  # grouped: torch-pruning's picks are whole blocks; keep them or none
            pick.remove, pick.idxs = 0, []
            continue
        # The least important channels of the group, scored on the whole group as the pruner scored them
        # (a subset of its picks when fewer, its picks and the next ones when more).
        root = pick.group[0].dep
        imp = importance(graph.get_pruning_group(root.target.module, root.handler, list(range(pick.channels))))
        if imp is None:
            pick.remove, pick.idxs = 0, []
            continue
        pick.idxs = sorted(torch.argsort(imp, stable=True)[: pick.remove].tolist())


def _unions(sets: dict[int, set[int]]) -> list[list[int]]:
    """The groups (indices) of each tied union: groups whose tied sets are joined, directly or through others."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for reached in sets.values():
        first, *others = sorted(reached)
        for other in others:
            parent[find(other)] = find(first)
    unions: dict[int, list[int]] = {}
    for index, reached in sorted(sets.items()):
        unions.setdefault(find(min(reached)), []).append(index)
    return list(unions.values())


def _execute(graph: tp.DependencyGraph, picks: list[_Pick]) -> list[PrunedGroup]:
    names = graph._module2name
    done = []
    for pick in picks:
        if pick.remove <= 0:
            continue
        pruned = prune_group(graph, names, pick.group[0].dep, list(pick.idxs), pick.component, pick.root,
                             pick.channels)
        if pruned is not None:
            done.append(pruned)
    return done


def _lcm(values: Sequence[int]) -> int:
    return math.lcm(*values) if values else 1


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [GlobalPrune]
