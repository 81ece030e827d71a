"""CBAM attention: a channel gate followed by a spatial gate.

The gates are separate modules handed to :class:`CBAM` so that several CBAMs can
hold the very same gate instance (weight sharing) and still describe themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facedet.spec import register


@register
class ChannelGate(nn.Module):
    """One MLP applied to the average- and the max-pooled descriptor; sigmoid of the sum."""

    def __init__(self, channels: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden width must be at least 1, got {hidden}")
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def spec_args(self) -> dict:
        return {"channels": self.fc1.in_features, "hidden": self.fc1.out_features, "bias": self.fc1.bias is not None}

    def forward(self, x: Tensor) -> Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3)))))
        peak = self.fc2(self.act(self.fc1(x.amax(dim=(2, 3)))))
        return x * torch.sigmoid(avg + peak)[:, :, None, None]


@register
class SpatialGate(nn.Module):
    """k x k conv over [channel max, channel mean], BN, sigmoid."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def spec_args(self) -> dict:
        return {"kernel_size": self.conv.kernel_size[0]}

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


@register
class CBAM(nn.Module):
    """Channel gate, then spatial gate on its output.  Not residual by itself."""

    def __init__(self, channel_gate: ChannelGate, spatial_gate: SpatialGate) -> None:
        super().__init__()
        self.channel_gate = channel_gate
        self.spatial_gate = spatial_gate

    @property
    def channels(self) -> int:
        return self.channel_gate.fc1.in_features

    def spec_args(self) -> dict:
        return {"channel_gate": self.channel_gate, "spatial_gate": self.spatial_gate}

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial_gate(self.channel_gate(x))


def cbam(channels: int, reduction: int = 16, bias: bool = True, kernel_size: int = 7) -> CBAM:
    """The original CBAM: hidden width ``channels // reduction``, MLP with biases."""
    return CBAM(ChannelGate(channels, max(channels // reduction, 1), bias), SpatialGate(kernel_size))
