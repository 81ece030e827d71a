"""Parameters by component, MACs and CPU latency: counted once, counted right.

Every tensor is counted exactly once, however many modules hold it: the design
note this project started from counted CBAM four times over by summing each
module's recursive ``parameters()`` at every level of the module tree.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pydantic
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .family import ModelFamily

OTHER = "other"


class ParameterCount(pydantic.BaseModel):
    """Parameters in all and per component; the components sum to the total."""

    model_config = pydantic.ConfigDict(extra="forbid")

    total: int
    components: dict[str, int]

    def to_dict(self) -> dict:
        return self.model_dump()


def unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(first name, parameter) for every distinct parameter tensor.

    Deduplicated by the storage they view as well as by identity, so two
    Parameter objects tied to the same memory are one tensor too.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    found = []
    for name, param in model.named_parameters(remove_duplicate=True):
        key = (param.untyped_storage().data_ptr(), param.storage_offset(), tuple(param.shape))
        if key in seen:
            continue
        seen.add(key)
        found.append((name, param))
    return found


def count_parameters(
    model: nn.Module,
    component_of: Callable[[str], str] = lambda name: OTHER,
    components: tuple[str, ...] = (),
) -> ParameterCount:
    """Parameters per component; the components always sum to the total.

    ``components`` fixes the order (and shows empty ones as 0); anything that
    ``component_of`` does not place there lands in ``other``.
    """
    counts = {name: 0 for name in components}
    counts.setdefault(OTHER, 0)
    for name, param in unique_parameters(model):
        component = component_of(name)
        if components and component not in counts:
            component = OTHER
        counts[component] = counts.get(component, 0) + param.numel()
    return ParameterCount(total=sum(counts.values()), components=counts)


@dataclass
class MacCount:
    """Multiply-accumulates of one forward pass.

    ``macs`` covers convolutions and linear layers (a deformable conv's own
    kernel included); ``extra`` holds costs counted separately, such as the
    bilinear sampling of deformable convs.  BN, activations, pooling and
    resizing are not counted.
    """

    macs: int
    extra: dict[str, int] = field(default_factory=dict)
    input_size: tuple[int, int] = (0, 0)


def _layer_macs(module: nn.Module, inputs: tuple[Tensor, ...], output: object) -> dict[str, int]:
    counter = getattr(module, "count_macs", None)
    if callable(counter):
        return counter(inputs, output)
    if isinstance(module, nn.Conv2d) and isinstance(output, Tensor):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        return {"macs": output.numel() * (module.in_channels // module.groups) * kernel}
    if isinstance(module, nn.Linear) and isinstance(output, Tensor):
        return {"macs": output.numel() * module.in_features}
    return {}


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Tensor) -> MacCount:
    """MACs of ``model`` on ``example_input`` (batch 1 is the convention for reporting).

    Convs and linear layers are counted by rule; a module with a
    ``count_macs(inputs, output) -> {kind: macs}`` method counts what hooks on
    its children cannot see (e.g. a kernel it applies functionally).
    """
    totals: dict[str, int] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: object) -> None:
        for kind, value in _layer_macs(module, inputs, output).items():
            totals[kind] = totals.get(kind, 0) + int(value)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    macs = totals.pop("macs", 0)
    return MacCount(macs=macs, extra=totals, input_size=(example_input.shape[-2], example_input.shape[-1]))


class Latency(pydantic.BaseModel):
    """Median CPU wall time of batch forwards."""

    model_config = pydantic.ConfigDict(extra="forbid")

    median_ms: float
    threads: int
    runs: int
    warmup: int
    input_size: tuple[int, int]
    batch_size: int

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


@torch.no_grad()
def forward_times(model: nn.Module, example_input: Tensor, runs: int, warmup: int) -> list[float]:
    """Wall time in ms of each of ``runs`` forwards after ``warmup`` untimed ones, in eval mode, without autograd.

    The one timing loop: :func:`measure_latency` and the benchmarks (PyTorch and
    ONNX Runtime alike) time with it.  The caller sets the thread count.
    """
    model.eval()
    with torch.no_grad():
        for _ in range(warmup):
            model(example_input)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(example_input)
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure_latency(model: nn.Module, example_input: Tensor, runs: int = 20, warmup: int = 5, threads: int = 1) -> Latency:
    """Median wall time of ``runs`` forwards after ``warmup`` untimed ones, on ``threads`` CPU threads."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    previous_threads = torch.get_num_threads()
    was_training = model.training
    torch.set_num_threads(threads)
    try:
        times = forward_times(model, example_input, runs, warmup)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return Latency(
        median_ms=statistics.median(times),
        threads=threads,
        runs=runs,
        warmup=warmup,
        input_size=(example_input.shape[-2], example_input.shape[-1]),
        batch_size=example_input.shape[0],
    )


class Measurement(pydantic.BaseModel):
    """What a model costs: parameters by component, MACs (with the family's notes on how), latency.

    The one measurement the runner records per stage, ``compress inspect``
    prints, ``assert_budget`` and ``sensitivity`` check, and the benchmarks use.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    params: ParameterCount
    macs: int = pydantic.Field(description="Conv and linear MACs of one forward, batch 1.")
    extra_macs: dict[str, int] = pydantic.Field(default_factory=dict, description="Costs counted apart, by kind.")
    counting_notes: dict[str, str] = pydantic.Field(default_factory=dict, description="How each extra kind is counted.")
    input_size: tuple[int, int]
    latency: Latency | None = None


def measure(model: nn.Module, family: ModelFamily, input_size: tuple[int, int], *,
            device: torch.device | None = None, macs: bool = True,
            latency_runs: int = 0, latency_warmup: int = 5, threads: int = 1) -> Measurement:
    """Measure ``model`` as its family counts it: parameters always, MACs at ``input_size``, latency on request."""
    height, width = input_size
    params = count_parameters(model, family.component_of, family.components)
    mac_count = MacCount(macs=0)
    example = None
    if macs or latency_runs:
        example = family.example_input(height, width, batch_size=1)
        if device is not None:
            example = example.to(device)
    if macs:
        mac_count = count_macs(model, example)
    notes = {kind: family.counting_notes[kind] for kind in mac_count.extra if kind in family.counting_notes}
    latency = None
    if latency_runs:
        latency = measure_latency(model, example, runs=latency_runs, warmup=latency_warmup, threads=threads)
    return Measurement(params=params, macs=mac_count.macs, extra_macs=mac_count.extra, counting_notes=notes,
                       input_size=(height, width), latency=latency)
