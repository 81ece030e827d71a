"""One training loop, for training a model from scratch and for finetuning after a pass.

It knows nothing of faces: batches, the task loss and the distillation loss come
from the model family.  It runs on the CPU or CUDA (mixed precision there) and,
under ``torchrun``, with DistributedDataParallel: every process trains on its own
share of the data and only rank 0 reports or writes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import CheckFailed, UsageError
from .family import ModelFamily
from .finite import FiniteCheck, all_finite, describe_non_finite, floating_state, forward_error_message
from .progress import Progress
from .recipe import TrainConfig


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    return distributed()[0] == 0


# Batches used to re-estimate BatchNorm statistics after training.
BN_CALIBRATION_BATCHES = 16


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterator[tuple[Tensor, Any]], count: int) -> None:
    """Re-estimate every BatchNorm's running statistics for the final weights.

    Running statistics are a moving average over training; with momentum 0.01
    (BiFPN's and CBAM's BNs) they still carry the activations of weights from a
    hundred steps before, which on a short training or finetuning leaves eval
    mode far from train mode.  A plain average over a few batches with the final
    weights fixes that, and costs a few forwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or count < 1:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    try:
        for _ in range(count):
            images, _ = next(batches)
            model(images)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then the decay."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    passed = sum(1 for milestone in config.milestones if step >= milestone * config.steps)
    return config.gamma**passed


@dataclass(frozen=True)
class CurvePoint:
    """The validation metrics of the weights after ``step`` optimiser steps."""

    step: int
    metrics: dict[str, float]


@dataclass
class TrainState:
    """What a resumable training checkpoint holds besides the model weights.

    A checkpoint is written after an optimiser step, so its weights are always
    those before the final BatchNorm recalibration: a training resumed from its
    last step's checkpoint only recalibrates, exactly as the uninterrupted one did.
    """

    step: int = 0
    optimizer: dict | None = None
    losses: list[float] = field(default_factory=list)
    #: Validation measurements taken during training (``train.eval_every``), in step order.
    curve: list[CurvePoint] = field(default_factory=list)



class _Rollback:
    """A copy of the weights (parameters and buffers) before a step, to put back if the step goes bad.

    One fused copy per step (about half a millisecond for FeatherFace on the CPU).
    """

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors
        with torch.no_grad():
            self.saved = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def save(self) -> None:
        _copy(self.saved, self.tensors)

    @torch.no_grad()
    def restore(self) -> None:
        _copy(self.tensors, self.saved)


def _copy(targets: list[Tensor], sources: list[Tensor]) -> None:
    try:
        torch._foreach_copy_(targets, sources)
    except (AttributeError, RuntimeError):  # an old torch
        for target, source in zip(targets, sources):
            target.copy_(source)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    mean_loss_last: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def train(
    model: nn.Module,
    family: ModelFamily,
    config: TrainConfig,
    batches: Iterator[tuple[Tensor, Any]],
    *,
    device: torch.device,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    state: TrainState | None = None,
    on_checkpoint: Callable[[nn.Module, TrainState], None] | None = None,
    where: str = "training",
) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` steps (from ``state.step`` when resuming).

    The loss is ``task_weight * family.task_loss`` plus, with a teacher,
    ``distill_weight * family.distillation_loss``; a batch whose targets are
    None (images without labels) has no task loss, only the distillation
    loss, so it needs a teacher.  After the last step the
    BatchNorm statistics are re-estimated (also when ``state`` says every step
    was already done: a resumed training ends as the uninterrupted one).

    Non-finite values stop training with :class:`CheckFailed` naming the step,
    and leave the model as it was before that step: non-finite weights before
    training, a forward that refuses non-finite values (``FloatingPointError``,
    e.g. from a guarded deformable convolution), a non-finite loss, or weights
    that an optimiser step made non-finite.  ``on_checkpoint`` only ever sees
    finite weights.
    """
    state = state or TrainState()
    rank, world = distributed()
    progress = progress if rank == 0 else None
    model.to(device).train()
    first_step = state.step
    bad = describe_non_finite(model)
    if bad:
        raise CheckFailed(f"{where}: the starting weights (step {first_step}/{config.steps}) are non-finite: {bad}")
    if teacher is not None:
        teacher.to(device).eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        bad = describe_non_finite(teacher)
        if bad:
            raise CheckFailed(f"{where}: the teacher's weights are non-finite: {bad}")
    distilling = teacher is not None and config.distill_weight > 0
    trained: nn.Module = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, config)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    weights_finite = FiniteCheck(floating_state(model))  # ~1 ms a step for FeatherFace on one CPU thread
    rollback = _Rollback([*model.parameters(), *model.buffers()])  # buffers: BN statistics and counters too

    started = time.monotonic()
    if progress:
        progress.start_steps()
    for step in range(state.step, config.steps):
        at = f"step {step + 1}/{config.steps}"
        images, targets = next(batches)
        if isinstance(images, Tensor) and not all_finite([images]):
            raise CheckFailed(f"{where}: the training batch of {at} holds non-finite values (NaN/Inf in the data?)")
        if targets is None and not distilling:
            raise UsageError(f"{where}: the batch of {at} has no labels and there is no teacher "
                             "(or distill_weight is 0): nothing to learn from")
        lr = config.lr * lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Blame the learning rate only once this training has changed the weights.
        hint = f" (learning rate {lr:g} too high?)" if step > first_step else ""
        rollback.save()
        try:
            with torch.autocast(device.type, enabled=use_amp):
                outputs = _forward(trained, model, images, f"{where}: the forward refused non-finite values at {at}",
                                   hint, rollback)
                size = (images.shape[-2], images.shape[-1])
                # No targets (images without labels): no task loss, the teacher is all there is to learn from.
                loss = None
                if targets is not None:
                    loss = config.task_weight * family.task_loss(outputs, targets, size)["loss"]
                if distilling:
                    with torch.no_grad():
                        teacher_outputs = _forward(teacher, teacher, images,
                                                   f"{where}: the teacher's forward refused non-finite values at {at}",
                                                   "", rollback)
                    kd = config.distill_weight * family.distillation_loss(
                        outputs, teacher_outputs, config.temperature, without_labels=targets is None)["loss"]
                    loss = kd if loss is None else loss + kd
        except FloatingPointError as err:  # one the family's loss raised
            rollback.restore()
            raise CheckFailed(f"{where}: the loss refused non-finite values at {at}: {type(err).__name__}: "
                              f"{err}{hint}; the weights before it are kept") from err
        value = float(loss.detach())
        if not math.isfinite(value):
            rollback.restore()
            raise CheckFailed(f"{where}: loss is {value} at {at}; the weights before it are kept")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        try:
            scaler.step(optimizer)
        except RuntimeError as err:  # torch's optimisers refuse a step size that overflows a float
            if "overflow" not in str(err):
                raise
            rollback.restore()
            raise CheckFailed(f"{where}: the optimiser step overflowed at {at} (learning rate {lr:g} too high?); "
                              "the weights before it are kept") from err
        scaler.update()
        if not weights_finite():
            rollback.restore()
            raise CheckFailed(f"{where}: weights became non-finite at {at} (learning rate {lr:g} too high?); "
                              "the weights before it are kept")
        state.step = step + 1
        state.losses.append(value)
        if progress:
            progress.step(step + 1 - first_step, config.steps - first_step, loss=value,
                          lr=optimizer.param_groups[0]["lr"])
        if on_checkpoint is not None and rank == 0 and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
            state.optimizer = optimizer.state_dict()
            on_checkpoint(model, state)
    del rollback
    if state.step > 0:
        # Also when resumed after the last step's checkpoint: checkpoints hold the weights
        # before this, and the batches are the same, so the result is the same.
        try:
            recalibrate_batchnorm(model, batches, BN_CALIBRATION_BATCHES)
        except FloatingPointError as err:
            raise CheckFailed(f"{where}: the BatchNorm recalibration after step {state.step}/{config.steps} "
                              f"refused non-finite values: {forward_error_message(model, err)}") from err
        if not weights_finite():
            raise CheckFailed(f"{where}: the BatchNorm recalibration after step {state.step}/{config.steps} "
                              f"left non-finite statistics: {describe_non_finite(model)}")
    model.eval()
    window = state.losses[-20:]
    return TrainResult(
        steps=state.step - first_step,
        seconds=round(time.monotonic() - started, 3),
        first_loss=state.losses[first_step] if len(state.losses) > first_step else None,
        last_loss=state.losses[-1] if state.losses else None,
        mean_loss_last=sum(window) / len(window) if window else None,
    )


def _forward(module: nn.Module, named: nn.Module, images: Tensor, prefix: str, hint: str,
             rollback: _Rollback) -> Any:
    """``module(images)``; a FloatingPointError (a layer refusing NaN/Inf) becomes CheckFailed, weights restored."""
    try:
        return module(images)
    except FloatingPointError as err:
        rollback.restore()
        raise CheckFailed(f"{prefix}: {forward_error_message(named, err)}{hint}; "
                          "the weights before it are kept") from err
