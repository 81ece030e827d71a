"""The channel-shuffle block that follows each SSH module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facedet.spec import register


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """FeatherFace's shuffle: view as N x (C/g) x g, swap the two, flatten back.

    This is the transpose of ShuffleNet's usual order (which views as g x C/g);
    with 2 groups it puts the even channels first, then the odd ones.
    """
    n, c, h, w = x.shape
    return x.reshape(n, c // groups, groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def shuffle_permutation(channels: int, groups: int) -> Tensor:
    """The permutation ``p`` of :func:`channel_shuffle`: ``channel_shuffle(x, groups)[:, j] == x[:, p[j]]``.

    Read off :func:`channel_shuffle` itself rather than re-derived, so every
    consumer (pruning's folding, ``ssh_slim``'s column slicing) follows the
    forward exactly; for 2 groups: ``[0, 2, 4, ..., 1, 3, 5, ...]``.  Its inverse
    is ``torch.argsort(p)``: input channel ``c`` lands at position ``argsort(p)[c]``.
    """
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be shuffled in {groups} groups")
    return channel_shuffle(torch.arange(channels).view(1, channels, 1, 1), groups).flatten()


@register
class ChannelShuffleBlock(nn.Module):
    """Shuffle, 1x1 down to ``mid_channels`` + BN, depthwise 3x3 + BN, 1x1 up + BN, ReLU."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, groups: int = 2) -> None:
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"in_channels {in_channels} is not divisible by {groups} shuffle groups")
        self.groups = groups
        self.reduce = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(mid_channels)
        self.depthwise = nn.Conv2d(mid_channels, mid_channels, 3, padding=1, groups=mid_channels, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(mid_channels)
        self.expand = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    @property
    def out_channels(self) -> int:
        return self.expand.out_channels

    def spec_args(self) -> dict:
        return {
            "in_channels": self.reduce.in_channels,
            "mid_channels": self.reduce.out_channels,
            "out_channels": self.expand.out_channels,
            "groups": self.groups,
        }

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce_bn(self.reduce(channel_shuffle(x, self.groups)))
        x = self.depthwise_bn(self.depthwise(x))
        return self.act(self.expand_bn(self.expand(x)))
