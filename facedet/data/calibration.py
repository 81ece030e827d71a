"""Calibration images for post-training quantization: a few dozen network inputs from the model's own data.

Each image goes through the evaluation transform (padded bottom/right to a square
with the mean colour, resized to the export's side, BGR with the mean subtracted),
so the value ranges the quantizer records are those the deployed model will see.
The choice is deterministic: images evenly spaced over the sorted list, so the same
data and count always calibrate the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .errors import DataError
from .folder import image_files
from .images import ImageError, read_image
from .transforms import EvalTransform
from .widerface import FaceDataset

__all__ = ["folder_calibration", "labelled_calibration"]


def _evenly_spaced(total: int, count: int) -> list[int]:
    count = min(count, total)
    return [index * total // count for index in range(count)]


def labelled_calibration(root: Path, size: int, count: int) -> list[Tensor]:
    """``count`` images of the training split under ``root`` (the labels are not used)."""
    dataset = FaceDataset(root, "train", EvalTransform(size))
    if len(dataset) == 0:
        raise DataError(f"{root / 'train'}: no usable image to calibrate on")
    return [dataset[index][0].unsqueeze(0) for index in _evenly_spaced(len(dataset), count)]


def folder_calibration(folder: Path, size: int, count: int) -> list[Tensor]:
    """``count`` photos of ``folder`` (jpg/png, recursively); unreadable ones are skipped, none usable is an error."""
    files = image_files(folder)
    # The evenly spaced ones first; the others stand in for unreadable ones.
    chosen = _evenly_spaced(len(files), count)
    others = sorted(set(range(len(files))) - set(chosen))
    order = chosen + others
    transform = EvalTransform(size)
    empty = {"boxes": torch.zeros(0, 4), "landmarks": torch.zeros(0, 10),
             "landmark_valid": torch.zeros(0, dtype=torch.bool)}
    images: list[Tensor] = []
    problems: list[str] = []
    for path in (files[index] for index in order):
        if len(images) == count:
            break
        try:
            image = read_image(path)
        except ImageError as err:
            problems.append(str(err))
            continue
        images.append(transform(image, dict(empty))[0].unsqueeze(0))
    if not images:
        raise DataError(f"{folder}: no usable image to calibrate on ({problems[0]})")
    return images
