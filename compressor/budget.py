"""Budgets: limits on parameters (total and per component) and MACs, and their checks."""

from __future__ import annotations

from dataclasses import dataclass

import pydantic

from .accounting import ParameterCount


class Budget(pydantic.BaseModel):
    """Upper limits; any left out is not checked."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    total: pydantic.PositiveInt | None = pydantic.Field(None, description="Most parameters in all, each tensor counted once.")
    components: dict[str, pydantic.NonNegativeInt] = pydantic.Field(
        default_factory=dict, description="Most parameters per component, e.g. {ssh: 60000}."
    )
    macs: pydantic.PositiveInt | None = pydantic.Field(None, description="Most MACs at the recipe's input size, batch 1.")


@dataclass(frozen=True)
class Overshoot:
    """One limit that is exceeded: ``what`` is ``total``, a component name, or ``macs``."""

    what: str
    value: int
    limit: int

    def __str__(self) -> str:
        return f"{self.what} = {self.value:,} > budget {self.limit:,} (+{self.value - self.limit:,})"


def check_budget(params: ParameterCount, macs: int | None, budget: Budget) -> list[Overshoot]:
    """Every limit of ``budget`` that ``params``/``macs`` exceed (an unknown component is an error)."""
    over = []
    if budget.total is not None and params.total > budget.total:
        over.append(Overshoot("total", params.total, budget.total))
    for component, limit in budget.components.items():
        if component not in params.components:
            known = ", ".join(params.components)
            raise KeyError(f"budget names component {component!r}, which this model does not have (components: {known})")
        value = params.components[component]
        if value > limit:
            over.append(Overshoot(component, value, limit))
    if budget.macs is not None and macs is not None and macs > budget.macs:
        over.append(Overshoot("macs", macs, budget.macs))
    return over
