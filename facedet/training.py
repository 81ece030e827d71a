"""What training and measuring a FeatherFace needs: batches, losses, AP on a validation set.

Kept free of the engine so it can be used on its own; the family plugin hands
these to the engine's training loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .data import DataError, EvalTransform, FaceDataset, TrainTransform, collate, ensure_embedded_dataset
from .detect import detect
from .evaluation import (
    ImageRecord,
    average_precision_difference_interval,
    average_precision_interval,
    format_prediction_file,
)
from .loss import DistillationLoss, MultiBoxLoss
from .priors import make_priors

Batch = tuple[Tensor, list[dict[str, Tensor]]]


def resolve_root(root: Path | None) -> Path:
    """The dataset root: the given one, or the embedded default (generated on first use)."""
    return Path(root) if root is not None else ensure_embedded_dataset()


def training_batches(
    root: Path | None,
    size: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> Iterator[Batch]:
    """Endless augmented batches; each epoch a fresh seeded permutation, split across ranks.

    Every rank draws the same permutation and takes its own stride of it, so
    ranks see disjoint images without a sampler object to keep in sync.

    Not a generator itself: the data is opened and checked when this is
    called (a bad root, label file or images, or fewer usable images than one
    batch per process, raise :class:`~facedet.data.DataError` here), and
    the returned iterator only yields.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size {batch_size}: must be a positive number of images")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    processes = f" on each of {world_size} processes" if world_size > 1 else ""
    dataset = FaceDataset(resolve_root(root), "train", TrainTransform(size, generator=generator),
                          min_images=batch_size * world_size,
                          needed_for=f"one batch of batch_size {batch_size}{processes}")
    return _endless_batches(dataset, batch_size, seed, rank, world_size, device)


def _endless_batches(dataset: FaceDataset, batch_size: int, seed: int, rank: int, world_size: int,
                     device: torch.device | str) -> Iterator[Batch]:
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        mine = order[rank::world_size]
        for start in range(0, len(mine) - batch_size + 1, batch_size):
            images, targets = collate([dataset[int(i)] for i in mine[start:start + batch_size]])
            yield images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]
        epoch += 1


@lru_cache(maxsize=8)
def _priors(height: int, width: int) -> Tensor:
    return make_priors((height, width))


_MULTIBOX = MultiBoxLoss()


def task_loss(outputs: tuple[Tensor, Tensor, Tensor], targets: list[dict[str, Tensor]],
              input_size: tuple[int, int]) -> dict[str, Tensor]:
    """The RetinaFace multibox loss against ground truth."""
    priors = _priors(*input_size).to(outputs[0].device)
    return _MULTIBOX(outputs, targets, priors)


def distillation_loss(student: tuple[Tensor, Tensor, Tensor], teacher: tuple[Tensor, Tensor, Tensor],
                      temperature: float, without_labels: bool = False) -> dict[str, Tensor]:
    """Per-prior distillation; without labels its class term is normalised by the teacher's faces (see DistillationLoss)."""
    normaliser = "faces" if without_labels else "priors"
    return DistillationLoss(temperature=temperature, class_normaliser=normaliser)(student, teacher)


@torch.no_grad()
def split_results(model: nn.Module, root: Path | None, size: int, device: torch.device | str = "cpu",
                  batch_size: int = 8, split: str = "val", predictions_dir: Path | None = None) -> list[ImageRecord]:
    """``model``'s detections and the ground truth on every image of a labelled split, in original pixels.

    With ``predictions_dir``, also writes the detections in the standard layout
    (``<folder>/<image>.txt``).
    """
    dataset = FaceDataset(resolve_root(root), split, EvalTransform(size))
    folder = dataset.root / dataset.split
    if not any(len(sample.boxes) for sample in dataset.samples):
        raise DataError(f"{folder}: none of the {len(dataset)} usable images has a face annotation "
                        f"(AP needs {split}/label.txt with faces)")
    records = []
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        images, targets = collate([dataset[i] for i in indices])
        for index, found, target in zip(indices, detect(model, images.to(device)), targets):
            scale = float(target["scale"])
            boxes = found.boxes.cpu().numpy().astype(np.float64) / scale
            scores = found.scores.cpu().numpy().astype(np.float64)
            gt = (target["boxes"] * size).numpy().astype(np.float64) / scale
            records.append((boxes, scores, gt, np.zeros(len(gt), dtype=bool)))
            if predictions_dir is not None:
                image = Path(dataset.samples[index].image)
                path = Path(predictions_dir) / image.parent / f"{image.stem}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(format_prediction_file(image.name, boxes, scores))
    if not any(len(record[2]) for record in records):
        raise DataError(f"{folder}: every annotated face lies outside its image; AP is undefined")
    return records


def evaluate_ap(model: nn.Module, root: Path | None, size: int, device: torch.device | str = "cpu",
                batch_size: int = 8, predictions_dir: Path | None = None, split: str = "val") -> dict[str, float]:
    """AP at IoU 0.5 on a labelled split (the WIDER FACE protocol's code, one setting), with its interval.

    ``ap_low`` and ``ap_high`` bound the 95% percentile bootstrap interval over
    images (:func:`~facedet.evaluation.average_precision_interval`), so two
    models' APs can be told apart from noise.
    """
    records = split_results(model, root, size, device, batch_size, split, predictions_dir)
    return {**_ap_metrics(records), f"{split}_images": float(len(records))}


def evaluate_ap_drop(reference: nn.Module, model: nn.Module, root: Path | None, size: int,
                     device: torch.device | str = "cpu", split: str = "test"
                     ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Both models' AP on ``split`` and the drop AP(reference) - AP(model), with its paired bootstrap interval."""
    first = split_results(reference, root, size, device, split=split)
    second = split_results(model, root, size, device, split=split)
    drop = average_precision_difference_interval(first, second)
    return _ap_metrics(first), _ap_metrics(second), {"ap_drop": drop.value, "ap_drop_low": drop.low,
                                                     "ap_drop_high": drop.high}


def _ap_metrics(records: list[ImageRecord]) -> dict[str, float]:
    interval = average_precision_interval(records)
    return {"ap": interval.value, "ap_low": interval.low, "ap_high": interval.high}


def has_split(root: Path | None, split: str) -> bool:
    """Whether the dataset at ``root`` (the embedded default when None) has ``split`` with labels."""
    return (resolve_root(root) / split / "label.txt").is_file()
