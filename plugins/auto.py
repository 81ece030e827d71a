"""The ``auto`` pass: prune every component as much as the budget needs, where it hurts least.

Given only a parameter target, it decides how much each component gives:

1. **Sensitivity.** Each prunable component is pruned alone (a copy, with the
   ``prune`` pass) at each candidate ratio, and the damage is measured on real
   inputs from the run's data: the family's distillation loss of the pruned
   model against the unpruned one (what the finetuning after the stage then
   has to undo, weighed as without labels so the priors that see faces
   count), or, for a family without training support, the relative
   squared change of the outputs.  The parameters each option removes are
   counted, not estimated.  Pruning more of a component cannot do less
   damage than pruning less of it: where the measurement dips at a larger
   ratio (it saturates once a component is cut badly, and 8 images are few),
   the allocation uses the running maximum over the ratios (``damage``; the
   measurement itself is kept as ``measured``).
2. **Allocation.** One ratio per component (or none) such that the removed
   parameters reach the target at the least total damage: a multiple-choice
   knapsack, solved exactly by :func:`allocate` over the Pareto front of
   (removed, damage) pairs.  Damage is taken as additive across components:
   the usual first-order assumption of sensitivity-based allocation.  At
   equal damage the choice removing the fewest parameters (closest to the
   target) wins: the larger model has more to finetune with.
3. **Check.** The chosen ratios are applied together.  Channels coupled across
   components make the joint count differ from the sum of the single ones; if
   the model is still over the target, the shortfall is added to what must be
   removed and the allocation is solved again.  With ``fit_images``, the cut that
   fits then gets the prune pass's least-squares refit of its narrowed readers
   (the probes' damage is that of the sliced cuts: the refit would multiply the
   search's cost by the number of options).

The record lists the whole sensitivity table and the allocation, and `compress
auto` (plugins/auto_command.py) writes the allocation back as a plain ``prune``
stage, so the decision can be reviewed and re-run.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pydantic
from pydantic import Field
from torch import Tensor, nn

from compressor import Pass, hookimpl
from compressor.accounting import count_parameters
from compressor.passes import PassContext, PassResult
from compressor.validate import forward_eval
from compressor.refit import MAX_FIT_IMAGES, check_fit_images
from compressor_plugins.prune import PrunedGroup, PruneParams, prunable_components, prune_model, refit_readers

#: Steps of 0.05: a coarser grid overshoots the target by up to a step of the largest component.
DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 15))  # 0.05 ... 0.7
#: Real inputs the damage is measured on (a batch, with the family's preprocessing).
SAMPLE_IMAGES = 8
#: Re-solves allowed when coupled channels leave the joint pruning over the target.
MAX_ROUNDS = 8


class AutoParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    target: int = Field(..., ge=1, description="Total parameters (counted once per tensor) to end at or below.")
    ratios: list[float] = Field(
        list(DEFAULT_RATIOS), min_length=1, max_length=50,
        description="Candidate fractions of a component's channels to remove (each 0 < r < 1).",
    )
    components: list[str] | None = Field(
        None, description="The components it may prune (default: every prunable one).",
    )
    importance: Literal["magnitude", "bn_scale", "taylor"] = Field(
        "magnitude", description="How channels are ranked within a group, as in the prune pass.",
    )
    round_to: int | None = Field(None, ge=1, description="Keep pruned channel counts a multiple of this.")
    fit_images: int = Field(
        0, ge=0, le=MAX_FIT_IMAGES,
        description="Refit the narrowed readers of the chosen cut on this many of the run's images, as the prune "
                    "pass's fit_images does (the sensitivity probes stay sliced, to keep the search cheap); 0: none.",
    )

    @pydantic.field_validator("ratios")
    @classmethod
    def _fractions(cls, ratios: list[float]) -> list[float]:
        bad = [r for r in ratios if not 0 < r < 1]
        if bad:
            raise ValueError(f"each ratio must lie strictly between 0 and 1, got {bad[0]}")
        return sorted(set(ratios))


@dataclass(frozen=True)
class Option:
    """Pruning ``component`` by ``ratio`` alone removes ``removed`` parameters and does ``damage`` (what the
    allocation uses); ``measured``: the damage as measured, when ``damage`` was raised to keep it monotone."""

    component: str
    ratio: float
    removed: int
    damage: float
    measured: float | None = None


def monotone(options: list[Option]) -> list[Option]:
    """Each component's damage raised to its running maximum over increasing ratios (order kept)."""
    worst: dict[str, float] = {}
    raised: dict[tuple[str, float], Option] = {}
    for option in sorted(options, key=lambda o: (o.component, o.ratio)):
        floor = worst.get(option.component, float("-inf"))
        if option.damage < floor:
            option = Option(option.component, option.ratio, option.removed, floor, measured=option.damage)
        worst[option.component] = option.damage
        raised[(option.component, option.ratio)] = option
    return [raised[(o.component, o.ratio)] for o in options]


def allocate(options: list[Option], need: int) -> dict[str, float] | None:
    """At most one option per component, removing at least ``need`` parameters, at the least total damage.

    Exact: the partial choices are kept as a Pareto front of (removed, damage)
    and extended component by component; a choice removing fewer parameters at
    more damage than another is dropped.  Ties in damage go to the choice that
    removes less (closest to ``need``).  None when even the largest options
    together remove too little.
    """
    by_component: dict[str, list[Option]] = {}
    for option in options:
        by_component.setdefault(option.component, []).append(option)
    # (removed, damage, chosen options); the empty choice first.
    front: list[tuple[int, float, tuple[Option, ...]]] = [(0, 0.0, ())]
    for component_options in by_component.values():
        grown = list(front)
        for removed, damage, chosen in front:
            grown += [(removed + o.removed, damage + o.damage, (*chosen, o)) for o in component_options]
        front = _pareto(grown)
    feasible = [entry for entry in front if entry[0] >= need]
    if not feasible:
        return None
    _, _, chosen = min(feasible, key=lambda entry: (entry[1], entry[0]))
    return {option.component: option.ratio for option in chosen}


def _pareto(entries: list[tuple[int, float, tuple[Option, ...]]]) -> list[tuple[int, float, tuple[Option, ...]]]:
    """The entries no other entry beats: one removing more at less damage, or exactly as much at no more.
    An entry removing less at equal damage stays: it may end closer to the target."""
    kept: list[tuple[int, float, tuple[Option, ...]]] = []
    best_damage = float("inf")
    last_removed = None
    # Most removed first: an entry survives when no entry removing more is cheaper, once per removed count.
    for entry in sorted(entries, key=lambda e: (-e[0], e[1])):
        if entry[0] != last_removed and entry[1] <= best_damage:
            kept.append(entry)
            best_damage = entry[1]
            last_removed = entry[0]
    return kept


def damage(family: Any, reference: Any, outputs: Any) -> float:
    """How far ``outputs`` are from ``reference``: the family's distillation loss, else the relative squared change."""
    if family.supports_training:
        # Weighed as when the teacher is the only signal: pruning damage shows on the few priors
        # that see a face, which an average over every prior would drown.
        return float(family.distillation_loss(outputs, reference, temperature=1.0, without_labels=True)["loss"])
    pairs = list(zip(_tensors(outputs), _tensors(reference)))
    return sum(float((o - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-12)) for o, r in pairs) / max(len(pairs), 1)


def _tensors(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    return [t for item in outputs for t in _tensors(item)]


class Auto(Pass):
    """Prune each component by the ratio that reaches a parameter target at the least measured damage."""

    name = "auto"
    Params = AutoParams

    def check(self, model: nn.Module, params: Any, ctx: PassContext) -> None:
        check_fit_images(params.fit_images, ctx.sample_inputs)
        prunable = prunable_components(model, ctx.family)
        for component in params.components or []:
            if component not in prunable:
                raise ValueError(f"components: {component!r} cannot be pruned here (prunable: {', '.join(prunable)})")

    def apply(self, model: nn.Module, params: Any, ctx: PassContext) -> PassResult:
        components = params.components or prunable_components(model, ctx.family)
        start = count_parameters(model).total
        record: dict[str, Any] = {"target": params.target, "start": start}
        if start <= params.target:
            return PassResult(model, {**record, "allocation": {}, "note": "already within the target"})
        inputs = _inputs(ctx)
        reference = forward_eval(model, inputs)
        options = monotone([self._probe(model, component, ratio, params, ctx, inputs, reference, start)
                            for component in components for ratio in params.ratios])
        record["sensitivity"] = [asdict(option) for option in options]
        need = start - params.target
        for round_ in range(1, MAX_ROUNDS + 1):
            allocation = allocate(options, need)
            if allocation is None:
                raise ValueError(f"target: {params.target:,} parameters cannot be reached from {start:,} with ratios "
                                 f"up to {max(params.ratios)} on {', '.join(components)}")
            pruned, done = _pruned(model, allocation, params, ctx)
            total = count_parameters(pruned).total
            if total <= params.target:
                chosen = [o for o in options if allocation.get(o.component) == o.ratio]
                if params.fit_images:  # ``model`` is untouched: the reference the chosen cut's readers fit
                    record["fit_relative_error"] = refit_readers(pruned, model, done,
                                                                 ctx.sample_inputs(params.fit_images))
                return PassResult(pruned, {**record, "allocation": allocation, "params": total, "rounds": round_,
                                           "predicted_damage": sum(o.damage for o in chosen),
                                           "damage": damage(ctx.family, reference, forward_eval(pruned, inputs)),
                                           "measured_on": "sample inputs" if ctx.sample_inputs else "example input"})
            need += total - params.target  # coupled channels: the joint pruning removed less than the sum
        raise ValueError(f"target: still over {params.target:,} parameters after {MAX_ROUNDS} allocations "
                         f"({total:,}); give larger ratios")

    def _probe(self, model: nn.Module, component: str, ratio: float, params: AutoParams, ctx: PassContext,
               inputs: Tensor, reference: Any, start: int) -> Option:
        pruned, _ = _pruned(model, {component: ratio}, params, ctx)
        return Option(component, ratio, start - count_parameters(pruned).total,
                      damage(ctx.family, reference, forward_eval(pruned, inputs)))


def _pruned(model: nn.Module, ratios: dict[str, float], params: AutoParams,
            ctx: PassContext) -> tuple[nn.Module, list[PrunedGroup]]:
    """A copy of ``model`` pruned by ``ratios`` in one application of the prune pass (sliced), and what it removed."""
    candidate = copy.deepcopy(model)
    done = prune_model(candidate, PruneParams(ratios=ratios, importance=params.importance, round_to=params.round_to),
                       ctx)
    return candidate, done


def _inputs(ctx: PassContext) -> Tensor:
    if ctx.sample_inputs is not None:
        return ctx.sample_inputs(SAMPLE_IMAGES)
    return ctx.example_input.to(ctx.device)


def prune_params(record: dict[str, Any], params: AutoParams) -> dict[str, Any]:
    """The ``prune`` stage params that redo what an ``auto`` application with ``record`` did."""
    resolved: dict[str, Any] = {"ratios": dict(record["allocation"]), "importance": params.importance}
    if params.round_to is not None:
        resolved["round_to"] = params.round_to
    if params.fit_images:
        resolved["fit_images"] = params.fit_images
    return resolved


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [Auto]
