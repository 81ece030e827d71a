"""The run record: what a run knows, typed, written as ``report.json`` and read back by ``--resume``.

One set of pydantic models serves the runner (which fills it in), the report
writer (which renders it), checkpoints (which carry the pass list) and resume
(which validates the stored record before trusting it).  Budget verdicts are
computed here, once, by one rule: :meth:`RunRecord.budget_verdict`.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import Field

from .accounting import Measurement, ParameterCount
from .export import ExportRecord
from .quantize import QuantizeRecord

RECORD_FORMAT = "compressor.run/1"
#: Metrics on the family's held-out test split carry this prefix (``test_ap``): measured for the
#: baseline and the final model only, never for stages, so nothing is tuned on them.
TEST_PREFIX = "test_"
#: A metric ``m``'s interval, where the family gives one (e.g. a bootstrap over images), is ``m_low``..``m_high``.
INTERVAL_SUFFIXES = ("_low", "_high")


class _Record(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", populate_by_name=True)


class RunMode(_Record):
    """The command-line choices that change what a run computes; ``--resume`` must repeat them."""

    finetune: bool = Field(description="Finetuning after each stage (off with --no-finetune).")
    evaluate: bool = Field(description="Accuracy measured for the baseline, each stage and the final model.")
    device: str = Field(description="The device type the run computes on (cpu or cuda).")

    def differences(self, other: RunMode) -> list[str]:
        """``field: stored -> given`` for every choice that differs."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{name}: {mine[name]} -> {theirs[name]}" for name in mine if mine[name] != theirs[name]]


class FinetuneRecord(_Record):
    """How a stage was finetuned, or why it was not."""

    skipped: str | None = Field(None, description="Why there was no finetuning, e.g. '--no-finetune'.")
    steps: int = 0
    seconds: float = 0.0
    teacher: str | None = Field(None, description="previous, baseline or none; for a teacher checkpoint its file name.")
    labels: Literal["ground truth", "none"] = Field(
        "ground truth", description="none: the data had no labels, the task loss was skipped (distillation only).")
    first_loss: float | None = None
    last_loss: float | None = None


class ImageFolder(_Record):
    """A folder of images without labels, as the run found it."""

    path: str
    files: int

    def __str__(self) -> str:
        return f"unlabelled images: {self.path} ({self.files} files)"


class DataRecord(_Record):
    """The folders of images without labels the run used; the labelled data is the recipe's ``data.root``."""

    images: ImageFolder | None = Field(None, description="What finetuning learned from, by distillation only.")
    eval_images: ImageFolder | None = Field(
        None, description="What the metric was measured on, by agreement with the starting model.")


class Measured(_Record):
    """The model at one point of the run: its measurement and accuracy metrics."""

    params: ParameterCount
    macs: int
    extra_macs: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, measurement: Measurement, metrics: dict[str, float]) -> Measured:
        return cls(params=measurement.params, macs=measurement.macs, extra_macs=measurement.extra_macs,
                   metrics=metrics)


class StageRecord(_Record):
    """One stage: pending, ok (with its numbers) or failed (with the message)."""

    name: str
    pass_name: str = Field(alias="pass")
    status: Literal["pending", "ok", "failed"] = "pending"
    params: ParameterCount | None = None
    macs: int | None = None
    extra_macs: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    output_drift: float | None = None
    repeats: int | None = None
    seconds: float | None = None
    message: str | None = None
    finetune: FinetuneRecord | None = None
    pass_record: dict[str, Any] = Field(default_factory=dict, description="What the pass said it did.")

    @property
    def measured(self) -> Measured | None:
        if self.status != "ok" or self.params is None or self.macs is None:
            return None
        return Measured(params=self.params, macs=self.macs, extra_macs=self.extra_macs, metrics=self.metrics)


class Verdict(_Record):
    """One limit of the budget against the model it was checked on."""

    what: str
    limit: float
    value: float | None
    status: Literal["pass", "fail", "not checked"]
    why: str = ""

    def __str__(self) -> str:
        if self.status == "not checked":
            return f"{self.what}: not checked ({self.why})"
        if self.what.startswith("accuracy drop"):
            return f"{self.what} {self.value:.4f} > budget {self.limit:.4f} (+{self.value - self.limit:.4f})"
        return f"{self.what} = {self.value:,.0f} > budget {self.limit:,.0f} (+{self.value - self.limit:,.0f})"


class BudgetVerdict(_Record):
    """The run's budget, checked: ``ok`` is True only when every limit was checked and met."""

    # ``ok`` and ``overshoots`` are derived and written for readers of report.json; ignored on reading.
    model_config = pydantic.ConfigDict(extra="ignore")

    against: str = Field(description="'final', or the latest completed step of an unfinished run.")
    verdicts: list[Verdict]
    accuracy_drop: float | None = None

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "fail"]

    @property
    def unchecked(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "not checked"]

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool | None:
        """True: all met; False: one failed; None: none failed but some could not be checked."""
        if self.failed:
            return False
        return None if self.unchecked else True

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def overshoots(self) -> list[str]:
        return [str(v) for v in self.failed]


class PassEntry(_Record):
    """A pass as applied, for checkpoints: which stage, which pass, with which params."""

    stage: str
    pass_name: str = Field(alias="pass")
    params: dict[str, Any] = Field(default_factory=dict)


class DeployRecord(_Record):
    """The deployed artifacts of a run (recipe ``export``) and their accuracy, measured as the final model's."""

    onnx: ExportRecord = Field(description="The float ONNX export (as compress export's <file>.json).")
    int8: QuantizeRecord | None = Field(None, description="The int8 quantization, when asked for.")
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Artifact (onnx, int8) -> the metrics the final model is measured by.")
    seconds: float = 0.0


class RunRecord(_Record):
    """Everything a run knows; ``report.json`` is this, serialised."""

    format: Literal["compressor.run/1"] = RECORD_FORMAT
    recipe: dict[str, Any] = Field(description="The recipe as validated (paths absolute), what --resume compares.")
    family: str
    metric: str | None = Field(description="The family's headline accuracy metric, which budgets use (its "
                               "agreement metric with data.eval_images).")
    mode: RunMode
    data: DataRecord = Field(default_factory=DataRecord)
    baseline: Measured
    stages: list[StageRecord]
    final: Measured | None = None
    budget_check: BudgetVerdict | None = None
    deployed: DeployRecord | None = None

    # ------------------------------------------------------------ derived views

    def stage_number(self, name: str) -> int:
        return next(i for i, s in enumerate(self.stages, start=1) if s.name == name)

    @property
    def completed(self) -> list[tuple[int, StageRecord]]:
        return [(i, s) for i, s in enumerate(self.stages, start=1) if s.status == "ok"]

    def latest(self) -> tuple[str, Measured]:
        """The label and numbers of the latest measured point: final, last completed stage, or baseline."""
        if self.final is not None:
            return "final", self.final
        done = self.completed
        if done:
            index, stage = done[-1]
            return f"{index} {stage.name}", stage.measured  # type: ignore[return-value]
        return "baseline", self.baseline

    def passes(self, upto: int | None = None) -> list[PassEntry]:
        """The passes of the completed stages (up to stage ``upto``), with the params the recipe gave them."""
        given = self.recipe.get("stages") or []
        return [
            PassEntry(stage=s.name, pass_name=s.pass_name, params=(given[i - 1].get("params") or {}))
            for i, s in self.completed if upto is None or i <= upto
        ]

    def budget_verdict(self) -> BudgetVerdict:
        """The recipe's final budget against the latest measured point (no limits: nothing to check).

        The one rule for accuracy: the family's headline metric (``self.metric``),
        baseline minus now; where either side was not measured the limit is
        "not checked", which is neither a pass nor a failure.
        """
        budget = self.recipe.get("budget") or {}
        limits = [("total", budget.get("total")), *((n, v) for n, v in (budget.get("components") or {}).items()),
                  ("macs", budget.get("macs"))]
        drop_limit = budget.get("max_accuracy_drop")
        against, measured = self.latest()
        verdicts = []
        for what, limit in limits:
            if limit is None:
                continue
            if what == "total":
                value: float | None = measured.params.total
            elif what == "macs":
                value = measured.macs
            else:
                value = measured.params.components.get(what)
            why = "" if value is not None else "no such component"
            verdicts.append(_verdict(what, limit, value, why))
        drop = None
        if drop_limit is not None:
            base = self.baseline.metrics.get(self.metric) if self.metric else None
            now = measured.metrics.get(self.metric) if self.metric else None
            drop = base - now if base is not None and now is not None else None
            what = f"accuracy drop ({self.metric})" if self.metric else "accuracy drop"
            why = "accuracy not evaluated" if self.metric else f"model family {self.family} has no accuracy metric"
            verdicts.append(_verdict(what, drop_limit, drop, why))
        return BudgetVerdict(against=against, verdicts=verdicts, accuracy_drop=drop)


def _verdict(what: str, limit: float, value: float | None, why: str) -> Verdict:
    if value is None:
        return Verdict(what=what, limit=limit, value=None, status="not checked", why=why)
    return Verdict(what=what, limit=limit, value=value, status="pass" if value <= limit else "fail")


def read_record(text: str, where: str) -> RunRecord:
    """A stored record, validated; raises ValueError naming the first problem."""
    try:
        return RunRecord.model_validate_json(text)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "report"
        raise ValueError(f"{where}: not a run record of this version ({loc}: {first['msg']})") from None
