"""unify_heads: one 1x1 conv per level for class, box and landmark outputs (SharedMultiHead).

A level's three 1x1 convs read the same feature map, so stacking their weights
(and biases) along the output axis gives one conv whose output channels are the
three outputs side by side.  Output channels of a conv do not interact, so the
pass is lossless and the parameter count is unchanged (6,240 on the baseline):
the gain is one conv launch per level instead of three.

Every :class:`SeparateHeads` in the model is replaced where it sits (found by
type, not by attribute name), so any model holding one can take the pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor import Pass, hookimpl
from compressor.passes import PassContext
from facedet.modules.heads import (
    BOX_OUTPUTS,
    CLASS_OUTPUTS,
    LANDMARK_OUTPUTS,
    SeparateHeads,
    UnifiedHeads,
)


def _plain_1x1(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None)


def head_problems(heads: nn.Module, where: str = "heads") -> list[str]:
    """Why ``heads`` (at module path ``where``) cannot be unified; empty when it can."""
    if isinstance(heads, UnifiedHeads):
        return [f"{where} is already UnifiedHeads (unify_heads was applied before)"]
    if not isinstance(heads, SeparateHeads):
        return [f"{where} is a {type(heads).__name__}, not SeparateHeads"]
    problems = []
    a = heads.num_anchors
    for level, convs in enumerate(zip(heads.class_convs, heads.box_convs, heads.landmark_convs)):
        expected = (a * CLASS_OUTPUTS, a * BOX_OUTPUTS, a * LANDMARK_OUTPUTS)
        if not all(_plain_1x1(conv) for conv in convs):
            problems.append(f"{where} level {level}: a head conv is not a plain 1x1 conv with bias")
        elif tuple(conv.out_channels for conv in convs) != expected:
            widths = [c.out_channels for c in convs]
            problems.append(f"{where} level {level}: output widths {widths}, expected {list(expected)}")
        elif len({conv.in_channels for conv in convs}) != 1:
            problems.append(f"{where} level {level}: the three convs read different widths "
                            f"{[c.in_channels for c in convs]}")
    return problems


def separate_heads(model: nn.Module) -> list[str]:
    """Module paths of every :class:`SeparateHeads` in ``model`` (a shared one at its first path), in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, SeparateHeads)]


def missing_heads(model: nn.Module) -> str | None:
    """Why ``model`` has no SeparateHeads the pass could replace; None when it has."""
    paths = separate_heads(model)
    if not paths:
        unified = [name or "the model" for name, m in model.named_modules() if isinstance(m, UnifiedHeads)]
        if unified:
            return (f"{', '.join(unified)} {'is' if len(unified) == 1 else 'are'} already UnifiedHeads "
                    "(unify_heads was applied before)")
        return "the model has no SeparateHeads to unify"
    if "" in paths:
        return "the model itself is a SeparateHeads: there is no parent to hold the unified heads"
    return None


def model_problems(model: nn.Module) -> list[str]:
    """Why ``model``'s heads cannot be unified; empty when they can."""
    missing = missing_heads(model)
    if missing is not None:
        return [missing]
    return [problem for path in separate_heads(model) for problem in head_problems(model.get_submodule(path), path)]


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

    def applies_to(self, model: nn.Module) -> str | None:
        return missing_heads(model)

    def check(self, model: nn.Module, params: Any, ctx: PassContext) -> None:
        problems = model_problems(model)
        if problems:
            raise ValueError("; ".join(problems))

    def apply(self, model: nn.Module, params: Any, ctx: PassContext) -> nn.Module:
        # Every place that holds a SeparateHeads gets its unified twin (one per instance: sharing stays).
        unified: dict[int, UnifiedHeads] = {}
        for path, module in list(model.named_modules(remove_duplicate=False)):
            if isinstance(module, SeparateHeads) and path:
                if id(module) not in unified:
                    unified[id(module)] = unify(module)
                parent_path, _, attribute = path.rpartition(".")
                setattr(model.get_submodule(parent_path), attribute, unified[id(module)])
        return model


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [UnifyHeads]
