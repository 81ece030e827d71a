"""Detection heads: per level 1x1 convs for class logits, boxes and landmarks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..spec import register

CLASS_OUTPUTS, BOX_OUTPUTS, LANDMARK_OUTPUTS = 2, 4, 10


def flatten_level(x: Tensor, per_anchor: int) -> Tensor:
    """N x (A*k) x h x w -> N x (h*w*A) x k, in the prior order (row, column, anchor)."""
    n = x.shape[0]
    return x.permute(0, 2, 3, 1).reshape(n, -1, per_anchor)


@register
class SeparateHeads(nn.Module):
    """The original layout: one class, one box and one landmark conv per level."""

    def __init__(self, in_channels: list[int], num_anchors: int = 2) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.class_convs = nn.ModuleList(nn.Conv2d(c, num_anchors * CLASS_OUTPUTS, 1) for c in in_channels)
        self.box_convs = nn.ModuleList(nn.Conv2d(c, num_anchors * BOX_OUTPUTS, 1) for c in in_channels)
        self.landmark_convs = nn.ModuleList(nn.Conv2d(c, num_anchors * LANDMARK_OUTPUTS, 1) for c in in_channels)

    def spec_args(self) -> dict:
        return {"in_channels": [conv.in_channels for conv in self.class_convs], "num_anchors": self.num_anchors}

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        boxes = torch.cat([flatten_level(conv(f), BOX_OUTPUTS) for conv, f in zip(self.box_convs, features)], 1)
        logits = torch.cat([flatten_level(conv(f), CLASS_OUTPUTS) for conv, f in zip(self.class_convs, features)], 1)
        landmarks = torch.cat(
            [flatten_level(conv(f), LANDMARK_OUTPUTS) for conv, f in zip(self.landmark_convs, features)], 1
        )
        return boxes, logits, landmarks


PER_ANCHOR = CLASS_OUTPUTS + BOX_OUTPUTS + LANDMARK_OUTPUTS


@register
class UnifiedHeads(nn.Module):
    """One 1x1 conv per level for class, box and landmark outputs together (SharedMultiHead).

    Each conv's output channels are ``[class (A*2) | box (A*4) | landmark (A*10)]``,
    every block in the separate convs' own channel order, so the concatenation of
    a level's three separate convs is this conv, exactly: output channels of a
    conv are independent of each other.  Input widths may differ per level.
    """

    def __init__(self, in_channels: list[int], num_anchors: int = 2) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.convs = nn.ModuleList(nn.Conv2d(c, num_anchors * PER_ANCHOR, 1) for c in in_channels)

    def spec_args(self) -> dict:
        anchors = self.convs[0].out_channels // PER_ANCHOR if len(self.convs) else self.num_anchors
        return {"in_channels": [conv.in_channels for conv in self.convs], "num_anchors": anchors}

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        a = self.num_anchors
        split = [conv(f).split([a * CLASS_OUTPUTS, a * BOX_OUTPUTS, a * LANDMARK_OUTPUTS], dim=1)
                 for conv, f in zip(self.convs, features)]
        boxes = torch.cat([flatten_level(box, BOX_OUTPUTS) for _, box, _ in split], 1)
        logits = torch.cat([flatten_level(cls, CLASS_OUTPUTS) for cls, _, _ in split], 1)
        landmarks = torch.cat([flatten_level(lm, LANDMARK_OUTPUTS) for _, _, lm in split], 1)
        return boxes, logits, landmarks
