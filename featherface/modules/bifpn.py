"""BiFPN cells with fast normalised fusion, as FeatherFace uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facedet.spec import register

# BiFPN's BN settings follow the EfficientDet lineage, not PyTorch defaults.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def same_padding(x: Tensor, kernel_size: int, stride: int) -> Tensor:
    """Zero-pad like TensorFlow's "SAME": the extra pixel goes right/bottom."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        # Integer ceiling division, so that a symbolic size (ONNX export with dynamic axes)
        # stays an integer expression.
        total = max((-(-size // stride) - 1) * stride - size + kernel_size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def downsample(x: Tensor) -> Tensor:
    """3x3 / stride-2 max-pool with zero "same" padding (zeros, not -inf, as the original)."""
    return F.max_pool2d(same_padding(x, 3, 2), 3, 2)


def upsample_to(x: Tensor, reference: Tensor) -> Tensor:
    return F.interpolate(x, size=reference.shape[-2:], mode="nearest")


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class SeparableConvBN(nn.Module):
    """Depthwise 3x3 ("same" padding, no bias), pointwise 1x1 with bias, BN; no activation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.pointwise(self.depthwise(same_padding(x, 3, 1))))


class Projection(nn.Module):
    """1x1 conv with bias + BN: brings a backbone level to the BiFPN width."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class FusionWeights(nn.Module):
    """Learnable per-input scalars, ReLU'd and normalised to (almost) sum to one.

    A module of its own so that pruning tools can recognise the weights as scalars
    per input, never as channel dimensions.
    """

    def __init__(self, num_inputs: int, epsilon: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.epsilon = epsilon

    def forward(self) -> Tensor:
        w = F.relu(self.weight)
        return w / (w.sum() + self.epsilon)


@register
class BiFPNCell(nn.Module):
    """One top-down + bottom-up pass over three levels (P3, P4, P5).

    With ``in_channels`` given, the cell is the first of a stack: it projects the
    backbone levels to ``channels`` (separately for the top-down and the bottom-up
    path, as the original does).
    """

    def __init__(self, channels: int, in_channels: list[int] | None = None, epsilon: float = 1e-4) -> None:
        super().__init__()
        self.p4_w1 = FusionWeights(2, epsilon)
        self.p3_w1 = FusionWeights(2, epsilon)
        self.p4_w2 = FusionWeights(3, epsilon)
        # Three weights, normalised over all three, of which only two are used:
        # a quirk of the original that changes the numbers, so it is kept.
        self.p5_w2 = FusionWeights(3, epsilon)
        self.conv4_up = SeparableConvBN(channels)
        self.conv3_up = SeparableConvBN(channels)
        self.conv4_down = SeparableConvBN(channels)
        self.conv5_down = SeparableConvBN(channels)
        self.first = in_channels is not None
        if in_channels is not None:
            c3, c4, c5 = in_channels
            self.p3_down_channel = Projection(c3, channels)
            self.p4_down_channel = Projection(c4, channels)
            self.p5_down_channel = Projection(c5, channels)
            self.p4_down_channel_2 = Projection(c4, channels)
            self.p5_down_channel_2 = Projection(c5, channels)

    @property
    def channels(self) -> int:
        return self.conv3_up.pointwise.out_channels

    def spec_args(self) -> dict:
        in_channels = None
        if self.first:
            in_channels = [p.conv.in_channels for p in (self.p3_down_channel, self.p4_down_channel, self.p5_down_channel)]
        return {"channels": self.channels, "in_channels": in_channels, "epsilon": self.p4_w1.epsilon}

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        p3_in, p4_in, p5_in = features
        if self.first:
            raw_p4, raw_p5 = p4_in, p5_in
            p3_in = self.p3_down_channel(p3_in)
            p4_in = self.p4_down_channel(raw_p4)
            p5_in = self.p5_down_channel(raw_p5)

        w = self.p4_w1()
        p4_up = self.conv4_up(swish(w[0] * p4_in + w[1] * upsample_to(p5_in, p4_in)))
        w = self.p3_w1()
        p3_out = self.conv3_up(swish(w[0] * p3_in + w[1] * upsample_to(p4_up, p3_in)))

        if self.first:
            p4_in = self.p4_down_channel_2(raw_p4)
            p5_in = self.p5_down_channel_2(raw_p5)

        w = self.p4_w2()
        p4_out = self.conv4_down(swish(w[0] * p4_in + w[1] * p4_up + w[2] * downsample(p3_out)))
        w = self.p5_w2()
        p5_out = self.conv5_down(swish(w[0] * p5_in + w[1] * downsample(p4_out)))
        return [p3_out, p4_out, p5_out]
