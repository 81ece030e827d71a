"""Modulated deformable convolution (DCNv2) on torchvision's ``deform_conv2d``.

``deform_conv2d`` must never see a NaN offset: its bilinear sampling casts the
sample position to an integer index, a NaN position passes its bounds check,
and the kernel reads out of bounds (a SIGSEGV with nothing on stderr).  The
module therefore refuses non-finite inputs, offsets and masks with
:class:`NonFiniteError` before calling it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d


class NonFiniteError(FloatingPointError):
    """A guarded layer was given (or computed) NaN or infinite values it cannot take.

    ``module`` is the layer, so a caller that holds the whole model can name it;
    ``what`` is the tensor ("input", "offsets", "mask").
    """

    def __init__(self, message: str, module: nn.Module | None = None, what: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.what = what


def _tracing() -> bool:
    """Under torch.jit tracing or torch.compile a data-dependent check would be baked in or break the graph."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return torch.jit.is_tracing() or bool(compiling and compiling())


def _sum(t: Tensor) -> Tensor:
    """Sum in at least float32, so half-precision values cannot overflow it."""
    t = t.detach()  # no autograd node for the guard
    return t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()


def _count(t: Tensor) -> str:
    return f"{int(torch.isnan(t).sum()):,} NaN, {int(torch.isinf(t).sum()):,} Inf of {t.numel():,} values"


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
        # The guard, one host sync per call: a sum is finite only if every value is, so a
        # finite sum of offsets and mask passes at once (0.19 ms per 320x320 FeatherFace
        # forward on the CPU, ~0.25%; isfinite().all() on each costs 4x that).  The input,
        # larger, is not summed: a NaN or Inf anywhere in it makes the offsets computed from
        # it non-finite too (NaN * 0 is NaN).  A non-finite sum (NaN/Inf somewhere, or a mere
        # overflow) is checked exactly and named.  The convs above cannot crash on NaN; only
        # deform_conv2d can.
        if not _tracing() and not bool(torch.isfinite(_sum(offset) + _sum(mask))):
            self._refuse_non_finite(x, offset, mask)
        return deform_conv2d(
            x, offset, self.regular_conv.weight, bias=None,
            stride=self.stride, padding=self.padding, mask=mask,
        )

    def _label(self) -> str:
        return f"DeformableConv2d({self.in_channels}, {self.out_channels})"

    def _refuse_non_finite(self, x: Tensor, offset: Tensor, mask: Tensor) -> None:
        """Raise for the first non-finite tensor of input, offsets, mask, saying why; return if all are finite."""
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"{self._label()}: non-finite input ({_count(x)}); refused before deform_conv2d",
                                 self, "input")
        for what, values, name in (("offsets", offset, "offset_conv"), ("mask", mask, "modulator_conv")):
            if not bool(torch.isfinite(values).all()):
                conv = getattr(self, name)
                weights_bad = not all(bool(torch.isfinite(p).all()) for p in conv.parameters())
                cause = f"{name}'s weights are non-finite" if weights_bad else f"{name} overflowed on a finite input"
                raise NonFiniteError(f"{self._label()}: non-finite {what} ({_count(values)}; {cause}); "
                                     "refused before deform_conv2d", self, what)

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
