"""shared_cbam: SharedCBAMManager, one spatial gate for all CBAMs, one channel gate per width.

Sharing is done by handing several CBAMs the very same gate instance, so the
parameter count drops by what the duplicates held, ``facedet.spec.to_spec``
writes the later uses as refs, and a checkpoint reloads them shared.

The shared gate starts from the average of the gates it replaces, taken per
CBAM (a gate already shared by k of them weighs k times): every weight and
bias, and for the spatial gate's BN the affine parameters and the running
statistics.  Averaging the running means and the running variances is an
approximation: it is not the statistics of the pooled inputs (that variance
would add the spread of the means), and no single set of statistics matches
every place the gate now serves; the runner measures the drift, finetuning
recalibrates.  Hidden units of different MLPs are averaged position by
position, without aligning them first.

Only gates of the same structure can be averaged: a group whose members differ
(hidden width, biases, kernel size) is refused in ``check`` with their names.
"""

from __future__ import annotations

import copy

import pydantic
import torch
from pydantic import Field
from torch import Tensor, nn

from compressor import Pass, hookimpl
from compressor.passes import PassContext
from compressor_plugins.cbam_plus import NO_CBAM, cbam_paths, check_targets_given, resolve_targets


class SharedCBAMParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    share_spatial: bool = Field(True, description="One spatial gate (7x7 conv + BN) for all target CBAMs.")
    share_channel: bool = Field(
        True, description="One channel gate per channel count among the target CBAMs (here: the 64-channel ones).")
    targets: list[str] | None = Field(
        None, description="CBAM module paths taking part, at least two (e.g. backbone_cbam.0, bifpn_cbam.2); "
                          "all CBAMs when left out.")

    @pydantic.field_validator("targets")
    @classmethod
    def _at_least_two(cls, targets: list[str] | None) -> list[str] | None:
        check_targets_given(targets)
        if targets is not None and len(set(targets)) < 2:
            raise ValueError(f"sharing needs at least two CBAMs, got {targets}")
        return targets

    @pydantic.model_validator(mode="after")
    def _something_to_share(self) -> SharedCBAMParams:
        if not (self.share_spatial or self.share_channel):
            raise ValueError("share_spatial and share_channel are both false: nothing to share")
        return self


def gate_groups(model: nn.Module, paths: list[str], params: SharedCBAMParams) -> list[tuple[str, list[str]]]:
    """(gate attribute, CBAM paths) for every group that will share one gate; groups of one are left out."""
    groups: list[tuple[str, list[str]]] = []
    if params.share_spatial and len(paths) > 1:
        groups.append(("spatial_gate", list(paths)))
    if params.share_channel:
        by_width: dict[int, list[str]] = {}
        for path in paths:
            by_width.setdefault(model.get_submodule(path).channels, []).append(path)
        groups.extend(("channel_gate", members) for members in by_width.values() if len(members) > 1)
    return groups


def _args(gate: nn.Module) -> dict:
    spec_args = getattr(gate, "spec_args", None)
    return spec_args() if callable(spec_args) else {}


def _structure(gate: nn.Module) -> tuple:
    # The spec args name the difference for the user; the shapes catch what they do not say.
    return (type(gate).__name__, repr(sorted(_args(gate).items())),
            tuple((k, tuple(v.shape), v.dtype) for k, v in gate.state_dict().items()))


def _describe(gate: nn.Module) -> str:
    args = _args(gate)
    return f"{type(gate).__name__}({', '.join(f'{k}={v}' for k, v in args.items())})"


def group_problem(model: nn.Module, attribute: str, members: list[str]) -> str | None:
    """Why the gates of ``members`` cannot be averaged into one; None when they can."""
    gates = [getattr(model.get_submodule(path), attribute) for path in members]
    if len({_structure(gate) for gate in gates}) == 1:
        return None
    param = "share_spatial" if attribute == "spatial_gate" else "share_channel"
    found = "; ".join(f"{path}: {_describe(gate)}" for path, gate in zip(members, gates))
    return f"params.{param}: cannot average the {attribute.replace('_', ' ')}s of {', '.join(members)}, " \
           f"they differ ({found})"


def average_state(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean of same-shaped state_dicts; integer counters take their maximum."""
    averaged = {}
    for key, first in states[0].items():
        stacked = torch.stack([state[key] for state in states])
        averaged[key] = stacked.mean(0) if first.is_floating_point() else stacked.max(0).values
    return averaged


def shared_gate(gates: list[nn.Module]) -> nn.Module:
    """One gate of the members' structure holding their average (device, dtype and mode of the first)."""
    shared = copy.deepcopy(gates[0])
    shared.load_state_dict(average_state([gate.state_dict() for gate in gates]))
    return shared


class SharedCBAM(Pass):
    """SharedCBAMManager: one spatial gate for all CBAMs and one channel gate per channel count, averaged."""

    name = "shared_cbam"
    Params = SharedCBAMParams

    def applies_to(self, model: nn.Module) -> str | None:
        count = len(cbam_paths(model))
        if count == 0:
            return NO_CBAM
        return "the model has a single CBAM module: there is nothing to share its gates with" if count == 1 else None

    def check(self, model: nn.Module, params: SharedCBAMParams, ctx: PassContext) -> None:
        paths = resolve_targets(model, params.targets)
        if len(paths) < 2:
            raise ValueError(f"params.targets: sharing needs at least two CBAMs, got {paths}")
        groups = gate_groups(model, paths, params)
        if not groups:
            raise ValueError(f"params.share_channel: no two of {', '.join(paths)} have the same channel count, "
                             "and share_spatial is false: nothing to share")
        for attribute, members in groups:
            problem = group_problem(model, attribute, members)
            if problem:
                raise ValueError(problem)

    def apply(self, model: nn.Module, params: SharedCBAMParams, ctx: PassContext) -> nn.Module:
        paths = resolve_targets(model, params.targets)
        with torch.no_grad():
            for attribute, members in gate_groups(model, paths, params):
                cbams = [model.get_submodule(path) for path in members]
                shared = shared_gate([getattr(cbam, attribute) for cbam in cbams])
                for cbam in cbams:
                    setattr(cbam, attribute, shared)
        return model


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [SharedCBAM]
