"""Batches from a folder of images without labels, for finetuning by distillation alone.

A user's deployment domain is often a few dozen photographs and no boxes.  A
teacher labels them implicitly: the student learns to give the teacher's outputs
on the very same input tensor, so the two views are aligned by construction and
no box has to follow the augmentation.

Each sample is one photograph, rescaled by a random factor (log-uniform in
[0.6, 1.4]: the agreement evaluation runs photographs at their own size, so
scales stay near 1), a random S×S window of it (padded bottom/right with the
mean colour where the rescaled photograph is smaller), a random horizontal flip
and a mild colour jitter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from facedet.preprocess import to_network_input

from .errors import DataError
from .folder import image_files
from .images import read_image
from .transforms import Photometric, _coin, _randint, _uniform, photometric_distort

__all__ = ["SCALE_RANGE", "UNLABELLED_PHOTOMETRIC", "unlabelled_batches"]

#: The range of the random rescaling factor, drawn log-uniformly (as likely to shrink as to enlarge).
SCALE_RANGE: tuple[float, float] = (0.6, 1.4)
#: Milder than the labelled training's jitter: the point is the deployment domain's own colours.  No hue:
#: its HSV round trip costs about a third of a CPU training step for a batch of 8 at 320x320.
UNLABELLED_PHOTOMETRIC = Photometric(brightness=(0.9, 1.1), contrast=(0.8, 1.2), saturation=(0.8, 1.2),
                                     hue=(0.0, 0.0), p=0.5)
FLIP_P = 0.5

Batch = tuple[Tensor, None]


def unlabelled_batches(
    folder: str | Path,
    size: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> Iterator[Batch]:
    """Endless ``(inputs N×3×S×S network input, None)`` batches of the images under ``folder``.

    Teacher and student are both given ``inputs``, so their views of each
    photograph are aligned by construction.  Every image is decoded once, here,
    and kept in memory (the folders are small; decoding a megapixel JPEG at
    every step would cost more than the step on a small CPU); a missing or empty
    folder, or a file that is not a readable image, raises
    :class:`~facedet.data.DataError` naming it, now rather than mid-training.

    The order is a fresh seeded permutation of all images per epoch, the
    epochs one endless stream that every rank draws alike and takes its own
    stride of (as :func:`facedet.training.training_batches` splits ranks), so
    a batch may hold more samples than there are images: each is another
    random window.  The same arguments give the same batches.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size {batch_size}: must be a positive number of images")
    images = [read_image(path) for path in image_files(folder)]
    return _batches(images, size, batch_size, seed, rank, world_size, device)


def _batches(images: list[Tensor], size: int, batch_size: int, seed: int, rank: int, world_size: int,
             device: torch.device | str) -> Iterator[Batch]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    order = itertools.islice(_index_stream(len(images), seed), rank, None, world_size)
    while True:
        samples = [_sample(images[index], size, generator) for index in itertools.islice(order, batch_size)]
        yield torch.stack(samples).to(device), None


def _index_stream(count: int, seed: int) -> Iterator[int]:
    for epoch in itertools.count():
        yield from torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def _sample(image: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """One random S×S network-input view of a uint8 RGB image."""
    height, width = image.shape[-2:]
    scale = math.exp(_uniform(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1]), generator))
    # Crop the window's extent in the photograph's own pixels first, then resize only that:
    # the same view as resizing the whole photograph, at the cost of the window alone.
    crop_h = min(height, max(1, round(size / scale)))
    crop_w = min(width, max(1, round(size / scale)))
    top = _randint(0, height - crop_h, generator)
    left = _randint(0, width - crop_w, generator)
    out_h = min(size, max(1, round(crop_h * scale)))
    out_w = min(size, max(1, round(crop_w * scale)))
    window = TF.resize(image[:, top:top + crop_h, left:left + crop_w], [out_h, out_w], antialias=True)
    if _coin(FLIP_P, generator):
        window = window.flip(-1)
    # Jitter the photograph only, before padding, so the padding stays exactly the mean colour.
    window = photometric_distort(window, UNLABELLED_PHOTOMETRIC, generator)
    # After to_network_input the mean colour is 0: padding with zeros pads with the mean colour.
    return F.pad(to_network_input(window)[0], (0, size - out_w, 0, size - out_h))
