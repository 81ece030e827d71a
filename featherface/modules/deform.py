"""Modulated deformable convolution (DCNv2) on torchvision's ``deform_conv2d``."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d


class DeformableConv2d(nn.Module):
    """k x k DCNv2: offsets and a 2*sigmoid modulation predicted by plain convs.

    The offset and modulator convs start at zero, so a fresh layer samples the
    regular grid with modulation 1, i.e. behaves as the plain conv it replaces.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        points = kernel_size * kernel_size
        self.stride = stride
        self.padding = padding
        self.offset_conv = nn.Conv2d(in_channels, 2 * points, kernel_size, stride, padding, bias=True)
        self.modulator_conv = nn.Conv2d(in_channels, points, kernel_size, stride, padding, bias=True)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        for conv in (self.offset_conv, self.modulator_conv):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def in_channels(self) -> int:
        return self.regular_conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.regular_conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        offset = self.offset_conv(x)
        mask = 2.0 * torch.sigmoid(self.modulator_conv(x))
        return deform_conv2d(
            x, offset, self.regular_conv.weight, bias=None,
            stride=self.stride, padding=self.padding, mask=mask,
        )

    def count_macs(self, inputs: tuple[Tensor, ...], output: Tensor) -> dict[str, int]:
        """The regular conv's MACs (never run as a module, so no hook sees it) and the sampling.

        Sampling is counted as 4 MACs per sampled value for bilinear interpolation
        plus 1 for the modulation: 5 x N x C_in x k^2 x H_out x W_out.  The offset
        and modulator convs run as ordinary modules and are counted as convs.
        """
        conv = self.regular_conv
        kernel_points = conv.kernel_size[0] * conv.kernel_size[1]
        positions = output.numel() // output.shape[1]
        conv_macs = output.numel() * (conv.in_channels // conv.groups) * kernel_points
        sampled = positions * conv.in_channels * kernel_points
        return {"macs": conv_macs, "deform_sampling_macs": 5 * sampled}
