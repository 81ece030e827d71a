"""bifpn_slim: a narrower and/or shallower BiFPN, carved out of the trained one.

The BiFPN width is one coupled channel group: every level of every cell is fused
with the others, the residual CBAMs on the BiFPN outputs gate those channels,
and the SSH modules' first convs read them.  So one set of kept channels is
chosen for the whole group and every layer in it is sliced with that set.

Slicing keeps the trained weights but not what the SSH modules see: a narrower,
shallower BiFPN feeds them other features.  With ``fit_images`` > 0 the plain
SSH convs that read the BiFPN are refitted by least squares (see
:mod:`compressor.refit`) so that, from the new BiFPN's outputs, they reproduce
what they computed before the pass on that many of the run's images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal, TypeVar

import pydantic
import torch
from pydantic import Field
from torch import Tensor, nn

from compressor import Pass, hookimpl
from compressor.passes import PassContext, PassResult
from compressor.refit import MAX_FIT_IMAGES, ConvRefit, fit_reference, refit_convs
from compressor.surgery import batchnorm_keep, conv_keep, l1_importance, linear_keep, top_k
from featherface.modules.bifpn import BiFPNCell, Projection, SeparableConvBN
from featherface.modules.cbam import ChannelGate
from facedet.modules.deform import DeformableConv2d
from facedet.modules.ssh import SSH, ConvBN

PROJECTIONS = ("p3_down_channel", "p4_down_channel", "p5_down_channel", "p4_down_channel_2", "p5_down_channel_2")
SEPARABLES = ("conv4_up", "conv3_up", "conv4_down", "conv5_down")
# The SSH convs that read the BiFPN output directly; the others read SSH-internal channels.
SSH_INPUT_UNITS = ("conv3x3", "conv5x5_1")

T = TypeVar("T")


class BiFPNSlimParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    channels: int | None = Field(
        None, ge=1, description="New BiFPN width, shared by every level and cell (e.g. 64 -> 32), at least 1 and at most "
                          "the current width; empty keeps the width.")
    cells: int | None = Field(
        None, ge=1, description="BiFPN cells to keep (at least 1): the first (it holds the backbone projections) and "
                          "the last cells-1 of the others (e.g. 3 -> 2 keeps cells 0 and 2); empty keeps them all.")
    importance: Literal["l1", "bn"] = Field(
        "l1", description="Channel ranking: 'l1' sums every group layer's L1 weight on the channel (each layer "
                          "normalised to mean 1); 'bn' sums |gamma| of the BNs that produce the channel.")
    fit_images: int = Field(
        0, ge=0, le=MAX_FIT_IMAGES,
        description="Refit the plain SSH convs that read the BiFPN by least squares, to reproduce their outputs "
                    f"before the pass on this many of the run's images (at most {MAX_FIT_IMAGES}); "
                                     "0: sliced weights only.")


class BiFPNSlim(Pass):
    """Narrow the BiFPN width and/or drop BiFPN cells, keeping trained weights of the kept channels."""

    name = "bifpn_slim"
    Params = BiFPNSlimParams

    def applies_to(self, model: nn.Module) -> str | None:
        cells = getattr(model, "bifpn", None)
        if isinstance(cells, nn.ModuleList) and any(isinstance(c, BiFPNCell) for c in cells):
            return None
        return "the model has no BiFPN cells"

    def check(self, model: nn.Module, params: BiFPNSlimParams, ctx: PassContext) -> None:
        cells = list(model.bifpn)
        if not cells or not all(isinstance(c, BiFPNCell) for c in cells) or not cells[0].first:
            raise ValueError("model: bifpn_slim needs a stack of BiFPN cells whose first cell holds the projections")
        if params.cells is not None and params.cells > len(cells):
            raise ValueError(f"cells: {params.cells} is outside 1..{len(cells)} (the model has {len(cells)} cells)")
        width = cells[0].channels
        if params.channels is not None:
            if params.channels > width:
                raise ValueError(f"channels: {params.channels} is outside 1..{width} (the current BiFPN width)")
            if params.channels < width:
                _check_group_is_sliceable(model)

    def apply(self, model: nn.Module, params: BiFPNSlimParams, ctx: PassContext) -> PassResult:
        before = {"channels": model.bifpn[0].channels, "cells": len(model.bifpn)}
        reference = fit_reference(model, params.fit_images, ctx.sample_inputs)
        if params.cells is not None:
            model.bifpn = nn.ModuleList(model.bifpn[i] for i in kept_cells(len(model.bifpn), params.cells))
        # Ranked after dropping cells, so that removed layers do not vote for channels.
        if params.channels is not None and params.channels < model.bifpn[0].channels:
            keep = top_k(group_importance(model, params.importance), params.channels)
            slice_group(model, keep)
        after = {"channels": model.bifpn[0].channels, "cells": len(model.bifpn)}
        record = {"before": before, "after": after}
        if reference is not None:
            record["fit_relative_error"] = refit_ssh_inputs(model, reference, ctx.sample_inputs(params.fit_images))
        return PassResult(model, record)


def refit_ssh_inputs(model: nn.Module, reference: nn.Module, images: Tensor) -> dict[str, dict[str, float]]:
    """Refit every plain SSH input conv of ``model`` to reproduce ``reference``'s; errors by ``ssh.<level>.<unit>``."""
    pairs: dict[int, tuple[str, nn.Conv2d, nn.Module]] = {}
    for level, (new, old) in enumerate(zip(model.ssh, reference.ssh)):
        for name in SSH_INPUT_UNITS:
            conv = getattr(new, name).conv
            if isinstance(conv, nn.Conv2d) and conv.groups == 1 and id(conv) not in pairs:
                pairs[id(conv)] = (f"ssh.{level}.{name}", conv, getattr(old, name).conv)
    fitted = refit_convs([ConvRefit(conv, old) for _, conv, old in pairs.values()], model, reference, images)
    return {where: error.as_record() for (where, _, _), error in zip(pairs.values(), fitted)}


def kept_cells(count: int, cells: int) -> list[int]:
    """Indices of the cells to keep: the first, whose projections adapt the backbone widths and
    cannot go, and the last ``cells - 1``, whose outputs the CBAMs and SSH were trained on."""
    return [0, *range(count - (cells - 1), count)]


def _check_group_is_sliceable(model: nn.Module) -> None:
    """Refuse, before any weight is touched, group members whose slicing would break something else."""
    outside = {id(cbam.channel_gate) for cbam in model.backbone_cbam}
    for index, cbam in enumerate(model.bifpn_cbam):
        gate = cbam.channel_gate
        if not isinstance(gate, ChannelGate):
            raise ValueError(f"channels: bifpn_cbam[{index}] has no channel gate this pass can slice")
        if gate.fc1.out_features < 1:
            raise ValueError(f"channels: bifpn_cbam[{index}]'s channel gate has no hidden unit left")
        if id(gate) in outside:
            raise ValueError(f"channels: bifpn_cbam[{index}]'s channel gate is shared with a backbone CBAM, "
                             "whose width would have to change too")
    for index, ssh in enumerate(model.ssh):
        if not isinstance(ssh, SSH):
            raise ValueError(f"channels: ssh[{index}] is a {type(ssh).__name__}, whose inputs this pass cannot slice")
        for name in SSH_INPUT_UNITS:
            conv = getattr(ssh, name).conv
            if isinstance(conv, nn.Conv2d) and conv.groups != 1:
                raise ValueError(f"channels: ssh[{index}].{name} is a grouped conv; narrow the BiFPN before "
                                 "grouping the SSH convs (ssh_slim conv=grouped)")


def distinct(items: Iterable[T]) -> Iterator[T]:
    """Each object once: shared modules must be scored and sliced once, not once per holder."""
    seen: set[int] = set()
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            yield item


def _projections(model: nn.Module) -> list[Projection]:
    return [getattr(cell, name) for cell in model.bifpn if cell.first for name in PROJECTIONS]


def _separables(model: nn.Module) -> list[SeparableConvBN]:
    return [getattr(cell, name) for cell in model.bifpn for name in SEPARABLES]


def _gates(model: nn.Module) -> list[ChannelGate]:
    return list(distinct(cbam.channel_gate for cbam in model.bifpn_cbam))


def _ssh_input_units(model: nn.Module) -> list[ConvBN]:
    return list(distinct(getattr(ssh, name) for ssh in model.ssh for name in SSH_INPUT_UNITS))


def _input_convs(unit: ConvBN) -> list[nn.Conv2d]:
    """The plain convs inside an SSH unit that read its input (a DCN has three)."""
    conv = unit.conv
    if isinstance(conv, DeformableConv2d):
        return [conv.offset_conv, conv.modulator_conv, conv.regular_conv]
    return [conv]


def _group_weights(model: nn.Module) -> list[tuple[Tensor, int]]:
    """(weight, dim along which the group's channels lie) for every layer touching the group."""
    weights: list[tuple[Tensor, int]] = [(p.conv.weight, 0) for p in distinct(_projections(model))]
    for block in distinct(_separables(model)):
        weights += [(block.depthwise.weight, 0), (block.pointwise.weight, 0), (block.pointwise.weight, 1)]
    for gate in _gates(model):
        weights += [(gate.fc1.weight, 1), (gate.fc2.weight, 0)]
    for unit in _ssh_input_units(model):
        weights += [(conv.weight, 1) for conv in _input_convs(unit)]
    return weights


def group_importance(model: nn.Module, importance: str) -> Tensor:
    """One score per BiFPN channel, summed over the whole coupled group."""
    if importance == "bn":
        bns = [p.bn for p in distinct(_projections(model))] + [b.bn for b in distinct(_separables(model))]
        return torch.stack([bn.weight.detach().abs() for bn in bns]).sum(dim=0)
    # Each layer normalised to mean 1: otherwise the wide SSH convs (32 x 9 weights
    # per input channel) would outvote the BiFPN's own depthwise layers (9 weights).
    scores = [l1_importance(weight, dim) for weight, dim in _group_weights(model)]
    return torch.stack([s / s.mean().clamp_min(1e-12) for s in scores]).sum(dim=0)


def slice_group(model: nn.Module, keep: Tensor) -> None:
    """Keep only the channels ``keep`` in every layer of the BiFPN channel group, in place."""
    for projection in distinct(_projections(model)):
        _slice_projection(projection, keep)
    for block in distinct(_separables(model)):
        _slice_separable(block, keep)
    for gate in _gates(model):
        _slice_gate(gate, keep)
    for unit in _ssh_input_units(model):
        _slice_ssh_input(unit, keep)


def _slice_projection(projection: Projection, keep: Tensor) -> None:
    projection.conv = conv_keep(projection.conv, out_index=keep)
    projection.bn = batchnorm_keep(projection.bn, keep)


def _slice_separable(block: SeparableConvBN, keep: Tensor) -> None:
    # The same index on both sides of the depthwise conv keeps it depthwise.
    block.depthwise = conv_keep(block.depthwise, keep, keep)
    block.pointwise = conv_keep(block.pointwise, keep, keep)
    block.bn = batchnorm_keep(block.bn, keep)


def _slice_gate(gate: ChannelGate, keep: Tensor) -> None:
    # The hidden width stays: only the channels the gate reads and writes go.
    gate.fc1 = linear_keep(gate.fc1, in_index=keep)
    gate.fc2 = linear_keep(gate.fc2, out_index=keep)


def _slice_ssh_input(unit: ConvBN, keep: Tensor) -> None:
    conv = unit.conv
    if isinstance(conv, DeformableConv2d):
        # Offsets and modulation are predicted from the same input, so they lose the same channels.
        conv.offset_conv = conv_keep(conv.offset_conv, in_index=keep)
        conv.modulator_conv = conv_keep(conv.modulator_conv, in_index=keep)
        conv.regular_conv = conv_keep(conv.regular_conv, in_index=keep)
    else:
        unit.conv = conv_keep(conv, in_index=keep)


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [BiFPNSlim]
