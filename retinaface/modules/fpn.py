"""RetinaFace's feature pyramid: 1x1 laterals, top-down nearest upsampling, 3x3 merges."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from facedet.modules.backbone import ConvBNLeaky
from facedet.spec import register


@register
class FPN(nn.Module):
    """Top-down pyramid over the body's levels (finest first).

    Level ``i``'s lateral is a 1x1 conv + BN + LeakyReLU(0.1) to
    ``lateral_channels[i]``.  From the coarsest level down, each coarser output
    is upsampled (nearest) to the finer level's exact size, so inputs of any
    size work, added to the finer lateral, and merged by a 3x3 conv + BN +
    LeakyReLU(0.1) to ``merge_channels[i]``; the coarsest level has no merge.
    The addition ties widths: ``lateral_channels[i]`` must equal the width of
    the coarser output added to it.  Widths are explicit per layer so a pruned
    pyramid can describe itself.
    """

    def __init__(self, in_channels: list[int], lateral_channels: list[int], merge_channels: list[int]) -> None:
        super().__init__()
        if len(lateral_channels) != len(in_channels) or len(merge_channels) != len(in_channels) - 1:
            raise ValueError(f"{len(in_channels)} levels need {len(in_channels)} lateral and "
                             f"{len(in_channels) - 1} merge widths")
        outputs = [*merge_channels, lateral_channels[-1]]
        for level in range(len(merge_channels)):
            if lateral_channels[level] != outputs[level + 1]:
                raise ValueError(f"level {level}: lateral width {lateral_channels[level]} cannot be added to the "
                                 f"coarser level's output width {outputs[level + 1]}")
        self.lateral = nn.ModuleList(ConvBNLeaky(c, w, kernel_size=1) for c, w in zip(in_channels, lateral_channels))
        self.merge = nn.ModuleList(ConvBNLeaky(c, w) for c, w in zip(lateral_channels, merge_channels))

    @property
    def out_channels(self) -> list[int]:
        return [*(m.conv.out_channels for m in self.merge), self.lateral[-1].conv.out_channels]

    def spec_args(self) -> dict:
        return {
            "in_channels": [layer.conv.in_channels for layer in self.lateral],
            "lateral_channels": [layer.conv.out_channels for layer in self.lateral],
            "merge_channels": [layer.conv.out_channels for layer in self.merge],
        }

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        laterals = [layer(f) for layer, f in zip(self.lateral, features)]
        outputs = [laterals[-1]]
        for level in range(len(self.merge) - 1, -1, -1):
            finer = laterals[level]
            coarser = F.interpolate(outputs[0], size=finer.shape[-2:], mode="nearest")
            outputs.insert(0, self.merge[level](finer + coarser))
        return outputs
