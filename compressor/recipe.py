"""Recipes: the YAML a user writes, described and validated by pydantic models.

Errors name the place: the field path (``stages[2].params.reduction_ratio``)
and, where the YAML file has it, the line and column.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import Field

from .budget import Budget
from .errors import UsageError
from .family import ModelFamily
from .plugins import Registry


class _Strict(pydantic.BaseModel):
    # No NaN or infinity anywhere in a recipe: every float field is finite.
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)


#: What a name that ends up in a file name may be: letters, digits, '.', '_', '-', not starting
#: with '.' or '-', at most 64 characters.  Stage names become checkpoint file names.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")

# Upper bounds that no real recipe reaches: a value past them is a typo, and would otherwise
# surface much later as an out-of-memory, an overflow or a non-finite weight.
MAX_STEPS = 10_000_000
MAX_BATCH = 4096
MAX_SIDE = 8192
MAX_LR = 10.0

#: The teachers a finetuning names by a word; any other string is a checkpoint path.
TEACHER_WORDS = ("previous", "baseline", "none")


def _safe_name(value: str | None) -> str | None:
    if value is not None and not SAFE_NAME.fullmatch(value):
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise ValueError(f"{shown!r} is not a safe name: use at most 64 letters, digits, '.', '_' or '-', "
                         "not starting with '.' or '-' (it becomes a file name)")
    return value


class ModelSource(_Strict):
    """Where the starting model comes from."""

    family: str | None = Field(
        None,
        description="Registered model family (see `compress families`); may be left out when model.checkpoint "
        "is given (its family is read off it) or when only one family is registered.",
    )
    checkpoint: Path | None = Field(
        None,
        description="Starting weights: a checkpoint of ours or one the family reads natively (relative to the recipe). "
        "Without it the family's baseline architecture starts from random weights.",
    )
    pretrained: Path | None = Field(
        None, description="Without a checkpoint: initialise what the family can from this file (e.g. an ImageNet backbone)."
    )


class DataConfig(_Strict):
    """The dataset used for finetuning and evaluation."""

    root: Path | None = Field(
        None, description="Dataset root, in the layout the model family reads; empty: the family's default data "
        "(see `compress families`)."
    )
    images: Path | None = Field(
        None, description="A folder of images without labels (jpg/png, any sizes, searched recursively): finetuning "
        "then learns from the teacher only (the task loss is skipped). Relative to the recipe."
    )
    eval_images: Path | None = Field(
        None, description="A folder of images without labels on which each stage is measured by agreement with the "
        "starting model (the family's agreement metric) instead of the labelled validation data; for `compress "
        "train`, agreement with train.teacher. Relative to the recipe."
    )


class TrainConfig(_Strict):
    """Training settings, for `compress train` and for the finetuning after each stage."""

    steps: int = Field(0, ge=0, le=MAX_STEPS, description="Optimiser steps; 0 skips training.")
    lr: float = Field(1e-3, gt=0, le=MAX_LR, description=f"Peak learning rate (at most {MAX_LR:g}).")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Images per step (per process under torchrun).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with momentum.")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="Decoupled (AdamW) or L2 (SGD) weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warm-up from 0 to lr over these steps.")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="Decay after warm-up.")
    milestones: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [0.6, 0.85], max_length=100, description="For schedule: step, fractions of steps (0 < m < 1) where lr *= gamma."
    )
    gamma: float = Field(0.1, gt=0, le=1, description="For schedule: step, the decay factor.")
    grad_clip: float | None = Field(10.0, gt=0, le=1e6, description="Clip the gradient norm to this; empty: no clipping.")
    teacher: Literal["previous", "baseline", "none"] | Path = Field(
        "previous", description="Distil from the model before the stage (previous), from the starting model "
        "(baseline), not at all (none), or from a checkpoint of any family whose outputs match the model's "
        "(a path, relative to the recipe). `compress train` distils only from a path."
    )
    distill_weight: float = Field(1.0, ge=0, le=1e4, description="Weight of the distillation loss.")
    task_weight: float = Field(1.0, ge=0, le=1e4, description="Weight of the task (ground-truth) loss.")
    temperature: float = Field(2.0, gt=0, le=100, description="Distillation temperature for class logits.")
    amp: bool = Field(True, description="Mixed precision (CUDA only; ignored on the CPU).")
    checkpoint_every: int = Field(100, ge=1, le=MAX_STEPS,
                                  description="`compress train`: save a resumable checkpoint this often.")
    eval_every: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="`compress train`: measure the validation metric this often (a multiple of checkpoint_every; "
        "BatchNorm statistics re-estimated first, on a copy), for the curve in the train report; empty: only at the end.")

    @pydantic.field_validator("teacher", mode="before")
    @classmethod
    def _word_or_path(cls, value: Any) -> Any:
        # Any string but the three words is a path; one error for anything else, not one per union member.
        if isinstance(value, Path) or value in TEACHER_WORDS:
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected {', '.join(TEACHER_WORDS)} or a checkpoint path, got {value!r}")
        return Path(value)

    @pydantic.model_validator(mode="after")
    def _warmup_within_steps(self) -> TrainConfig:
        if self.steps and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than steps ({self.steps})")
        if self.eval_every is not None and self.eval_every % self.checkpoint_every:
            # Each curve point is stored in the checkpoint of its step, so a resumed training keeps its curve.
            raise ValueError(f"eval_every ({self.eval_every}) is not a multiple of checkpoint_every "
                             f"({self.checkpoint_every})")
        return self


class FinalBudget(Budget):
    """The run's final targets."""

    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1e6,
        description="Largest drop of the accuracy metric against the starting model, in metric units (e.g. 0.02 AP); "
        "with data.eval_images, the largest 1 - agreement.",
    )


class Until(Budget):
    """Repeat a stage's pass until these limits hold."""

    max_repeats: int = Field(10, ge=1, le=1000, description="Give up (and fail the stage) after this many applications.")


class Stage(_Strict):
    """One compression pass, its params and its checks."""

    model_config = pydantic.ConfigDict(extra="forbid", populate_by_name=True)

    pass_name: str = Field(alias="pass", description="Registered pass name (see `compress passes`).")
    name: str | None = Field(None, description="Stage name in reports and checkpoints; defaults to the pass name.")
    params: dict[str, Any] = Field(default_factory=dict, description="The pass's params (see `compress passes`).")
    finetune: dict[str, Any] | None = Field(None, description="Overrides of the top-level finetune settings.")
    budget: Budget | None = Field(None, description="Limits checked right after the pass.")
    until: Until | None = Field(None, description="Repeat the pass until these limits hold.")

    _names_are_safe = pydantic.field_validator("name", "pass_name")(classmethod(lambda cls, v: _safe_name(v)))

    @property
    def label(self) -> str:
        return self.name or self.pass_name


class _RunSettings(_Strict):
    """What compression and training recipes share."""

    model: ModelSource = Field(default_factory=ModelSource)
    input_size: tuple[Annotated[int, Field(ge=1, le=MAX_SIDE)], Annotated[int, Field(ge=1, le=MAX_SIDE)]] = Field(
        (640, 640), description=f"(height, width) for training, validation, MACs and drift, each at most {MAX_SIDE}; "
        "an int means square."
    )
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for everything random in the run (0 <= seed < 2**32).")
    plugins: list[str] = Field(default_factory=list, description="Extra plugins: dotted module paths or .py files.")
    data: DataConfig = Field(default_factory=DataConfig)

    @pydantic.field_validator("input_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value


class TrainRecipe(_RunSettings):
    """A training recipe (`compress train`): a model, data and training settings."""

    train: TrainConfig = Field(default_factory=TrainConfig)


class ExportConfig(_Strict):
    """The deployed artifacts a run ends with, after the final checkpoint: ONNX, and int8 if asked."""

    format: Literal["onnx"] = Field("onnx", description="The exchange format (ONNX, run with ONNX Runtime).")
    int8: bool = Field(False, description="Also an int8 model (static post-training quantization), final.int8.onnx.")
    calibration_images: int = Field(32, ge=1, le=10_000, description="With int8: how many images calibrate it.")
    calibration_data: Path | None = Field(
        None, description="With int8: a folder of images to calibrate on (relative to the recipe); empty: the "
        "recipe's data.images, else its labelled training split.")
    dynamic: bool = Field(False, description="Dynamic batch and image size instead of the recipe's input size.")


class Recipe(_RunSettings):
    """A compression recipe."""

    finetune: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[Stage] = Field(default_factory=list)
    budget: FinalBudget = Field(default_factory=FinalBudget)
    export: ExportConfig | None = Field(None, description="Deployed artifacts written after the final model "
                                        "and measured like it (see `compress export`).")

    @pydantic.model_validator(mode="after")
    def _unique_stage_names(self) -> Recipe:
        seen: set[str] = set()
        for index, stage in enumerate(self.stages):
            if stage.label in seen:
                raise ValueError(f"stages[{index}]: stage name {stage.label!r} is used twice; give it a distinct `name`")
            seen.add(stage.label)
        return self

    @pydantic.model_validator(mode="after")
    def _exports_measurable(self) -> Recipe:
        if self.export is not None and self.data.eval_images is not None and not self.export.dynamic:
            raise ValueError("export.dynamic: false, but data.eval_images measures the exported models on photos "
                             "at their own sizes: set export.dynamic: true")
        return self

    def finetune_for(self, stage: Stage) -> TrainConfig:
        if not stage.finetune:
            return self.finetune
        return TrainConfig.model_validate({**self.finetune.model_dump(), **stage.finetune})

    def finetune_field(self, index: int, name: str) -> str:
        """Where stage ``index`` (0-based) gets finetuning setting ``name``: its own override or the top level."""
        overrides = self.stages[index].finetune or {}
        return f"stages[{index}].finetune.{name}" if name in overrides else f"finetune.{name}"


# ---------------------------------------------------------------- loading


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (no tags beyond plain data), refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # complex keys: the base class refuses the unhashable ones
            key = self.construct_object(key_node)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {first_line[key] + 1} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """Plain data from YAML text; every problem is one UsageError naming the place."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UsageError(f"{where}: {at}invalid YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{where}: invalid YAML: {err}") from None
    except RecursionError:
        raise UsageError(f"{where}: invalid YAML: nested too deeply") from None


def read_text(path: Path) -> str:
    """A text file's content as UTF-8, or one UsageError saying why not."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror or err})") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                kind: type[_RunSettings] = Recipe) -> tuple[Any, dict]:
    """Read, override and validate a recipe file.  Returns the recipe and its raw data."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such recipe file")
    text = read_text(path)
    raw = parse_yaml(text, str(path))
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a recipe is a mapping of keys (model, stages, ...), not a {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    recipe = validate_data(raw, path, text if not overrides else None, kind)
    return recipe, raw


def validate_data(raw: dict, path: Path, text: str | None = None, kind: type[_RunSettings] = Recipe) -> Any:
    try:
        recipe = kind.model_validate(raw)
    except pydantic.ValidationError as err:
        raise UsageError(f"{path}: " + describe_validation_error(err, text)) from err
    base = path.parent.resolve()  # the same recipe means the same thing from any working directory
    for field_name in ("checkpoint", "pretrained"):
        value = getattr(recipe.model, field_name)
        if value is not None and not value.is_absolute():
            setattr(recipe.model, field_name, base / value)
    for field_name in ("root", "images", "eval_images"):
        value = getattr(recipe.data, field_name)
        if value is not None and not value.is_absolute():
            setattr(recipe.data, field_name, base / value)
    export = recipe.export if isinstance(recipe, Recipe) else None
    if export is not None and export.calibration_data is not None and not export.calibration_data.is_absolute():
        export.calibration_data = base / export.calibration_data
    settings = recipe.train if isinstance(recipe, TrainRecipe) else recipe.finetune
    if isinstance(settings.teacher, Path):
        settings.teacher = base / settings.teacher  # an absolute path stays as it is
    for stage in recipe.stages if isinstance(recipe, Recipe) else []:
        # Overrides stay raw until finetune_for validates them; a path among them is resolved here all the same.
        teacher = (stage.finetune or {}).get("teacher")
        if isinstance(teacher, str) and teacher not in TEACHER_WORDS and teacher.strip():
            stage.finetune["teacher"] = str(base / teacher)  # type: ignore[index]
    return recipe


def describe_validation_error(err: pydantic.ValidationError, text: str | None = None, prefix: tuple = ()) -> str:
    """One line per problem: ``field.path: message`` (with the YAML line when known)."""
    lines = []
    for problem in err.errors():
        loc = prefix + tuple(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key" + _key_suggestion(loc, problem)
        where = _line_of(text, loc) if text else ""
        lines.append(f"{format_path(loc)}{where}: {message}")
    return "; ".join(lines)


def _key_suggestion(loc: tuple, problem: dict) -> str:
    """' (did you mean x?)' for a misspelt key of a recipe model."""
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (allowed: {', '.join(names)})"


def _model_at(loc: tuple) -> type[pydantic.BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, pydantic.BaseModel)), None)
        if model is None:
            inner = [a for c in candidates for a in getattr(c, "__args__", ())]
            model = next((c for c in inner if isinstance(c, type) and issubclass(c, pydantic.BaseModel)), None)
        if model is None:
            return None
    return model


def format_path(loc: tuple) -> str:
    """('stages', 2, 'params', 'x') -> 'stages[2].params.x'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "recipe"


def _line_of(text: str, loc: tuple) -> str:
    """' (line N)' for the YAML node at ``loc``, or '' when it cannot be found."""
    try:
        node = yaml.compose(text, Loader=_RecipeLoader)
    except (yaml.YAMLError, RecursionError):
        return ""
    found = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            found, node = match[0], match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            found = node
        else:
            break
    if found is None:
        return ""
    return f" (line {found.start_mark.line + 1})"


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(raw: dict, override: str) -> None:
    """Apply ``key.path=value`` (value parsed as YAML) to the raw recipe data."""
    if "=" not in override:
        raise UsageError(f"--set {override!r}: expected key.path=value")
    key, value_text = override.split("=", 1)
    parts = [m[1] if m[1] is not None else int(m[2]) for m in _PATH_PART.finditer(key.strip())]
    parts = [int(p) if isinstance(p, str) and p.isdigit() else p for p in parts]
    if not parts:
        raise UsageError(f"--set {override!r}: empty key path")
    value = parse_yaml(value_text, f"--set {override!r}: the value")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        try:
            node = node[part] if isinstance(part, int) else node.setdefault(part, {})
        except (IndexError, KeyError, TypeError, AttributeError):
            raise UsageError(f"--set {override!r}: {format_path(tuple(parts[: depth + 1]))} does not exist") from None
    last = parts[-1]
    try:
        node[last] = value
    except (IndexError, TypeError):
        raise UsageError(f"--set {override!r}: {format_path(tuple(parts))} does not exist") from None


# ------------------------------------------------------- checks against plugins


def check_sources(recipe: Recipe | TrainRecipe, path: Path) -> None:
    """Every file or folder the recipe names is there (stage finetune overrides already validated)."""
    for field_name in ("checkpoint", "pretrained"):
        value = getattr(recipe.model, field_name)
        if value is not None and not value.exists():
            raise UsageError(f"{path}: model.{field_name}: no such file: {value}")
    for field_name in ("root", "images", "eval_images"):
        value = getattr(recipe.data, field_name)
        if value is not None and not value.is_dir():
            raise UsageError(f"{path}: data.{field_name}: no such folder: {value}")
    export = recipe.export if isinstance(recipe, Recipe) else None
    if export is not None and export.calibration_data is not None and not export.calibration_data.is_dir():
        raise UsageError(f"{path}: export.calibration_data: no such folder: {export.calibration_data}")
    for where, teacher in _teachers(recipe):
        if isinstance(teacher, Path) and not teacher.exists():
            raise UsageError(f"{path}: {where}: no such file or run folder: {teacher}")


def _teachers(recipe: Recipe | TrainRecipe) -> list[tuple[str, str | Path]]:
    """(field path, teacher) for every place the recipe sets one: ``train``, or ``finetune`` and the stages'."""
    if isinstance(recipe, TrainRecipe):
        return [("train.teacher", recipe.train.teacher)]
    return [("finetune.teacher", recipe.finetune.teacher),
            *((f"stages[{i}].finetune.teacher", recipe.finetune_for(s).teacher)
              for i, s in enumerate(recipe.stages) if "teacher" in (s.finetune or {}))]


def check_teachers(recipe: Recipe | TrainRecipe, path: Path) -> None:
    """Training on images without labels needs a teacher to learn from, and weight on its loss."""
    if isinstance(recipe, TrainRecipe):
        _check_train_teacher(recipe, path)
        return
    if recipe.data.images is None:
        return
    for index, stage in enumerate(recipe.stages):
        settings = recipe.finetune_for(stage)
        if not settings.steps:
            continue
        if settings.teacher == "none":
            raise UsageError(f"{path}: {recipe.finetune_field(index, 'teacher')}: none, but data.images has no "
                             "labels: nothing to learn from (distil from previous, baseline or a checkpoint)")
        if settings.distill_weight == 0:
            raise UsageError(f"{path}: {recipe.finetune_field(index, 'distill_weight')}: 0, but data.images has "
                             "no labels: nothing to learn from")


def _check_train_teacher(recipe: TrainRecipe, path: Path) -> None:
    # `compress train` has no model before a stage nor a starting model worth distilling from: its teacher is a path.
    train = recipe.train
    if recipe.data.images is not None and train.steps:
        if not isinstance(train.teacher, Path):
            raise UsageError(f"{path}: train.teacher: {train.teacher}, but data.images has no labels: training "
                             "then needs a teacher checkpoint to learn from (a path)")
        if train.distill_weight == 0:
            raise UsageError(f"{path}: train.distill_weight: 0, but data.images has no labels: nothing to learn from")
    if recipe.data.eval_images is not None and not isinstance(train.teacher, Path):
        raise UsageError(f"{path}: data.eval_images: `compress train` measures agreement with train.teacher, "
                         f"which must then be a checkpoint path, not {train.teacher}")


def check_against_registry(recipe: Recipe, registry: Registry, path: Path) -> list[pydantic.BaseModel]:
    """Resolve every stage's pass and validate its params (no model needed); returns the params objects."""
    for index, stage in enumerate(recipe.stages):
        try:
            recipe.finetune_for(stage)
        except pydantic.ValidationError as err:
            raise UsageError(f"{path}: " + describe_validation_error(err, None, ("stages", index, "finetune"))) from err
    params = []
    for index, stage in enumerate(recipe.stages):
        where = f"{path}: stages[{index}].pass: "
        pass_cls = registry.get_pass(stage.pass_name, where=where)
        try:
            params.append(pass_cls.Params.model_validate(stage.params))
        except pydantic.ValidationError as err:
            raise UsageError(f"{path}: " + describe_validation_error(err, None, ("stages", index, "params"))) from err
    return params


def check_budget_components(recipe: Recipe, family: ModelFamily, path: Path) -> None:
    """Budgets may only name components the family counts (``other`` included)."""
    known = (*family.components, "other")
    budgets: list[tuple[str, Budget | None]] = [("budget", recipe.budget)]
    for index, stage in enumerate(recipe.stages):
        budgets += [(f"stages[{index}].budget", stage.budget), (f"stages[{index}].until", stage.until)]
    for where, budget in budgets:
        for name in budget.components if budget else ():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}?" if close else f"components: {', '.join(known)}"
                raise UsageError(f"{path}: {where}.components.{name}: no such component ({hint})")
