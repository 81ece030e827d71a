"""The base class of compression passes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic
import torch
from torch import Tensor, nn

from .family import ModelFamily


class NoParams(pydantic.BaseModel):
    """For passes that take no parameters."""

    model_config = pydantic.ConfigDict(extra="forbid")


@dataclass
class PassContext:
    """What a pass may need besides the model and its params."""

    #: The model's family: its components, output layers and pruning hints.
    family: ModelFamily
    #: A fixed, image-like batch (for tracing and data-driven importance).
    example_input: Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass(frozen=True)
class PassResult:
    """What :meth:`Pass.apply` may return instead of the bare model.

    ``record`` (JSON-able: numbers, strings, lists, dicts) says what the pass did,
    e.g. the channels removed per group, and lands in the stage's report entry.
    """

    model: nn.Module
    record: dict[str, Any] = field(default_factory=dict)


class Pass:
    """A compression pass: takes a model, returns the compressed model.

    Subclasses set ``name``, write a one-line docstring (shown by
    ``compress passes``), optionally define a pydantic ``Params`` model, and
    implement :meth:`apply`.  ``Params`` carries every check that needs no model
    (pydantic ``Field`` bounds and validators), so ``compress validate`` catches
    bad values before any model is loaded; a pass that can tell up front that its
    params do not fit a given model implements :meth:`check`, which runs before
    any weights are touched.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[pydantic.BaseModel]] = NoParams
    #: A lossless pass must leave the outputs unchanged: the engine fails its stage on any drift.
    lossless: ClassVar[bool] = False

    def check(self, model: nn.Module, params: Any, ctx: PassContext) -> None:
        """Raise ValueError naming the param when ``params`` cannot apply to ``model``."""

    def apply(self, model: nn.Module, params: Any, ctx: PassContext) -> nn.Module | PassResult:
        """The compressed model (it may be ``model`` changed in place), or a :class:`PassResult`."""
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
