"""The engine's toolkit of channel surgery for passes: narrower layers that keep the
trained weights of the channels they keep.

Every lossy pass builds its new structure from the weights it replaces; these
are the few primitives they share, on standard torch layers only (convs, batch
norms, linears), so they serve any model family.  Each returns a new layer on
the old one's device and in its dtype, and leaves the old one untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _index(index: Tensor | list[int], device: torch.device | None) -> Tensor:
    return torch.as_tensor(index, dtype=torch.long, device=device)


def conv_keep(conv: nn.Conv2d, out_index: Tensor | list[int] | None = None,
              in_index: Tensor | list[int] | None = None) -> nn.Conv2d:
    """A copy of ``conv`` with only the output and/or input channels listed.

    For a depthwise conv (groups == in == out) give the same index for both; the
    group count follows.
    """
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    if out_index is not None:
        out_index = _index(out_index, weight.device)
        weight = weight[out_index]
        bias = bias[out_index] if bias is not None else None
    if in_index is not None and not depthwise:
        if conv.groups != 1:
            raise ValueError("input-channel selection on a grouped (non-depthwise) conv is not supported")
        weight = weight[:, _index(in_index, weight.device)]
    out_channels = weight.shape[0]
    in_channels = out_channels if depthwise else weight.shape[1] * conv.groups
    groups = out_channels if depthwise else conv.groups
    new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    groups, bias is not None, conv.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def batchnorm_keep(bn: nn.modules.batchnorm._BatchNorm, index: Tensor | list[int]) -> nn.modules.batchnorm._BatchNorm:
    """A copy of ``bn`` (same class) with only the listed channels (statistics and affine kept, when it has them)."""
    like = bn.weight if bn.weight is not None else bn.running_mean  # None: nothing per channel to carry
    device = like.device if like is not None else None
    dtype = like.dtype if like is not None else None
    index = _index(index, device)
    new = type(bn)(len(index), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats, device=device, dtype=dtype)
    with torch.no_grad():
        if bn.weight is not None:
            new.weight.copy_(bn.weight[index])
        if bn.bias is not None:
            new.bias.copy_(bn.bias[index])
        if bn.running_mean is not None:
            new.running_mean.copy_(bn.running_mean[index])
            new.running_var.copy_(bn.running_var[index])
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def linear_keep(linear: nn.Linear, out_index: Tensor | list[int] | None = None,
                in_index: Tensor | list[int] | None = None, bias: bool | None = None) -> nn.Linear:
    """A copy of ``linear`` with only the listed outputs/inputs; ``bias=False`` drops the bias."""
    weight = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if out_index is not None:
        out_index = _index(out_index, weight.device)
        weight = weight[out_index]
        b = b[out_index] if b is not None else None
    if in_index is not None:
        weight = weight[:, _index(in_index, weight.device)]
    keep_bias = (b is not None) if bias is None else (bias and b is not None)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=keep_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if keep_bias:
            new.bias.copy_(b)
    return new


def l1_importance(weight: Tensor, dim: int = 0) -> Tensor:
    """Sum of absolute weights per slice along ``dim`` (per output channel by default)."""
    dims = [d for d in range(weight.dim()) if d != dim]
    return weight.detach().abs().sum(dim=dims) if dims else weight.detach().abs()


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (keeps channel order stable)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} channels")
    return torch.topk(scores, k).indices.sort().values


def dense_conv_weight(conv: nn.Conv2d) -> Tensor:
    """The weight of ``conv`` as a dense (groups=1) conv: each group's block on the diagonal, zeros elsewhere.

    Exact: a dense conv with this weight computes what the grouped conv computes,
    so channel surgery can work on dense weights whatever the source grouping.
    """
    weight = conv.weight.detach()
    groups = conv.groups
    if groups == 1:
        return weight
    out_per, in_per = conv.out_channels // groups, conv.in_channels // groups
    dense = weight.new_zeros(conv.out_channels, conv.in_channels, *weight.shape[2:])
    for k in range(groups):
        rows = slice(k * out_per, (k + 1) * out_per)
        dense[rows, k * in_per:(k + 1) * in_per] = weight[rows]
    return dense


def grouped_weight(dense: Tensor, groups: int) -> Tensor:
    """The diagonal blocks of a dense conv weight, shaped for a conv with ``groups`` groups.

    Output channel o of group k keeps ``dense[o, k*(in/g):(k+1)*(in/g)]`` and loses
    its weights on the other groups' inputs: exact only when those were zero (the
    inverse of :func:`dense_conv_weight`), an approximation otherwise.
    """
    out_channels, in_channels = dense.shape[:2]
    if out_channels % groups or in_channels % groups:
        raise ValueError(f"{groups} groups do not divide {in_channels} input and {out_channels} output channels")
    out_per, in_per = out_channels // groups, in_channels // groups
    blocks = [dense[k * out_per:(k + 1) * out_per, k * in_per:(k + 1) * in_per] for k in range(groups)]
    return torch.cat(blocks, dim=0)
