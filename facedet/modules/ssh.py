"""SSH context module with deformable 3x3 convs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..spec import register
from .deform import DeformableConv2d


class ConvBN(nn.Module):
    """A 3x3 conv (deformable, or plain with optional groups), BN, optional LeakyReLU(0.1)."""

    def __init__(self, in_channels: int, out_channels: int, deformable: bool, groups: int, leaky: bool) -> None:
        super().__init__()
        if deformable:
            self.conv: nn.Module = DeformableConv2d(in_channels, out_channels)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.1) if leaky else nn.Identity()

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


@register
class SSH(nn.Module):
    """Three branches with 3x3, 5x5 and 7x7 receptive fields from stacked 3x3 convs.

    Branch widths are explicit so a pruned module can describe itself:
    ``conv3x3: in -> out3x3``; ``conv5x5_1: in -> mid5x5`` (shared by the 5x5 and
    7x7 branches); ``conv5x5_2: mid5x5 -> out5x5``; ``conv7x7_2: mid5x5 -> mid7x7``;
    ``conv7x7_3: mid7x7 -> out7x7``.  Output: ReLU of the concatenation.
    """

    def __init__(
        self,
        in_channels: int,
        out3x3: int = 32,
        mid5x5: int = 16,
        out5x5: int = 16,
        mid7x7: int = 16,
        out7x7: int = 16,
        deformable: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if deformable and groups != 1:
            raise ValueError("grouped convs are only available with deformable=False")
        self.conv3x3 = ConvBN(in_channels, out3x3, deformable, groups, leaky=False)
        self.conv5x5_1 = ConvBN(in_channels, mid5x5, deformable, groups, leaky=True)
        self.conv5x5_2 = ConvBN(mid5x5, out5x5, deformable, groups, leaky=False)
        self.conv7x7_2 = ConvBN(mid5x5, mid7x7, deformable, groups, leaky=True)
        self.conv7x7_3 = ConvBN(mid7x7, out7x7, deformable, groups, leaky=False)

    @property
    def out_channels(self) -> int:
        return sum(c.out_channels for c in (self.conv3x3, self.conv5x5_2, self.conv7x7_3))

    def spec_args(self) -> dict:
        conv = self.conv3x3.conv
        deformable = isinstance(conv, DeformableConv2d)
        return {
            "in_channels": self.conv3x3.in_channels,
            "out3x3": self.conv3x3.out_channels,
            "mid5x5": self.conv5x5_1.out_channels,
            "out5x5": self.conv5x5_2.out_channels,
            "mid7x7": self.conv7x7_2.out_channels,
            "out7x7": self.conv7x7_3.out_channels,
            "deformable": deformable,
            "groups": 1 if deformable else conv.groups,
        }

    def forward(self, x: Tensor) -> Tensor:
        branch3 = self.conv3x3(x)
        mid = self.conv5x5_1(x)
        branch5 = self.conv5x5_2(mid)
        branch7 = self.conv7x7_3(self.conv7x7_2(mid))
        return F.relu(torch.cat([branch3, branch5, branch7], dim=1))
