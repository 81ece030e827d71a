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

    family: ModelFamily
    example_input: Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher: nn.Module | None = None
    data: Any = None
    logger: Any = None
    stage_name: str = ""


class Pass:
    """A compression pass: takes a model, returns the compressed model.

    Subclasses set ``name``, write a one-line docstring (shown by
    ``compress passes``), optionally define a pydantic ``Params`` model, and
    implement :meth:`apply`.  A pass that can tell up front that its params do
    not fit the model implements :meth:`check`, which runs before any weights
    are touched.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[pydantic.BaseModel]] = NoParams
    #: A lossless pass must leave the outputs unchanged (the runner reports the drift either way).
    lossless: ClassVar[bool] = False

    def check(self, model: nn.Module, params: Any, ctx: PassContext) -> None:
        """Raise ValueError naming the param when ``params`` cannot apply to ``model``."""

    def apply(self, model: nn.Module, params: Any, ctx: PassContext) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
