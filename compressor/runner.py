"""The stage loop: apply, validate, finetune, measure, checkpoint, report; and resume.

The runner only sequences; each step is a function with its own home
(validate.py, accounting.py, checkpoint.py, report.py).
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import accounting
from .budget import Budget, check_budget
from .checkpoint import FINAL_NAME, open_model, save_checkpoint
from .errors import CheckFailed, UsageError
from .family import ModelFamily
from .passes import Pass, PassContext
from .plugins import Registry, load_registry
from .progress import Progress
from .recipe import Recipe, Stage, check_against_registry, load_recipe
from .report import write_report
from .train import distributed, init_distributed, is_main_process, train
from .validate import contract_violations, forward_eval, non_finite_outputs, output_contract, output_drift

CHECKPOINT_DIR = "checkpoints"


@dataclass
class RunOptions:
    out_dir: Path | None = None
    resume: bool = False
    finetune: bool = True
    device: str = "cpu"
    overrides: list[str] = field(default_factory=list)
    quiet: bool = False


@dataclass
class RunContext:
    """What every stage of one run shares."""

    recipe: Recipe
    family: ModelFamily
    registry: Registry
    out_dir: Path
    device: torch.device
    example: torch.Tensor
    progress: Progress
    finetune: bool
    starting_model: nn.Module
    contract: list = field(default_factory=list)
    report: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_out_dir(recipe_path: Path) -> Path:
    return Path("runs") / recipe_path.stem


def measure(model: nn.Module, family: ModelFamily, height: int, width: int, device: torch.device) -> dict:
    """Parameters by component and MACs (batch 1) of ``model``."""
    params = accounting.count_parameters(model, family.component_of, family.components)
    example = family.example_input(height, width, batch_size=1).to(device)
    macs = accounting.count_macs(model, example)
    return {"params": params.to_dict(), "macs": macs.macs, "extra_macs": macs.extra}


def run_recipe(recipe_path: str | Path, options: RunOptions) -> dict:
    """Run (or resume) a recipe; returns the final report.  Raises CompressorError on failure."""
    recipe_path = Path(recipe_path)
    recipe, _ = load_recipe(recipe_path, options.overrides)
    registry = load_registry(recipe.plugins, base_dir=recipe_path.parent)
    stage_params = check_against_registry(recipe, registry, recipe_path)
    family = registry.get_family(recipe.model.family)
    family.check_input_size(*recipe.input_size)
    device = _device(options.device)
    out_dir = options.out_dir or default_out_dir(recipe_path)
    init_distributed(device)
    progress = Progress(options.quiet or not is_main_process())

    previous = _read_previous_report(out_dir) if is_main_process() or options.resume else None
    if previous is not None and not options.resume:
        raise UsageError(f"{out_dir}: already holds a run; use --resume to continue it, or --out for a new folder")
    if previous is not None and previous.get("recipe") != _recipe_record(recipe):
        raise UsageError(f"{out_dir}: the recipe differs from the one this run started with; start a new run with --out")

    seed_everything(recipe.seed)
    first_model = starting_model(recipe, family, registry).to(device)
    height, width = recipe.input_size
    ctx = RunContext(
        recipe=recipe, family=family, registry=registry, out_dir=out_dir, device=device,
        example=family.example_input(height, width, batch_size=2, seed=recipe.seed).to(device),
        progress=progress, finetune=options.finetune, starting_model=first_model,
    )
    ctx.contract = output_contract(forward_eval(first_model, ctx.example))

    if previous is not None:
        ctx.report = previous
        model = _resume_model(ctx)
    else:
        ctx.report = _new_report(ctx)
        model = copy.deepcopy(first_model)
        _write(ctx)

    if ctx.report.get("final") is not None and (out_dir / FINAL_NAME).is_file():
        progress.echo(f"{out_dir}: run already complete; nothing to do")
        return ctx.report

    total = len(recipe.stages)
    for index, (stage, params) in enumerate(zip(recipe.stages, stage_params), start=1):
        if _stage_done(ctx.report, index):
            continue
        progress.stage(index, total, stage.label, stage.pass_name)
        model = _run_stage(ctx, index, stage, params, model)

    return _finish(ctx, model)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def starting_model(recipe: Any, family: ModelFamily, registry: Registry) -> nn.Module:
    """The model a recipe starts from: its checkpoint, or the family's baseline (optionally pretrained)."""
    if recipe.model.checkpoint is None:
        model = family.baseline()
        if recipe.model.pretrained is not None:
            family.load_pretrained(model, recipe.model.pretrained)
        return model.eval()
    loaded = open_model(recipe.model.checkpoint, registry)
    if loaded.family is not family:
        raise UsageError(
            f"model.checkpoint: {recipe.model.checkpoint} is a {loaded.family.name} model, "
            f"but model.family is {family.name}"
        )
    return loaded.model


def _recipe_record(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json", by_alias=True)


def _new_report(ctx: RunContext) -> dict:
    height, width = ctx.recipe.input_size
    baseline = measure(ctx.starting_model, ctx.family, height, width, ctx.device)
    baseline["metrics"] = _evaluate(ctx, ctx.starting_model)
    return {
        "recipe": _recipe_record(ctx.recipe),
        "baseline": baseline,
        "stages": [
            {"name": s.label, "pass": s.pass_name, "status": "pending"} for s in ctx.recipe.stages
        ],
        "final": None,
    }


def _read_previous_report(out_dir: Path) -> dict | None:
    path = out_dir / "report.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: unreadable run report ({err.msg}); start a new run with --out") from err


def _write(ctx: RunContext) -> None:
    """Reports are written by one process only (rank 0 under torchrun)."""
    if is_main_process():
        write_report(ctx.out_dir, ctx.report)


def _stage_done(report: dict, index: int) -> bool:
    return report["stages"][index - 1].get("status") == "ok"


def _checkpoint_path(out_dir: Path, index: int, label: str) -> Path:
    return out_dir / CHECKPOINT_DIR / f"stage-{index:02d}-{label}.pt"


def _resume_model(ctx: RunContext) -> nn.Module:
    done = [i for i in range(1, len(ctx.recipe.stages) + 1) if _stage_done(ctx.report, i)]
    if not done:
        ctx.progress.echo(f"resuming {ctx.out_dir}: no stage completed yet, starting from the beginning")
        return copy.deepcopy(ctx.starting_model)
    last = done[-1]
    path = _checkpoint_path(ctx.out_dir, last, ctx.recipe.stages[last - 1].label)
    ctx.progress.echo(f"resuming {ctx.out_dir} after stage {last} ({ctx.recipe.stages[last - 1].label})")
    return open_model(path, ctx.registry).model.to(ctx.device)


def _run_stage(ctx: RunContext, index: int, stage: Stage, params: Any, model: nn.Module) -> nn.Module:
    started = time.monotonic()
    where = f"stage {index} ({stage.label})"
    record = ctx.report["stages"][index - 1]
    seed_everything(ctx.recipe.seed + index)
    try:
        new_model, repeats = _apply(ctx, where, stage, params, model)
        outputs = _validate(ctx, where, stage, new_model)
        drift = output_drift(forward_eval(model, ctx.example), outputs)
        record.update(finetune=_finetune(ctx, index, stage, model, new_model))
        height, width = ctx.recipe.input_size
        record.update(measure(new_model, ctx.family, height, width, ctx.device))
        record.update(status="ok", output_drift=drift, metrics=_evaluate(ctx, new_model), repeats=repeats,
                      message=None, seconds=round(time.monotonic() - started, 3))
    except (CheckFailed, UsageError) as err:
        record.update(status="failed", message=str(err), seconds=round(time.monotonic() - started, 3))
        _write(ctx)
        raise
    passes = [{"stage": s["name"], "pass": s["pass"], "params": ctx.report["recipe"]["stages"][i]["params"]}
              for i, s in enumerate(ctx.report["stages"][:index])]
    if is_main_process():
        save_checkpoint(_checkpoint_path(ctx.out_dir, index, stage.label), new_model, ctx.family,
                        recipe=ctx.report["recipe"], passes=passes, extra={"stage": index})
    _write(ctx)
    shown = "".join(f", {k} {v:.4f}" for k, v in record["metrics"].items() if k == "ap")
    ctx.progress.echo(
        f"    ok: {record['params']['total']:,} parameters, drift {record['output_drift']:.3g}{shown}, "
        f"{record['seconds']:.1f}s"
    )
    return new_model


def _apply(ctx: RunContext, where: str, stage: Stage, params: Any, model: nn.Module) -> tuple[nn.Module, int]:
    """Apply the pass (repeatedly, with ``until``) to a copy, so the input model stays intact."""
    pass_cls = ctx.registry.get_pass(stage.pass_name)
    instance: Pass = pass_cls()
    pass_ctx = PassContext(
        family=ctx.family, example_input=ctx.example, device=ctx.device, teacher=model,
        logger=ctx.progress, stage_name=stage.label,
    )
    try:
        instance.check(model, params, pass_ctx)
    except ValueError as err:
        raise UsageError(f"{where}: {stage.pass_name}: {err}") from err
    current = model
    limit = stage.until.max_repeats if stage.until else 1
    for repeat in range(1, limit + 1):
        candidate = copy.deepcopy(current)
        try:
            result = instance.apply(candidate, params, pass_ctx)
        except (CheckFailed, UsageError):
            raise
        except Exception as err:
            raise CheckFailed(f"{where}: pass {stage.pass_name} raised {type(err).__name__}: {err}") from err
        if not isinstance(result, nn.Module):
            raise CheckFailed(f"{where}: pass {stage.pass_name} returned {type(result).__name__}, not a model")
        current = result.to(ctx.device)
        if stage.until is None or not _over(ctx, current, stage.until):
            return current, repeat
    over = "; ".join(str(o) for o in _over(ctx, current, stage.until))  # type: ignore[arg-type]
    raise CheckFailed(f"{where}: until not reached after {limit} repeats: {over}")


def _over(ctx: RunContext, model: nn.Module, budget: Budget) -> list:
    params = accounting.count_parameters(model, ctx.family.component_of, ctx.family.components)
    macs = None
    if budget.macs is not None:
        height, width = ctx.recipe.input_size
        macs = accounting.count_macs(model, ctx.family.example_input(height, width, 1).to(ctx.device)).macs
    try:
        return check_budget(params, macs, budget)
    except KeyError as err:
        raise UsageError(str(err.args[0])) from err


def _validate(ctx: RunContext, where: str, stage: Stage, model: nn.Module) -> object:
    """Check the model a pass returned; returns its outputs on the example batch."""
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


def _finetune(ctx: RunContext, index: int, stage: Stage, before: nn.Module, model: nn.Module) -> str | dict:
    """Finetune ``model`` in place with distillation, as the recipe says; returns the record."""
    settings = ctx.recipe.finetune_for(stage)
    if not ctx.finetune:
        return "skipped (--no-finetune)"
    if settings.steps == 0:
        return "skipped (finetune.steps is 0)"
    if not ctx.family.supports_training:
        return f"skipped (model family {ctx.family.name} has no training support)"
    teacher = {"previous": before, "baseline": ctx.starting_model, "none": None}[settings.teacher]
    rank, world = distributed()
    batches = ctx.family.training_batches(ctx.recipe.data.root, ctx.recipe.input_size, settings.batch_size,
                                          ctx.recipe.seed + index, rank, world, ctx.device)
    result = train(model, ctx.family, settings, batches, device=ctx.device,
                   teacher=copy.deepcopy(teacher) if teacher is not None else None,
                   progress=ctx.progress, where=f"stage {index} ({stage.label}): finetune")
    return {"steps": result.steps, "seconds": result.seconds, "teacher": settings.teacher,
            "first_loss": result.first_loss, "last_loss": result.last_loss}


def _evaluate(ctx: RunContext, model: nn.Module) -> dict[str, float]:
    """Accuracy metrics, when evaluation is on (not with --no-finetune) and the family has it."""
    if not ctx.finetune or not ctx.family.supports_training or not is_main_process():
        return {}
    ctx.progress.echo("    evaluating on the validation split ...")
    return ctx.family.evaluate(model, ctx.recipe.data.root, ctx.recipe.input_size, ctx.device)


def _finish(ctx: RunContext, model: nn.Module) -> dict:
    height, width = ctx.recipe.input_size
    final = measure(model, ctx.family, height, width, ctx.device)
    done = [s for s in ctx.report["stages"] if s.get("status") == "ok"]
    final["metrics"] = dict(done[-1]["metrics"]) if done else dict(ctx.report["baseline"]["metrics"])
    over = [str(o) for o in check_budget(
        accounting.ParameterCount(final["params"]["total"], final["params"]["components"]),
        final["macs"], ctx.recipe.budget,
    )]
    drop = _accuracy_drop(ctx.report["baseline"]["metrics"], final["metrics"])
    limit = ctx.recipe.budget.max_accuracy_drop
    if limit is not None and drop is not None and drop > limit:
        over.append(f"accuracy drop {drop:.4f} > budget {limit:.4f} (+{drop - limit:.4f})")
    ctx.report["final"] = final
    ctx.report["budget_check"] = {"ok": not over, "overshoots": over, "accuracy_drop": drop}
    _write(ctx)
    if over:
        raise CheckFailed("final budget: " + "; ".join(over))
    if is_main_process():
        save_checkpoint(ctx.out_dir / FINAL_NAME, model, ctx.family, recipe=ctx.report["recipe"],
                        passes=[{"stage": s["name"], "pass": s["pass"]} for s in ctx.report["stages"]],
                        extra={"metrics": final["metrics"]})
    ctx.progress.echo(f"done: {final['params']['total']:,} parameters -> {ctx.out_dir / FINAL_NAME}")
    return ctx.report


def _accuracy_drop(before: dict, after: dict) -> float | None:
    """Drop of the first metric both have (the family's headline metric comes first)."""
    common = [name for name in before if name in after]
    return before[common[0]] - after[common[0]] if common else None
