"""Pieces of the training loop: learning-rate schedule, BatchNorm recalibration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compressor.recipe import TrainConfig
from compressor.train import lr_factor, recalibrate_batchnorm


def test_warmup_then_cosine():
    config = TrainConfig(steps=10, warmup_steps=2, schedule="cosine")
    assert lr_factor(0, config) == pytest.approx(0.5)
    assert lr_factor(1, config) == pytest.approx(1.0)
    assert lr_factor(2, config) == pytest.approx(1.0)  # cosine starts at its peak
    assert lr_factor(6, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_step_schedule():
    config = TrainConfig(steps=100, schedule="step", milestones=[0.5, 0.8], gamma=0.1)
    assert lr_factor(49, config) == 1.0
    assert lr_factor(50, config) == pytest.approx(0.1)
    assert lr_factor(80, config) == pytest.approx(0.01)


def test_batchnorm_recalibration_replaces_stale_statistics():
    bn = nn.BatchNorm2d(2, momentum=0.01)
    bn.running_mean.fill_(100.0)  # stale, from "earlier weights"
    bn.running_var.fill_(1e4)
    model = nn.Sequential(bn).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 2, 3, 3, generator=generator) * 3 + 5 for _ in range(5)]
    stream = iter([(b, None) for b in batches])
    recalibrate_batchnorm(model, stream, count=5)
    expected_mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-4)
    assert bn.momentum == 0.01 and not model.training
