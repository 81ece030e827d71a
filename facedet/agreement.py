"""AP on real photographs, each at its own size: against a reference detector, or against human boxes.

Without labels, a trusted detector (the teacher, the original RetinaFace) stands
in for people: its confident detections (score above 0.5 after NMS 0.4) are the
ground truth, and the model under test is scored on them with the original
RetinaFace test protocol (score above 0.02, NMS 0.4, at most 750 per photo).  With
labels (:func:`labelled_ap`) the ground truth is the split's ``label.txt``.

Either way the AP is at IoU 0.5, the all-point VOC area over one ranked list
pooled over all photos (:func:`facedet.evaluation.average_precision_all_points`).
Photos are not resized: each is run alone (batch 1, sizes differ), padded
bottom/right to the family's size multiple when it has one; detections are
clipped to the photo and those wholly in the padding dropped
(:func:`facedet.detect.detect` with ``image_sizes``).  ``detect`` runs under
``torch.no_grad`` with the models in eval mode and restores their modes; the
models are moved to ``device`` for the measurement and moved back after it.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.errors import DataError
from .data.images import read_image
from .data.widerface import clip_target_to_image, read_label_file
from .detect import detect
from .evaluation import ImageRecord, average_precision_all_points
from .preprocess import pad_to_multiple, to_network_input

__all__ = ["AgreementResult", "agreement_ap", "labelled_ap"]

logger = logging.getLogger(__name__)

#: A reference detection above this score is a face of the ground truth
#: (detect's thresholds are strict, as in the original code).
REFERENCE_THRESHOLD = 0.5
#: The scored model's detections: the original RetinaFace test protocol.
SCORE_THRESHOLD = 0.02
NMS_THRESHOLD = 0.4
KEEP_TOP_K = 750


@dataclass(frozen=True)
class AgreementResult:
    """AP at IoU 0.5 on ``images`` photos holding ``reference_faces`` ground-truth faces."""

    ap: float
    images: int
    reference_faces: int


def agreement_ap(
    model: nn.Module,
    reference: nn.Module,
    images: Sequence[Path],
    size_multiple: int = 1,
    device: torch.device | str = "cpu",
) -> AgreementResult:
    """AP of ``model`` on ``images`` with ``reference``'s detections of score above 0.5 as the ground truth.

    ``size_multiple`` is the largest input-side multiple either model needs
    (1: any size).  Raises :class:`DataError` naming the photos' folder when
    the reference finds no face in any of them (the AP would be undefined),
    and naming the file for a photo that cannot be read.
    """
    paths = [Path(path) for path in images]
    if not paths:
        raise DataError("no photos to measure agreement on")
    records: list[ImageRecord] = []
    with _moved_to(device, model, reference):
        for path in paths:
            batch, size = _photo(path, size_multiple, device)
            reference_boxes, _ = _detections(reference, batch, size, REFERENCE_THRESHOLD)
            records.append((*_detections(model, batch, size, SCORE_THRESHOLD), reference_boxes, None))
    folder = Path(os.path.commonpath([path.parent for path in paths]))
    return _result(records, f"{folder}: the reference detector finds no face (score > {REFERENCE_THRESHOLD}) "
                            f"in any of the {len(paths)} photos; agreement AP is undefined")


def labelled_ap(
    model: nn.Module,
    split_dir: Path,
    size_multiple: int = 1,
    device: torch.device | str = "cpu",
) -> AgreementResult:
    """AP of ``model`` on the photos of ``split_dir/label.txt`` (under ``split_dir/images/``) against their boxes.

    The same protocol as :func:`agreement_ap`; photos listed without a face
    count as negatives.  Boxes are clipped to their photo as the data layer
    does for training.  Bad label files and unreadable photos raise
    :class:`DataError` naming the file.
    """
    split_dir = Path(split_dir)
    samples, warnings = read_label_file(split_dir / "label.txt")
    for warning in warnings:
        logger.warning("%s", warning)
    records: list[ImageRecord] = []
    with _moved_to(device, model):
        for sample in samples:
            batch, size = _photo(split_dir / "images" / sample.image, size_multiple, device)
            labelled = clip_target_to_image(sample.target(), *size)[0]["boxes"].numpy().astype(np.float64)
            records.append((*_detections(model, batch, size, SCORE_THRESHOLD), labelled, None))
    return _result(records, f"{split_dir / 'label.txt'}: every labelled face lies outside its photo; "
                            "AP is undefined")


def _photo(path: Path, size_multiple: int, device: torch.device | str) -> tuple[torch.Tensor, tuple[int, int]]:
    """A photo as a network batch of one (padded when the family needs it) and its own (H, W)."""
    # The pixel limit applies to the padded size: that is what is allocated.
    picture = read_image(path, multiple=size_multiple)
    height, width = picture.shape[-2:]
    batch = to_network_input(picture)
    if size_multiple > 1:
        batch = pad_to_multiple(batch, size_multiple)
    return batch.to(device), (int(height), int(width))


def _detections(model: nn.Module, batch: torch.Tensor, size: tuple[int, int],
                conf_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(K×4 xyxy boxes in photo pixels, K scores) of one photo."""
    (found,) = detect(model, batch, conf_threshold=conf_threshold, nms_threshold=NMS_THRESHOLD,
                      keep_top_k=KEEP_TOP_K, image_sizes=[size])
    return found.boxes.cpu().numpy().astype(np.float64), found.scores.cpu().numpy().astype(np.float64)


def _result(records: list[ImageRecord], no_faces: str) -> AgreementResult:
    faces = sum(len(gt) for _, _, gt, _ in records)
    if faces == 0:
        raise DataError(no_faces)
    return AgreementResult(average_precision_all_points(records), len(records), faces)


@contextmanager
def _moved_to(device: torch.device | str, *models: nn.Module) -> Iterator[None]:
    # Measuring must leave the caller's models where they were, as detect()
    # leaves their train/eval mode; a model without tensors has nowhere to go.
    homes = []
    for model in models:
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        if tensor is not None:
            homes.append((model, tensor.device))
            model.to(device)
    try:
        yield
    finally:
        for model, home in homes:
            model.to(home)
