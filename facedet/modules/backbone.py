"""MobileNetV1 body (the 0.25-width variant FeatherFace uses), stages 1-3."""

from __future__ import annotations

from torch import Tensor, nn

from ..spec import register

# Output width and stride of every layer in MobileNetV1-0.25, per stage.  The
# first layer of stage 1 is a plain 3x3 conv; every other layer is depthwise
# separable.
MOBILENET_V1_025_WIDTHS = ((8, 16, 32, 32, 64, 64), (128,) * 6, (256, 256))
MOBILENET_V1_025_STRIDES = ((2, 1, 2, 1, 2, 1), (2, 1, 1, 1, 1, 1), (2, 1))


class ConvBNLeaky(nn.Module):
    """Conv (no bias, "same" padding), BN, LeakyReLU(0.1): the stem layer, and the FPN's layers."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 + BN + LeakyReLU, then pointwise 1x1 + BN + LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.depthwise_bn(self.depthwise(x)))
        return self.act(self.pointwise_bn(self.pointwise(x)))


@register
class MobileNetV1(nn.Module):
    """Returns the outputs of its three stages (strides 8, 16, 32 for the default widths).

    ``widths[s][i]`` is the output width of layer ``i`` of stage ``s``; the very
    first layer is a plain conv, all others depthwise separable.  Widths are
    explicit per layer so that a pruned body can describe itself.
    """

    def __init__(
        self,
        widths: list[list[int]] = MOBILENET_V1_025_WIDTHS,  # type: ignore[assignment]
        strides: list[list[int]] = MOBILENET_V1_025_STRIDES,  # type: ignore[assignment]
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if [len(w) for w in widths] != [len(s) for s in strides]:
            raise ValueError("widths and strides must have the same layout")
        stages = []
        channels = in_channels
        for stage_index, (stage_widths, stage_strides) in enumerate(zip(widths, strides)):
            layers: list[nn.Module] = []
            for layer_index, (width, stride) in enumerate(zip(stage_widths, stage_strides)):
                is_stem = stage_index == 0 and layer_index == 0
                block = ConvBNLeaky if is_stem else DepthwiseSeparable
                layers.append(block(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3 = stages

    @property
    def out_channels(self) -> list[int]:
        return [_out_width(stage[-1]) for stage in (self.stage1, self.stage2, self.stage3)]

    def spec_args(self) -> dict:
        stages = (self.stage1, self.stage2, self.stage3)
        return {
            "widths": [[_out_width(layer) for layer in stage] for stage in stages],
            "strides": [[_stride(layer) for layer in stage] for stage in stages],
            "in_channels": self.stage1[0].conv.in_channels,
        }

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return [c3, c4, c5]


def _out_width(layer: nn.Module) -> int:
    return layer.conv.out_channels if isinstance(layer, ConvBNLeaky) else layer.pointwise.out_channels


def _stride(layer: nn.Module) -> int:
    conv = layer.conv if isinstance(layer, ConvBNLeaky) else layer.depthwise
    return conv.stride[0]
