"""The base class of compression passes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic
import torch
from torch import Tensor, nn

from .errors import UsageError
from .family import ModelFamily

if TYPE_CHECKING:  # session imports the plugin manager, which imports this module
    from .session import OpenedRecipe


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
    #: ``sample_inputs(count)``: a batch of ``count`` real, preprocessed inputs from the run's data
    #: (the family's calibration data), for passes that measure on real data; None when there is none.
    sample_inputs: Callable[[int], Tensor] | None = None


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
    bad values before any model is loaded.  A pass made for structure that some
    models lack (a kind of module no other pass adds) says why in
    :meth:`applies_to`, which the engine asks of the recipe's starting model; a
    pass that can tell up front that its params do not fit a given model
    implements :meth:`check`, which runs before any weights are touched.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[pydantic.BaseModel]] = NoParams
    #: A lossless pass must leave the outputs unchanged: the engine fails its stage on any drift.
    lossless: ClassVar[bool] = False

    def applies_to(self, model: nn.Module) -> str | None:
        """None when the pass can work on ``model``; otherwise why not, in a few words.

        For structure only, independent of params: e.g. ``"the model has no BiFPN
        cells"``.  The engine asks it of the starting model only, since no pass
        adds the kinds of modules passes are written for.
        """
        return None

    def check(self, model: nn.Module, params: Any, ctx: PassContext) -> None:
        """Raise ValueError naming the param when ``params`` cannot apply to ``model``."""

    def apply(self, model: nn.Module, params: Any, ctx: PassContext) -> nn.Module | PassResult:
        """The compressed model (it may be ``model`` changed in place), or a :class:`PassResult`."""
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def check_stages_apply(opened: OpenedRecipe, model: nn.Module) -> None:
    """Refuse, in one line, the first stage whose pass does not apply to the recipe's starting ``model``.

    ``compress validate`` and ``compress run`` both call it on the starting
    model, before any stage runs, so that a recipe written for another family
    fails at once rather than after the stages before it.
    """
    from .plugins import guarded  # here: the plugin manager imports this module

    registry = opened.app.registry
    for index, stage in enumerate(opened.recipe.stages):
        instance = registry.get_pass(stage.pass_name)()
        reason = guarded(f"pass {stage.pass_name}", "raised in applies_to()", lambda: instance.applies_to(model))
        if reason is not None:
            what = stage.pass_name if stage.label == stage.pass_name else f"{stage.label}: {stage.pass_name}"
            raise UsageError(f"{opened.path}: stages[{index}] ({what}): does not apply to this model "
                             f"(family {opened.family.name}): {reason}")
