"""cbam_plus: CBAM_Plus, a narrower channel MLP without biases, built from the trained CBAM.

Each chosen CBAM keeps its spatial gate (7x7 conv + BN) as it is and gets a
channel gate of hidden width ``max(channels // reduction_ratio, min_hidden)``
(never wider than it is now: units cannot be added from trained weights).

Which hidden units survive: unit j is scored ``||fc1.weight[j]||_1 *
||fc2.weight[:, j]||_1``.  That product bounds the unit's contribution (its
path's gain from an l-inf input to an l1 output, ReLU being 1-Lipschitz), and,
unlike either factor alone, it does not change under the rescaling
``fc1[j] * s, fc2[:, j] / s`` (s > 0) that leaves the function unchanged.

The biases cannot be folded exactly: the bias-free MLP is positively
homogeneous (it maps 0 to 0 and ``a*x`` to ``a*f(x)``), so no choice of its
weights reproduces a constant offset.  They are dropped; the runner measures
the drift.  (A least-squares fold of the biases into the weights, fitted on the
example input, helped on that very input but not on other inputs or sizes, so
it is not done.)
"""

from __future__ import annotations

import pydantic
import torch
from pydantic import Field
from torch import Tensor, nn

from compressor import Pass, hookimpl
from compressor.passes import PassContext
from featherface.modules.cbam import CBAM, ChannelGate
from compressor.surgery import linear_keep, top_k


class CBAMPlusParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    reduction_ratio: int = Field(
        32, ge=1, description="Channel-MLP reduction: hidden width = channels // reduction_ratio "
                              "(at least min_hidden, never more than the current width).")
    min_hidden: int = Field(4, ge=0, description="Smallest hidden width the reduction may leave.")
    targets: list[str] | None = Field(
        None, description="CBAM module paths to change (e.g. backbone_cbam.0, bifpn_cbam.2); all CBAMs when left out.")

    @pydantic.field_validator("targets")
    @classmethod
    def _selects_something(cls, targets: list[str] | None) -> list[str] | None:
        return check_targets_given(targets)


def check_targets_given(targets: list[str] | None) -> list[str] | None:
    """``targets`` as given; ValueError for an empty list (which would select nothing)."""
    if targets is not None and not targets:
        raise ValueError("an empty list selects nothing (leave it out to select every CBAM)")
    return targets


NO_CBAM = "the model has no CBAM modules"


def cbam_paths(model: nn.Module) -> list[str]:
    """Module paths of every CBAM in ``model``, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, CBAM)]


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The CBAM paths a pass should change; ValueError naming ``targets`` for an unknown one."""
    valid = cbam_paths(model)
    if targets is None:
        return valid
    if not targets:
        raise ValueError("params.targets: an empty list selects nothing (leave it out to select every CBAM)")
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise ValueError(f"params.targets: no CBAM at {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return [path for path in valid if path in targets]  # module order, duplicates dropped


def hidden_width(channels: int, reduction_ratio: int, min_hidden: int) -> int:
    return max(channels // reduction_ratio, min_hidden)


def hidden_importance(gate: ChannelGate) -> Tensor:
    """Rescaling-invariant score of each hidden unit (see the module docstring)."""
    return gate.fc1.weight.detach().abs().sum(1) * gate.fc2.weight.detach().abs().sum(0)


def slim_gate(gate: ChannelGate, width: int) -> ChannelGate:
    """A bias-free ChannelGate keeping the ``width`` most important hidden units of ``gate``."""
    keep = top_k(hidden_importance(gate), width)
    new = ChannelGate(gate.fc1.in_features, width, bias=False)
    new.fc1 = linear_keep(gate.fc1, out_index=keep, bias=False)
    new.fc2 = linear_keep(gate.fc2, in_index=keep, bias=False)
    new.train(gate.training)
    return new


class CBAMPlus(Pass):
    """CBAM_Plus: narrower channel MLP (reduction 32 by default) without biases; spatial gate kept."""

    name = "cbam_plus"
    Params = CBAMPlusParams

    def applies_to(self, model: nn.Module) -> str | None:
        return None if cbam_paths(model) else NO_CBAM

    def check(self, model: nn.Module, params: CBAMPlusParams, ctx: PassContext) -> None:
        for path in resolve_targets(model, params.targets):
            gate = model.get_submodule(path).channel_gate
            if type(gate) is not ChannelGate:
                raise ValueError(f"params.targets: {path} has a {type(gate).__name__} channel gate, not a ChannelGate")
            channels = gate.fc1.in_features
            if hidden_width(channels, params.reduction_ratio, params.min_hidden) < 1:
                raise ValueError(
                    f"params.reduction_ratio: {params.reduction_ratio} leaves {path} ({channels} channels) "
                    f"no hidden unit ({channels} // {params.reduction_ratio} = 0 and min_hidden is "
                    f"{params.min_hidden}); use a ratio of at most {channels} or min_hidden >= 1")

    def apply(self, model: nn.Module, params: CBAMPlusParams, ctx: PassContext) -> nn.Module:
        # Keyed by the old gate (held, so its id stays its own), so a gate that
        # several CBAMs share stays shared.
        replaced: dict[int, tuple[ChannelGate, ChannelGate]] = {}
        with torch.no_grad():
            for path in resolve_targets(model, params.targets):
                module = model.get_submodule(path)
                gate = module.channel_gate
                if id(gate) not in replaced:
                    target = hidden_width(gate.fc1.in_features, params.reduction_ratio, params.min_hidden)
                    replaced[id(gate)] = (gate, slim_gate(gate, min(target, gate.fc1.out_features)))
                module.channel_gate = replaced[id(gate)][1]
        return model


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [CBAMPlus]
