"""Checks run after every pass: the output contract, finite outputs, budgets, drift."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class OutputSpec:
    """Where an output tensor sits in the output structure, and its shape and dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.path} {tuple(self.shape)} {str(self.dtype).replace('torch.', '')}"


def flatten_outputs(outputs: object, path: str = "output") -> list[tuple[str, Tensor]]:
    """(path, tensor) for every tensor in a (nested) tuple/list/dict of outputs."""
    if isinstance(outputs, Tensor):
        return [(path, outputs)]
    if isinstance(outputs, (tuple, list)):
        return [item for i, value in enumerate(outputs) for item in flatten_outputs(value, f"{path}[{i}]")]
    if isinstance(outputs, dict):
        return [item for key, value in outputs.items() for item in flatten_outputs(value, f"{path}[{key!r}]")]
    raise TypeError(f"{path}: a model output must be tensors in tuples, lists or dicts, got {type(outputs).__name__}")


def output_contract(outputs: object) -> list[OutputSpec]:
    return [OutputSpec(path, tuple(t.shape), t.dtype) for path, t in flatten_outputs(outputs)]


def contract_violations(expected: list[OutputSpec], outputs: object) -> list[str]:
    """What differs between ``outputs`` and the contract; empty when it holds."""
    try:
        actual = output_contract(outputs)
    except TypeError as err:
        return [str(err)]
    if len(actual) != len(expected):
        return [f"{len(actual)} output tensors instead of {len(expected)}"]
    problems = []
    for want, got in zip(expected, actual):
        if want != got:
            problems.append(f"{got.describe()} instead of {want.describe()}")
    return problems


def non_finite_outputs(outputs: object) -> list[str]:
    return [path for path, t in flatten_outputs(outputs) if t.is_floating_point() and not torch.isfinite(t).all()]


def output_drift(before: object, after: object) -> float:
    """Largest absolute difference between two output structures of the same contract."""
    pairs = zip(flatten_outputs(before), flatten_outputs(after))
    return max((float((a - b).abs().max()) for (_, a), (_, b) in pairs if a.numel()), default=0.0)


@torch.no_grad()
def forward_eval(model: nn.Module, example: Tensor) -> object:
    """Outputs of ``model`` in eval mode (its training flag restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return model(example)
    finally:
        model.train(was_training)
