"""The stage loop: apply, validate, finetune, measure, checkpoint, report; and resume.

The runner only sequences; each step is a function with its own home
(validate.py, accounting.py, checkpoint.py, report.py), and what the run knows
is one typed :class:`~compressor.record.RunRecord`.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import accounting
from .budget import Budget, check_budget
from .checkpoint import FINAL_NAME, LoadedModel, open_model, save_checkpoint
from .errors import CheckFailed, UsageError
from .family import ModelFamily, PairedMetrics
from .export import export_onnx
from .finite import describe_non_finite, non_finite_tensors
from .onnx_model import OnnxModel
from .passes import Pass, PassContext, PassResult, check_stages_apply
from .progress import Progress
from .quantize import export_int8
from .record import TEST_PREFIX, DeployRecord, FinetuneRecord, Measured, RunMode, RunRecord, StageRecord, read_record
from .recipe import Recipe, Stage
from .report import REPORT_JSON, write_report
from .runfolder import RunFolder
from .session import OpenedRecipe
from .train import distributed, init_distributed, is_main_process, train
from .validate import contract_violations, forward_eval, non_finite_outputs, output_contract, output_drift

CHECKPOINT_DIR = "checkpoints"
#: The deployed artifacts of a recipe's ``export``, beside final.pt.
ONNX_NAME = "final.onnx"
INT8_NAME = "final.int8.onnx"


@dataclass
class RunOptions:
    resume: bool = False
    finetune: bool = True
    quiet: bool = False


@dataclass
class RunContext:
    """What every stage of one run shares."""

    opened: OpenedRecipe
    example: torch.Tensor
    progress: Progress
    starting_model: nn.Module
    contract: list
    mode: RunMode
    record: RunRecord | None
    #: The teacher checkpoints the stages' finetuning names, each loaded once.
    teachers: dict[Path, nn.Module]

    @property
    def recipe(self) -> Recipe:
        return self.opened.recipe

    def sample_inputs(self, count: int) -> torch.Tensor:
        """``count`` real inputs from the run's data, as int8 calibration reads them (the family's choice)."""
        recipe = self.recipe
        calibration = self.family.calibration_inputs(recipe.data.root, recipe.data.images, recipe.input_size, count)
        return torch.cat(calibration.images).to(self.device)

    @property
    def family(self) -> ModelFamily:
        return self.opened.family

    @property
    def device(self) -> torch.device:
        return self.opened.device

    @property
    def out_dir(self) -> Path:
        return self.opened.out_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_recipe(opened: OpenedRecipe, options: RunOptions) -> RunRecord:
    """Run (or resume) an opened recipe; returns the final record.  Raises CompressorError on failure.

    The run folder is locked for the whole run (by rank 0 under torchrun, the one that writes).
    """
    init_distributed(opened.device)
    with RunFolder(opened.out_dir) if is_main_process() else contextlib.nullcontext():
        return _run(opened, options)


def _run(opened: OpenedRecipe, options: RunOptions) -> RunRecord:
    recipe, family, out_dir = opened.recipe, opened.family, opened.out_dir
    progress = Progress(options.quiet or not is_main_process())
    mode = RunMode(finetune=options.finetune, evaluate=options.finetune and family.supports_training,
                   device=opened.device.type)
    recipe_record = recipe_as_record(recipe)

    previous = _read_previous(out_dir) if is_main_process() or options.resume else None
    if previous is not None and not options.resume:
        raise UsageError(f"{out_dir}: already holds a run; use --resume to continue it, or --out for a new folder")
    if previous is None and options.resume:
        raise UsageError(f"{out_dir}: no run to resume (no {REPORT_JSON}); start it without --resume")
    if previous is not None:
        _check_same_run(out_dir, previous, recipe_record, mode)

    seed_everything(recipe.seed)
    first_model = opened.starting_model().to(opened.device)
    check_stages_apply(opened, first_model)
    height, width = recipe.input_size
    example = family.example_input(height, width, batch_size=2, seed=recipe.seed).to(opened.device)
    contract = output_contract(forward_eval(first_model, example))
    ctx = RunContext(opened=opened, example=example, progress=progress, starting_model=first_model,
                     contract=contract, mode=mode, record=previous,
                     teachers=_teachers(opened, mode, example, contract))

    if previous is not None:
        model = _resume_model(ctx)
    else:
        ctx.record = RunRecord(
            recipe=recipe_record, family=family.name, metric=opened.metric or None, mode=mode, data=opened.data,
            # With data.eval_images the starting model is measured against itself too (1.0 when all is well).
            baseline=Measured.of(_measure(ctx, first_model), _evaluate(ctx, first_model)),
            stages=[StageRecord(name=s.label, pass_name=s.pass_name) for s in recipe.stages],
        )
        model = copy.deepcopy(first_model)
        _write(ctx)

    if ctx.record.final is not None and (out_dir / FINAL_NAME).is_file():
        if recipe.export is not None and ctx.record.deployed is None:  # stopped while exporting
            _deploy(ctx, open_model(out_dir / FINAL_NAME).model)
            return ctx.record
        progress.echo(f"{out_dir}: run already complete; nothing to do")
        return ctx.record

    total = len(recipe.stages)
    for index, (stage, params) in enumerate(zip(recipe.stages, opened.stage_params), start=1):
        if ctx.record.stages[index - 1].status == "ok":
            continue
        progress.stage(index, total, stage.label, stage.pass_name)
        model = _run_stage(ctx, index, stage, params, model)

    return _finish(ctx, model)


def _teachers(opened: OpenedRecipe, mode: RunMode, example: torch.Tensor, contract: list) -> dict[Path, nn.Module]:
    """Every teacher checkpoint a stage will finetune from, loaded and checked against the student before any work."""
    recipe = opened.recipe
    if not (mode.finetune and opened.family.supports_training):
        return {}
    teachers: dict[Path, nn.Module] = {}
    for index, stage in enumerate(recipe.stages):
        settings = recipe.finetune_for(stage)
        if settings.steps and isinstance(settings.teacher, Path) and settings.teacher not in teachers:
            teachers[settings.teacher] = opened.teacher(settings.teacher, recipe.finetune_field(index, "teacher"),
                                                        example, contract)
    return teachers


def recipe_as_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe as it is stored in the run record and checkpoints (what --resume compares)."""
    return recipe.model_dump(mode="json", by_alias=True)


def _read_previous(out_dir: Path) -> RunRecord | None:
    path = out_dir / REPORT_JSON
    if not path.is_file():
        return None
    try:
        return read_record(path.read_text(), str(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{err}; start a new run with --out") from err


def _check_same_run(out_dir: Path, previous: RunRecord, recipe: dict[str, Any], mode: RunMode) -> None:
    """--resume continues only the same computation: the same recipe and the same mode."""
    changed = first_difference(previous.recipe, recipe)
    if changed is not None:
        raise UsageError(f"{out_dir}: the recipe differs from the one this run started with ({changed}); "
                         "start a new run with --out")
    modes = previous.mode.differences(mode)
    if modes:
        raise UsageError(f"{out_dir}: this run started in another mode ({'; '.join(modes)}); resume it with the same "
                         "options, or start a new run with --out")


def first_difference(before: Any, after: Any, path: str = "") -> str | None:
    """``field.path: old -> new`` for the first place two JSON-like values differ, else None."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in [*before, *(k for k in after if k not in before)]:
            found = first_difference(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for i, (a, b) in enumerate(zip(before, after)):
            found = first_difference(a, b, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if before != after:
        return f"{path or 'recipe'}: {before!r} -> {after!r}"
    return None


def _write(ctx: RunContext) -> None:
    """Reports are written by one process only (rank 0 under torchrun)."""
    if is_main_process():
        write_report(ctx.out_dir, ctx.record)


def _checkpoint_path(out_dir: Path, index: int, label: str) -> Path:
    # Stage names are validated as safe file names when the recipe loads; this is the second line of defence.
    return RunFolder(out_dir).inside(CHECKPOINT_DIR, f"stage-{index:02d}-{label}.pt")


def _resume_model(ctx: RunContext) -> nn.Module:
    done = ctx.record.completed
    if not done:
        ctx.progress.echo(f"resuming {ctx.out_dir}: no stage completed yet, starting from the beginning")
        return copy.deepcopy(ctx.starting_model)
    last, stage = done[-1]
    ctx.progress.echo(f"resuming {ctx.out_dir} after stage {last} ({stage.name})")
    return open_model(_checkpoint_path(ctx.out_dir, last, stage.name), ctx.opened.app.registry).model.to(ctx.device)


def _measure(ctx: RunContext, model: nn.Module) -> accounting.Measurement:
    return accounting.measure(model, ctx.family, ctx.recipe.input_size, device=ctx.device)


def _run_stage(ctx: RunContext, index: int, stage: Stage, params: Any, model: nn.Module) -> nn.Module:
    started = time.monotonic()
    where = f"stage {index} ({stage.label})"
    record = ctx.record.stages[index - 1]
    seed_everything(ctx.recipe.seed + index)
    try:
        new_model, repeats, pass_record = _apply(ctx, where, stage, params, model)
        outputs = _validate(ctx, where, stage, new_model)
        drift = output_drift(forward_eval(model, ctx.example), outputs)
        pass_cls = ctx.opened.app.registry.get_pass(stage.pass_name)
        if pass_cls.lossless and drift != 0.0:
            raise CheckFailed(f"{where}: pass {stage.pass_name} declares itself lossless but changed the outputs "
                              f"by up to {drift:.3g}")
        finetune = _finetune(ctx, index, stage, model, new_model)
        measurement = _measure(ctx, new_model)
        metrics = _evaluate(ctx, new_model)
    except (CheckFailed, UsageError) as err:
        record.status, record.message = "failed", str(err)
        record.seconds = round(time.monotonic() - started, 3)
        _write(ctx)
        raise
    ctx.record.stages[index - 1] = StageRecord(
        name=record.name, pass_name=record.pass_name, status="ok", params=measurement.params,
        macs=measurement.macs, extra_macs=measurement.extra_macs, metrics=metrics, output_drift=drift,
        repeats=repeats, seconds=round(time.monotonic() - started, 3), finetune=finetune, pass_record=pass_record,
    )
    ctx.record.budget_check = ctx.record.budget_verdict()
    if is_main_process():
        save_checkpoint(_checkpoint_path(ctx.out_dir, index, stage.label), new_model, ctx.family,
                        recipe=ctx.record.recipe, passes=ctx.record.passes(upto=index), extra={"stage": index})
    _write(ctx)
    shown = _headline(ctx, metrics)
    ctx.progress.echo(f"    ok: {measurement.params.total:,} parameters, drift {drift:.3g}{shown}, "
                      f"{ctx.record.stages[index - 1].seconds:.1f}s")
    return new_model


def _apply(ctx: RunContext, where: str, stage: Stage, params: Any,
           model: nn.Module) -> tuple[nn.Module, int, dict[str, Any]]:
    """Apply the pass (repeatedly, with ``until``) to a copy, so the input model stays intact."""
    instance: Pass = ctx.opened.app.registry.get_pass(stage.pass_name)()
    pass_ctx = PassContext(family=ctx.family, example_input=ctx.example, device=ctx.device,
                           sample_inputs=ctx.sample_inputs)
    try:
        instance.check(model, params, pass_ctx)
    except ValueError as err:
        raise UsageError(f"{where}: {stage.pass_name}: {err}") from err
    current = model
    records: list[dict[str, Any]] = []
    limit = stage.until.max_repeats if stage.until else 1
    for repeat in range(1, limit + 1):
        candidate = copy.deepcopy(current)
        try:
            result = instance.apply(candidate, params, pass_ctx)
        except (CheckFailed, UsageError):
            raise
        except Exception as err:
            raise CheckFailed(f"{where}: pass {stage.pass_name} raised {type(err).__name__}: {err}") from err
        if isinstance(result, PassResult):
            result, pass_record = result.model, result.record
            records.append(pass_record)
        if not isinstance(result, nn.Module):
            raise CheckFailed(f"{where}: pass {stage.pass_name} returned {type(result).__name__}, not a model")
        current = result.to(ctx.device)
        if stage.until is None or not _over(ctx, current, stage.until):
            return current, repeat, _merged(records)
    over = "; ".join(str(o) for o in _over(ctx, current, stage.until))  # type: ignore[arg-type]
    raise CheckFailed(f"{where}: until not reached after {limit} repeats: {over}")


def _merged(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One application's record as it is; repeated applications' records listed in order."""
    if not records:
        return {}
    return records[0] if len(records) == 1 else {"applications": records}


def _over(ctx: RunContext, model: nn.Module, budget: Budget) -> list:
    measurement = accounting.measure(model, ctx.family, ctx.recipe.input_size, device=ctx.device,
                                     macs=budget.macs is not None)
    return check_budget(measurement.params, measurement.macs if budget.macs is not None else None, budget)


def _validate(ctx: RunContext, where: str, stage: Stage, model: nn.Module) -> object:
    """Check the model a pass returned; returns its outputs on the example batch."""
    if non_finite_tensors(model):  # before any forward: some kernels crash on NaN rather than return it
        raise CheckFailed(f"{where}: pass {stage.pass_name} left non-finite weights: {describe_non_finite(model)}")
    try:
        ctx.family.spec_of(model)
    except Exception as err:
        raise CheckFailed(f"{where}: pass {stage.pass_name} left a model its family cannot describe: {err}") from err
    try:
        outputs = forward_eval(model, ctx.example)
    except Exception as err:
        raise CheckFailed(f"{where}: pass {stage.pass_name} broke the forward: {type(err).__name__}: {err}") from err
    problems = contract_violations(ctx.contract, outputs)
    if problems:
        raise CheckFailed(f"{where}: pass {stage.pass_name} broke the output contract: {'; '.join(problems)}")
    bad = non_finite_outputs(outputs)
    if bad:
        raise CheckFailed(f"{where}: pass {stage.pass_name} produced NaN/Inf in {', '.join(bad)}")
    if stage.budget is not None:
        over = _over(ctx, model, stage.budget)
        if over:
            raise CheckFailed(f"{where}: " + "; ".join(str(o) for o in over))
    return outputs


def _finetune(ctx: RunContext, index: int, stage: Stage, before: nn.Module, model: nn.Module) -> FinetuneRecord:
    """Finetune ``model`` in place with distillation, as the recipe says; returns the record."""
    settings = ctx.recipe.finetune_for(stage)
    if not ctx.mode.finetune:
        return FinetuneRecord(skipped="--no-finetune")
    if settings.steps == 0:
        return FinetuneRecord(skipped="finetune.steps is 0")
    if not ctx.family.supports_training:
        return FinetuneRecord(skipped=f"model family {ctx.family.name} has no training support")
    if isinstance(settings.teacher, Path):
        # Loaded once for the run, never trained: shared by the stages that name it.
        teacher, teacher_name = ctx.teachers[settings.teacher], settings.teacher.name
    else:
        known = {"previous": before, "baseline": ctx.starting_model, "none": None}[settings.teacher]
        teacher, teacher_name = (copy.deepcopy(known) if known is not None else None), settings.teacher
    rank, world = distributed()
    images, seed = ctx.recipe.data.images, ctx.recipe.seed + index
    if images is not None:  # no labels: the batches' targets are None and the loss is distillation only
        batches = ctx.family.unlabelled_batches(images, ctx.recipe.input_size, settings.batch_size, seed, rank,
                                                world, ctx.device)
    else:
        batches = ctx.family.training_batches(ctx.recipe.data.root, ctx.recipe.input_size, settings.batch_size,
                                              seed, rank, world, ctx.device)
    result = train(model, ctx.family, settings, batches, device=ctx.device, teacher=teacher,
                   progress=ctx.progress, where=f"stage {index} ({stage.label}): finetune")
    return FinetuneRecord(steps=result.steps, seconds=result.seconds, teacher=teacher_name,
                          labels="none" if images is not None else "ground truth",
                          first_loss=result.first_loss, last_loss=result.last_loss)


def _evaluate(ctx: RunContext, model: nn.Module) -> dict[str, float]:
    """Accuracy metrics, when the run's mode evaluates (not with --no-finetune) and on rank 0.

    With data.eval_images, agreement with the starting model instead of accuracy on labelled data.
    """
    if not ctx.mode.evaluate or not is_main_process():
        return {}
    images = ctx.recipe.data.eval_images
    if images is not None:
        ctx.progress.echo(f"    measuring agreement with the starting model on {images} ...")
        return ctx.family.agreement(model, ctx.starting_model, images, ctx.device)
    ctx.progress.echo("    evaluating on the validation split ...")
    return ctx.family.evaluate(model, ctx.recipe.data.root, ctx.recipe.input_size, ctx.device)


def _held_out(ctx: RunContext, model: nn.Module) -> PairedMetrics | None:
    """The starting and the final model on the family's held-out test split, paired image by image.

    Only these two are measured there (stages are measured on the validation split, and
    recipes tuned on it), once, at the end.  None when the run does not evaluate, measures
    agreement (data.eval_images), or the data has no test split.
    """
    if not ctx.mode.evaluate or not is_main_process() or ctx.recipe.data.eval_images is not None:
        return None
    if not ctx.family.has_test_split(ctx.recipe.data.root):
        return None
    ctx.progress.echo("evaluating the starting and the final model on the held-out test split ...")
    return ctx.family.evaluate_pair(ctx.starting_model, model, ctx.recipe.data.root, ctx.recipe.input_size,
                                    ctx.device, split="test")


def _test_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {f"{TEST_PREFIX}{key}": value for key, value in metrics.items()}


def _finish(ctx: RunContext, model: nn.Module) -> RunRecord:
    done = ctx.record.completed
    metrics = dict(done[-1][1].metrics) if done else dict(ctx.record.baseline.metrics)
    held_out = _held_out(ctx, model)
    if held_out is not None:
        ctx.record.baseline.metrics |= _test_metrics(held_out.reference)
        metrics |= _test_metrics(held_out.model | held_out.drop)
    ctx.record.final = Measured.of(_measure(ctx, model), metrics)
    verdict = ctx.record.budget_check = ctx.record.budget_verdict()
    _write(ctx)
    if verdict.failed:
        raise CheckFailed("final budget: " + "; ".join(verdict.overshoots))
    if is_main_process():
        save_checkpoint(ctx.out_dir / FINAL_NAME, model, ctx.family, recipe=ctx.record.recipe,
                        passes=ctx.record.passes(), extra={"metrics": metrics})
    if verdict.unchecked:
        ctx.progress.echo("budget: " + "; ".join(str(v) for v in verdict.unchecked))
    ctx.progress.echo(f"done: {ctx.record.final.params.total:,} parameters -> {ctx.out_dir / FINAL_NAME}")
    if ctx.recipe.export is not None:
        _deploy(ctx, model)
    return ctx.record


def _deploy(ctx: RunContext, model: nn.Module) -> None:
    """The recipe's ``export``: final.onnx (and final.int8.onnx), each measured like the final model."""
    if not is_main_process():
        return
    config, out_dir, family = ctx.recipe.export, ctx.out_dir, ctx.family
    assert config is not None
    started = time.perf_counter()
    loaded = LoadedModel(family, model.cpu(), str(out_dir / FINAL_NAME), {"recipe": ctx.record.recipe})
    onnx_path, int8_path = out_dir / ONNX_NAME, out_dir / INT8_NAME
    size = tuple(ctx.recipe.input_size)
    quantized = None
    if config.int8:
        data = ctx.recipe.data
        calibration = family.calibration_inputs(data.root, config.calibration_data or data.images, size,
                                                config.calibration_images)
        ctx.progress.echo(f"export: {onnx_path} (checked against PyTorch in ONNX Runtime) and {int8_path} (int8, "
                          f"calibrated on {len(calibration.images)} images: {calibration.source}) ...")
        both = export_int8(loaded, int8_path, input_size=size, dynamic=config.dynamic, calibration=calibration.images,
                           calibration_from=calibration.source, float_out=onnx_path)
        exported, quantized = both.float_model, both.quantization
    else:
        ctx.progress.echo(f"export: {onnx_path} (checked against PyTorch in ONNX Runtime) ...")
        exported = export_onnx(loaded, onnx_path, input_size=size, dynamic=config.dynamic)
    metrics = {"onnx": _evaluate(ctx, OnnxModel(onnx_path))}
    if quantized is not None:
        metrics["int8"] = _evaluate(ctx, OnnxModel(int8_path))
    ctx.record.deployed = DeployRecord(onnx=exported, int8=quantized, metrics={k: v for k, v in metrics.items() if v},
                                       seconds=time.perf_counter() - started)
    _write(ctx)
    for artifact, values in ctx.record.deployed.metrics.items():
        ctx.progress.echo(f"export: {artifact}{_headline(ctx, values)}")


def _headline(ctx: RunContext, metrics: dict[str, float]) -> str:
    """``, <metric> <value>`` for the run's headline metric, when it was measured."""
    metric = ctx.record.metric
    return f", {metric} {metrics[metric]:.4f}" if metric in metrics else ""
