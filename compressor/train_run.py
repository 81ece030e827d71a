"""`compress train`: train a model from a training recipe, checkpointing as it goes.

Long jobs are the point: a checkpoint (weights, spec, optimizer, step, losses)
is written atomically every ``train.checkpoint_every`` steps, and ``--resume``
continues from it with the same data order and learning-rate schedule, ending
bit-identical to an uninterrupted training wherever the first one was killed.

With ``train.teacher`` a checkpoint, the model also learns from that teacher
(any family whose outputs match); with ``data.images`` from it alone, on images
without labels, and ``data.eval_images`` measures agreement with it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import plots
from .atomic import atomic_write_bytes, atomic_write_json
from .checkpoint import FINAL_NAME, open_model, read_file, save_checkpoint
from .errors import UsageError
from .progress import Progress
from .runfolder import RunFolder
from .runner import first_difference, seed_everything
from .session import OpenedRecipe
from .train import (
    BN_CALIBRATION_BATCHES,
    CurvePoint,
    TrainState,
    distributed,
    init_distributed,
    is_main_process,
    recalibrate_batchnorm,
    train,
)
from .validate import forward_eval, output_contract

LAST_NAME = "last.pt"
REPORT_NAME = "train_report.json"
CURVE_PLOT_NAME = "val_curve.png"
# A training "has plateaued" when its last quarter gained less than this (0.5 AP points).
PLATEAU_GAIN = 0.005


@dataclass
class TrainOptions:
    resume: bool = False
    quiet: bool = False
    evaluate: bool = True


def train_recipe(opened: OpenedRecipe, options: TrainOptions) -> dict:
    """Train (or resume, or find finished) the training in ``opened.out_dir``; returns its report.

    What is on disk after a kill at any moment, and what ``--resume`` does with it:
    no last.pt (killed before the first checkpoint): nothing to resume, start again;
    last.pt at step k < steps: continue from step k (the data iterator skips k
    batches); last.pt at the last step (killed before or during the BatchNorm
    recalibration, the evaluation or the writes): recalibrate, evaluate and write,
    as the uninterrupted run did; final.pt (written last): the training is complete
    and nothing is changed.  Every path ends with the same final.pt weights.
    """
    init_distributed(opened.device)
    if options.resume and not (opened.out_dir / LAST_NAME).is_file():  # before the lock creates the folder
        raise _nothing_to_resume(opened.out_dir)
    # The folder is locked for the whole training (by rank 0 under torchrun, the one that writes),
    # and the temporaries of a write a kill interrupted are removed.
    with RunFolder(opened.out_dir) if is_main_process() else contextlib.nullcontext():
        return _train(opened, options)


def _nothing_to_resume(out_dir: Path) -> UsageError:
    return UsageError(f"{out_dir}: no training to resume (no {LAST_NAME}); start it without --resume")


def _train(opened: OpenedRecipe, options: TrainOptions) -> dict:
    recipe, family, device, out_dir = opened.recipe, opened.family, opened.device, opened.out_dir
    progress = Progress(options.quiet or not is_main_process())
    record = recipe.model_dump(mode="json")
    last, final = out_dir / LAST_NAME, out_dir / FINAL_NAME
    rank, world = distributed()
    mode = {"device": device.type, "world_size": world, "evaluate": options.evaluate}

    seed_everything(recipe.seed)
    state = TrainState()
    if not options.resume:
        if last.is_file():
            raise UsageError(f"{out_dir}: already holds a training run; use --resume to continue it, or --out")
        if final.is_file():
            raise UsageError(f"{out_dir}: already holds a {FINAL_NAME}; train into another folder with --out")
        model = opened.starting_model()
    else:
        if not last.is_file():
            raise _nothing_to_resume(out_dir)
        loaded = open_model(last, opened.app.registry)
        saved = _train_state(last, loaded.checkpoint)
        _check_same_training(out_dir, loaded.checkpoint.get("recipe"), record, saved.get("mode"), mode)
        if final.is_file():
            return _finished(out_dir, final, record, recipe.train.steps, progress)
        model = loaded.model
        state = TrainState(step=saved["step"], optimizer=saved["optimizer"], losses=list(saved["losses"]),
                           curve=[CurvePoint(int(p["step"]), dict(p["metrics"])) for p in saved.get("curve", [])])
        progress.echo(f"resuming {out_dir} at step {state.step}/{recipe.train.steps}")
    first_step = state.step

    def save(model: torch.nn.Module, state: TrainState) -> None:
        every = recipe.train.eval_every
        if options.evaluate and every and state.step % every == 0 and state.step < recipe.train.steps:
            # (the last step's point is the final evaluation, after the real recalibration)
            state.curve.append(CurvePoint(state.step, _measure_copy(opened, model, teacher, state.step, progress)))
        save_checkpoint(last, model, family, recipe=record,
                        extra={"train_state": {"step": state.step, "optimizer": state.optimizer,
                                               "losses": state.losses, "mode": mode,
                                               "curve": [asdict(point) for point in state.curve]}})

    # A word (previous, baseline, none) names no model here: `compress train` distils from a checkpoint only.
    teacher_path = recipe.train.teacher if isinstance(recipe.train.teacher, Path) else None
    teacher = None
    if teacher_path is not None:
        example = family.example_input(*recipe.input_size, batch_size=2, seed=recipe.seed)
        teacher = opened.teacher(teacher_path, "train.teacher", example, output_contract(forward_eval(model, example)))
    images = recipe.data.images
    batches = _batches(opened, recipe.seed, rank, world)
    # Skip the batches already consumed so a resumed run sees the same data order.
    for _ in range(state.step):
        next(batches)
    result = train(model, family, recipe.train, batches, device=device, teacher=teacher, progress=progress,
                   state=state, on_checkpoint=save, where="training")
    report = {"recipe": record, "steps": state.step, "result": result.to_dict(),
              "loss_curve": _curve(state.losses),
              "teacher": teacher_path.name if teacher_path is not None else None,
              "labels": "none" if images is not None else "ground truth",
              "data": opened.data.model_dump(mode="json")}
    if first_step:
        report["resumed_at_step"] = first_step
    if is_main_process():
        if options.evaluate:
            report["metrics"] = _evaluate(opened, model, teacher, progress)
            if recipe.train.eval_every:
                curve = [*state.curve, CurvePoint(state.step, report["metrics"])]
                report["val_curve"] = [asdict(point) for point in curve]
                report["plateau"] = plateau(curve, opened.metric, state.step)
                write_curve_plot(out_dir / CURVE_PLOT_NAME, curve, opened.metric)
        # final.pt last: its presence means the training is complete, report included.
        atomic_write_json(out_dir / REPORT_NAME, report)
        save_checkpoint(final, model, family, recipe=record,
                        extra={"metrics": report.get("metrics", {}), "steps": state.step})
        progress.echo(f"done: {state.step} steps, metrics {report.get('metrics', {})} -> {final}")
    return report


def _evaluate(opened: OpenedRecipe, model: torch.nn.Module, teacher: torch.nn.Module | None,
              progress: Progress) -> dict[str, float]:
    """Accuracy on the labelled validation data, or with data.eval_images agreement with the teacher."""
    recipe, family, device = opened.recipe, opened.family, opened.device
    images = recipe.data.eval_images
    if images is not None:
        assert teacher is not None  # the recipe check: data.eval_images in a training recipe needs a teacher path
        progress.echo(f"measuring agreement with the teacher on {images} ...")
        return family.agreement(model, teacher, images, device)
    progress.echo("evaluating on the validation split ...")
    return family.evaluate(model, recipe.data.root, recipe.input_size, device)


def _batches(opened: OpenedRecipe, seed: int, rank: int = 0, world: int = 1) -> Iterator:
    """The training batches: labelled, or with data.images views of photos without labels (targets None)."""
    recipe, family = opened.recipe, opened.family
    if recipe.data.images is not None:
        return family.unlabelled_batches(recipe.data.images, recipe.input_size, recipe.train.batch_size, seed,
                                         rank, world, opened.device)
    return family.training_batches(recipe.data.root, recipe.input_size, recipe.train.batch_size, seed,
                                   rank, world, opened.device)


def _measure_copy(opened: OpenedRecipe, model: torch.nn.Module, teacher: torch.nn.Module | None, step: int,
                  progress: Progress) -> dict[str, float]:
    """The validation metrics of a copy of ``model`` whose BatchNorm statistics are re-estimated first.

    As the final model's are: the running averages lag the weights by many steps.  The copy and its
    own batches (seeded by the step) leave the training itself, and a resumed one, untouched.
    """
    copy = deepcopy(model)
    recalibrate_batchnorm(copy, _batches(opened, opened.recipe.seed + 1_000 + step), BN_CALIBRATION_BATCHES)
    copy.eval()
    metrics = _evaluate(opened, copy, teacher, progress)
    progress.echo(f"step {step}: {_format_metrics(metrics)}")
    return metrics


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def plateau(curve: list[CurvePoint], metric: str, steps: int) -> dict[str, float | int | bool | None]:
    """How much ``metric`` changed over the last quarter of training: from the point at or before 3/4 of the steps.

    ``plateaued`` when it gained less than :data:`PLATEAU_GAIN` (it may also have fallen).
    """
    points = [point for point in curve if metric in point.metrics]
    start = [point for point in points if point.step <= 0.75 * steps]
    if not start or not points or start[-1].step == points[-1].step:
        return {"metric": metric, "from_step": None, "to_step": None, "gain": None, "plateaued": None}
    gain = points[-1].metrics[metric] - start[-1].metrics[metric]
    return {"metric": metric, "from_step": start[-1].step, "to_step": points[-1].step, "gain": gain,
            "plateaued": gain < PLATEAU_GAIN}


def write_curve_plot(path: Path, curve: list[CurvePoint], metric: str) -> None:
    """The validation curve as a PNG, with the metric's interval as a band when the family gives one."""
    points = [point for point in curve if metric in point.metrics]
    low, high = f"{metric}_low", f"{metric}_high"
    intervals = ([(p.metrics[low], p.metrics[high]) for p in points]
                 if all(low in p.metrics and high in p.metrics for p in points) else None)
    series = plots.Series(metric, [(p.step, p.metrics[metric]) for p in points], intervals, band=True)
    png = plots.series_png([series], title=f"validation {metric} during training", x_label="step", y_label=metric)
    atomic_write_bytes(path, lambda file: file.write(png))


def _train_state(path: Path, checkpoint: dict) -> dict:
    saved = checkpoint.get("train_state")
    if not (isinstance(saved, dict) and isinstance(saved.get("step"), int) and isinstance(saved.get("losses"), list)
            and "optimizer" in saved):
        raise UsageError(f"{path}: not a resumable training checkpoint (no train_state); "
                         "start a new training with --out")
    return saved


def _check_same_training(out_dir: Path, stored_recipe: object, recipe: dict, stored_mode: object, mode: dict) -> None:
    """--resume continues only the same computation: the same recipe, device, processes and evaluation."""
    changed = first_difference(stored_recipe, recipe)
    if changed is not None:
        raise UsageError(f"{out_dir}: the recipe differs from the one this training started with ({changed}); "
                         "start a new training with --out")
    if isinstance(stored_mode, dict):  # checkpoints written before the mode was stored have none
        differences = [f"{key}: {stored_mode[key]} -> {mode[key]}" for key in mode
                       if key in stored_mode and stored_mode[key] != mode[key]]
        if differences:
            raise UsageError(f"{out_dir}: this training started in another mode ({'; '.join(differences)}); "
                             "resume it with the same options, or start a new training with --out")


def _finished(out_dir: Path, final: Path, record: dict, steps: int, progress: Progress) -> dict:
    """A complete training: say so, change nothing, return its report."""
    content = read_file(final)
    if not isinstance(content, dict) or first_difference(content.get("recipe"), record) is not None:
        raise UsageError(f"{final}: not the final model of this training (its recipe differs); "
                         "start a new training with --out")
    progress.echo(f"{out_dir}: training already complete ({content.get('steps', steps)}/{steps} steps, "
                  f"{final.name} written); nothing to do")
    path = out_dir / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"recipe": record, "steps": content.get("steps", steps), "metrics": content.get("metrics", {})}


def _curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """The loss curve as at most ``points`` [step, mean loss] pairs."""
    if not losses:
        return []
    width = max(len(losses) // points, 1)
    return [[start + width, sum(losses[start:start + width]) / len(losses[start:start + width])]
            for start in range(0, len(losses), width)]
