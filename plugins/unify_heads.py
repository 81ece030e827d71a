"""unify_heads: one 1x1 conv per level for class, box and landmark outputs (SharedMultiHead).

A level's three 1x1 convs read the same feature map, so stacking their weights
(and biases) along the output axis gives one conv whose output channels are the
three outputs side by side.  Output channels of a conv do not interact, so the
pass is lossless and the parameter count is unchanged (6,240 on the baseline):
the gain is one conv launch per level instead of three.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor import Pass, hookimpl
from compressor.passes import PassContext
from featherface.modules.heads import (
    BOX_OUTPUTS,
    CLASS_OUTPUTS,
    LANDMARK_OUTPUTS,
    SeparateHeads,
    UnifiedHeads,
)


def _plain_1x1(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None)


def head_problems(heads: nn.Module) -> list[str]:
    """Why ``heads`` cannot be unified; empty when it can."""
    if isinstance(heads, UnifiedHeads):
        return ["model.heads is already UnifiedHeads (unify_heads was applied before)"]
    if not isinstance(heads, SeparateHeads):
        return [f"model.heads is a {type(heads).__name__}, not SeparateHeads"]
    problems = []
    a = heads.num_anchors
    for level, convs in enumerate(zip(heads.class_convs, heads.box_convs, heads.landmark_convs)):
        expected = (a * CLASS_OUTPUTS, a * BOX_OUTPUTS, a * LANDMARK_OUTPUTS)
        if not all(_plain_1x1(conv) for conv in convs):
            problems.append(f"level {level}: a head conv is not a plain 1x1 conv with bias")
        elif tuple(conv.out_channels for conv in convs) != expected:
            widths = [c.out_channels for c in convs]
            problems.append(f"level {level}: output widths {widths}, expected {list(expected)}")
        elif len({conv.in_channels for conv in convs}) != 1:
            problems.append(f"level {level}: the three convs read different widths {[c.in_channels for c in convs]}")
    return problems


def unify(heads: SeparateHeads) -> UnifiedHeads:
    """The UnifiedHeads computing exactly what ``heads`` computes, from its weights."""
    in_channels = [conv.in_channels for conv in heads.class_convs]
    reference = heads.class_convs[0].weight if in_channels else None
    unified = UnifiedHeads(in_channels, heads.num_anchors)
    if reference is not None:
        unified.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        for conv, parts in zip(unified.convs, zip(heads.class_convs, heads.box_convs, heads.landmark_convs)):
            # Same block order as UnifiedHeads.forward splits them: class, box, landmark.
            conv.weight.copy_(torch.cat([p.weight for p in parts], 0))
            conv.bias.copy_(torch.cat([p.bias for p in parts], 0))
    unified.train(heads.training)
    return unified


class UnifyHeads(Pass):
    """Merge each level's class, box and landmark 1x1 convs into one conv (lossless, same parameters)."""

    name = "unify_heads"
    lossless = True

    def check(self, model: nn.Module, params: Any, ctx: PassContext) -> None:
        problems = head_problems(getattr(model, "heads", None))
        if problems:
            raise ValueError("; ".join(problems))

    def apply(self, model: nn.Module, params: Any, ctx: PassContext) -> nn.Module:
        model.heads = unify(model.heads)
        return model


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [UnifyHeads]
