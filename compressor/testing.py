"""Budget assertions for users' own test suites: ``assert_budget(model, total=..., ...)``.

A failure is an ``AssertionError`` listing every limit exceeded, so a test
shows the whole picture at once rather than the first overshoot only.  Nothing
here imports pytest: ``__tracebackhide__`` is only a local variable pytest
looks for, so these helpers work under any test runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError
from torch import nn

from .accounting import ParameterCount, measure
from .budget import Budget, Overshoot, check_budget
from .checkpoint import open_model
from .family import ModelFamily
from .inputs import parse_input_size
from .plugins import load_registry

__all__ = ["assert_budget", "format_overshoots", "resolve_model"]


def assert_budget(
    model_or_run_dir: nn.Module | str | Path,
    total: int | None = None,
    components: Mapping[str, int] | None = None,
    macs: int | None = None,
    input_size: int | tuple[int, int] | str | None = None,
) -> None:
    """Fail with every exceeded limit when the model is over budget.

    ``model_or_run_dir`` is a model of a registered family, or a run folder,
    checkpoint file or family name (its baseline).  Parameters are counted
    per component, each tensor once; MACs are counted only when ``macs`` is
    given, at ``input_size`` (default: the family's) with batch 1.
    """
    __tracebackhide__ = True
    if total is None and not components and macs is None:
        raise ValueError("assert_budget: give at least one limit (total=, components= or macs=)")
    family, model = resolve_model(model_or_run_dir)
    budget = _make_budget(total, components, macs)
    size = _input_size(family, input_size)
    measured = measure(model, family, size, macs=macs is not None)
    _require_known_components(components or {}, measured.params)
    over = check_budget(measured.params, measured.macs if macs is not None else None, budget)
    if over:
        raise AssertionError(format_overshoots(over, size if macs is not None else None))


def resolve_model(model_or_source: nn.Module | str | Path) -> tuple[ModelFamily, nn.Module]:
    """(family, model) for a model object, or for a source :func:`open_model` accepts.

    Raises :class:`compressor.errors.UsageError` for a source that does not load
    or a model no registered family recognises: those are mistakes in the test,
    not budget failures, so they are not ``AssertionError``.
    """
    if isinstance(model_or_source, nn.Module):
        return load_registry().family_for(model_or_source), model_or_source
    if isinstance(model_or_source, (str, Path)):
        loaded = open_model(model_or_source)
        return loaded.family, loaded.model
    raise TypeError(
        f"assert_budget takes an nn.Module, a run folder, a checkpoint or a family name, "
        f"not {type(model_or_source).__name__}"
    )


def format_overshoots(over: list[Overshoot], input_size: tuple[int, int] | None = None) -> str:
    """``model over budget (N limits):`` then one indented ``str(Overshoot)`` per line."""
    noun = "limit" if len(over) == 1 else "limits"
    lines = [f"model over budget ({len(over)} {noun}):"]
    for item in over:
        where = f" at {input_size[0]}x{input_size[1]}, batch 1" if item.what == "macs" and input_size else ""
        lines.append(f"  {item}{where}")
    return "\n".join(lines)


def _require_known_components(limits: Mapping[str, int], params: ParameterCount) -> None:
    """An ``AssertionError`` (not ``check_budget``'s KeyError) for a component the model lacks.

    A misspelt component in a test is most useful reported like a failed
    assertion, with the names that would have worked.
    """
    __tracebackhide__ = True
    unknown = [name for name in limits if name not in params.components]
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise AssertionError(
            f"budget names component {names}, which this model does not have "
            f"(components: {', '.join(params.components)})"
        )


def _make_budget(total: int | None, components: Mapping[str, int] | None, macs: int | None) -> Budget:
    """A :class:`Budget`, with pydantic's multi-line error turned into one ValueError line."""
    try:
        return Budget(total=total, components=dict(components or {}), macs=macs)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"assert_budget: invalid budget ({problems})") from None


def _input_size(family: ModelFamily, input_size: int | tuple[int, int] | str | None) -> tuple[int, int]:
    size = family.default_input_size if input_size is None else parse_input_size(input_size)
    family.check_input_size(*size)
    return (int(size[0]), int(size[1]))
