"""`compress train`: train a model from a training recipe, checkpointing as it goes.

Long jobs are the point: a checkpoint (weights, spec, optimizer, step, losses)
is written atomically every ``train.checkpoint_every`` steps, and ``--resume``
continues from it with the same data order and learning-rate schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .atomic import atomic_write_json
from .checkpoint import FINAL_NAME, open_model, save_checkpoint
from .errors import UsageError
from .progress import Progress
from .runner import seed_everything
from .session import OpenedRecipe
from .train import TrainState, distributed, init_distributed, is_main_process, train

LAST_NAME = "last.pt"
REPORT_NAME = "train_report.json"


@dataclass
class TrainOptions:
    resume: bool = False
    quiet: bool = False
    evaluate: bool = True


def train_recipe(opened: OpenedRecipe, options: TrainOptions) -> dict:
    recipe, family, device, out_dir = opened.recipe, opened.family, opened.device, opened.out_dir
    init_distributed(device)
    progress = Progress(options.quiet or not is_main_process())
    record = recipe.model_dump(mode="json")
    last = out_dir / LAST_NAME

    seed_everything(recipe.seed)
    state = TrainState()
    if last.is_file() and not options.resume:
        raise UsageError(f"{out_dir}: already holds a training run; use --resume to continue it, or --out")
    if options.resume and last.is_file():
        loaded = open_model(last, opened.app.registry)
        if loaded.checkpoint.get("recipe") != record:
            raise UsageError(f"{out_dir}: the recipe differs from the one this training started with")
        model = loaded.model
        saved = loaded.checkpoint["train_state"]
        state = TrainState(step=saved["step"], optimizer=saved["optimizer"], losses=list(saved["losses"]))
        progress.echo(f"resuming {out_dir} at step {state.step}/{recipe.train.steps}")
    else:
        model = opened.starting_model()

    def save(model: torch.nn.Module, state: TrainState) -> None:
        save_checkpoint(last, model, family, recipe=record,
                        extra={"train_state": {"step": state.step, "optimizer": state.optimizer, "losses": state.losses}})

    rank, world = distributed()
    # Skip the batches already consumed so a resumed run sees the same data order.
    batches = family.training_batches(recipe.data.root, recipe.input_size, recipe.train.batch_size,
                                      recipe.seed, rank, world, device)
    for _ in range(state.step):
        next(batches)
    result = train(model, family, recipe.train, batches, device=device, progress=progress,
                   state=state, on_checkpoint=save, where="training")
    report = {"recipe": record, "steps": state.step, "result": result.to_dict(),
              "loss_curve": _curve(state.losses)}
    if is_main_process():
        if options.evaluate:
            progress.echo("evaluating on the validation split ...")
            report["metrics"] = family.evaluate(model, recipe.data.root, recipe.input_size, device)
        save_checkpoint(out_dir / FINAL_NAME, model, family, recipe=record,
                        extra={"metrics": report.get("metrics", {}), "steps": state.step})
        atomic_write_json(out_dir / REPORT_NAME, report)
        progress.echo(f"done: {state.step} steps, metrics {report.get('metrics', {})} -> {out_dir / FINAL_NAME}")
    return report


def _curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """The loss curve as at most ``points`` [step, mean loss] pairs."""
    if not losses:
        return []
    width = max(len(losses) // points, 1)
    return [[start + width, sum(losses[start:start + width]) / len(losses[start:start + width])]
            for start in range(0, len(losses), width)]
