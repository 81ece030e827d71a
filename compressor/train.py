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

from .errors import CheckFailed
from .family import ModelFamily
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


@dataclass
class TrainState:
    """What a resumable training checkpoint holds besides the model weights."""

    step: int = 0
    optimizer: dict | None = None
    losses: list[float] = field(default_factory=list)


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
    ``distill_weight * family.distillation_loss``.  A non-finite loss stops
    training with :class:`CheckFailed` naming the step, before the bad step
    touches the weights.
    """
    state = state or TrainState()
    rank, world = distributed()
    progress = progress if rank == 0 else None
    model.to(device).train()
    trained: nn.Module = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, config)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if teacher is not None:
        teacher.to(device).eval()
        for param in teacher.parameters():
            param.requires_grad_(False)

    started = time.monotonic()
    first_step = state.step
    if progress:
        progress.start_steps()
    for step in range(state.step, config.steps):
        images, targets = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        with torch.autocast(device.type, enabled=use_amp):
            outputs = trained(images)
            size = (images.shape[-2], images.shape[-1])
            loss = config.task_weight * family.task_loss(outputs, targets, size)["loss"]
            if teacher is not None and config.distill_weight > 0:
                with torch.no_grad():
                    teacher_outputs = teacher(images)
                kd = family.distillation_loss(outputs, teacher_outputs, config.temperature)["loss"]
                loss = loss + config.distill_weight * kd
        value = float(loss.detach())
        if not math.isfinite(value):
            raise CheckFailed(f"{where}: loss is {value} at step {step + 1}/{config.steps}; the weights before it are kept")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state.step = step + 1
        state.losses.append(value)
        if progress:
            progress.step(step + 1 - first_step, config.steps - first_step, loss=value,
                          lr=optimizer.param_groups[0]["lr"])
        if on_checkpoint is not None and rank == 0 and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
            state.optimizer = optimizer.state_dict()
            on_checkpoint(model, state)
    if state.step > first_step:
        recalibrate_batchnorm(model, batches, BN_CALIBRATION_BATCHES)
    model.eval()
    window = state.losses[-20:]
    return TrainResult(
        steps=state.step - first_step,
        seconds=round(time.monotonic() - started, 3),
        first_loss=state.losses[first_step] if len(state.losses) > first_step else None,
        last_loss=state.losses[-1] if state.losses else None,
        mean_loss_last=sum(window) / len(window) if window else None,
    )
