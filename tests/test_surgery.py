"""The engine's channel surgery: every slicer keeps dtype, device and the kept channels' values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.surgery import batchnorm_keep, conv_keep, dense_conv_weight, grouped_weight, linear_keep, top_k

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
KEEP = [0, 2, 5]


def _randomised(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]:
            tensor.uniform_(0.5, 1.5)
    return module


@pytest.mark.parametrize("device", DEVICES)
def test_conv_keep_keeps_dtype_device_and_values(device):
    conv = _randomised(nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64, device=device))
    new = conv_keep(conv, out_index=KEEP, in_index=[1, 3])
    assert (new.weight.dtype, new.weight.device, new.bias.dtype) == (torch.float64, conv.weight.device, torch.float64)
    assert (new.in_channels, new.out_channels) == (2, 3)
    assert torch.equal(new.weight, conv.weight[KEEP][:, [1, 3]]) and torch.equal(new.bias, conv.bias[KEEP])
    depthwise = _randomised(nn.Conv2d(6, 6, 3, groups=6, bias=False, dtype=torch.float64, device=device))
    new = conv_keep(depthwise, KEEP, KEEP)
    assert (new.groups, new.weight.dtype, new.weight.device) == (3, torch.float64, depthwise.weight.device)
    assert torch.equal(new.weight, depthwise.weight[KEEP])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_keep_keeps_dtype_device_and_values(device):
    linear = _randomised(nn.Linear(5, 7, dtype=torch.float64, device=device))
    new = linear_keep(linear, out_index=KEEP, in_index=[0, 4])
    assert (new.weight.dtype, new.weight.device, new.bias.dtype) == (torch.float64, linear.weight.device, torch.float64)
    assert torch.equal(new.weight, linear.weight[KEEP][:, [0, 4]]) and torch.equal(new.bias, linear.bias[KEEP])
    assert linear_keep(linear, in_index=[1], bias=False).bias is None


@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_keep_keeps_dtype_device_and_values(device):
    # Before the fix the new BN was built in the default dtype: float32 weights and statistics.
    bn = _randomised(nn.BatchNorm2d(6, dtype=torch.float64, device=device))
    bn.num_batches_tracked.fill_(7)
    bn.train(False)
    new = batchnorm_keep(bn, KEEP)
    for name in ("weight", "bias", "running_mean", "running_var"):
        kept, source = getattr(new, name), getattr(bn, name)
        assert (kept.dtype, kept.device) == (torch.float64, source.device), name
        assert torch.equal(kept, source[KEEP]), name
    assert int(new.num_batches_tracked) == 7 and not new.training
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, device=device)
    assert torch.equal(new(x[:, KEEP]), bn(x)[:, KEEP])


@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_keep_without_affine_or_statistics(device):
    plain = _randomised(nn.BatchNorm2d(6, affine=False, dtype=torch.float64, device=device)).eval()
    new = batchnorm_keep(plain, KEEP)
    assert new.weight is None and new.bias is None and not new.affine
    assert (new.running_mean.dtype, new.running_mean.device) == (torch.float64, plain.running_mean.device)
    assert torch.equal(new.running_var, plain.running_var[KEEP])
    stateless = nn.BatchNorm1d(6, affine=False, track_running_stats=False)
    new = batchnorm_keep(stateless, KEEP)
    assert isinstance(new, nn.BatchNorm1d) and new.num_features == 3 and new.running_mean is None


def test_dense_and_grouped_weights_round_trip():
    conv = _randomised(nn.Conv2d(4, 6, 1, groups=2, bias=False, dtype=torch.float64))
    dense = dense_conv_weight(conv)
    assert dense.dtype == torch.float64 and dense.shape == (6, 4, 1, 1)
    assert torch.equal(grouped_weight(dense, 2), conv.weight)


def test_top_k_is_sorted_and_bounded():
    assert top_k(torch.tensor([0.1, 3.0, 2.0, 5.0]), 2).tolist() == [1, 3]
    with pytest.raises(ValueError):
        top_k(torch.tensor([1.0]), 2)
