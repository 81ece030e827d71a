"""Running a face detector (the RetinaFace output contract) and turning its raw outputs into detections.

`postprocess` is a pure function of the model outputs so evaluation code can
reuse it on stored outputs; `detect` only adds the forward pass around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import nms

from .boxes import VARIANCES, decode_boxes, decode_landmarks
from .priors import make_priors

__all__ = ["Detections", "detect", "postprocess"]

_FACE_CLASS = 1


@dataclass
class Detections:
    """Faces in one image, sorted by decreasing score.

    boxes: K×4 (x1, y1, x2, y2) in input pixels; scores: K face
    probabilities; landmarks: K×10 (x1, y1, …, x5, y5) in input pixels.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _check_outputs(
    bbox: torch.Tensor, conf_logits: torch.Tensor, landmarks: torch.Tensor, priors: torch.Tensor
) -> None:
    # A prior-count mismatch would otherwise decode garbage without error.
    expected = (
        (bbox, 4, "bbox"),
        (conf_logits, 2, "conf_logits"),
        (landmarks, 10, "landmarks"),
    )
    for tensor, width, name in expected:
        if tensor.dim() != 3 or tensor.shape[1:] != (priors.shape[0], width):
            raise ValueError(
                f"{name} must be N×{priors.shape[0]}×{width} to match the priors, "
                f"got {tuple(tensor.shape)}"
            )


def _pixel_scale(input_size: tuple[int, int], repeats: int, like: torch.Tensor) -> torch.Tensor:
    height, width = input_size
    return torch.tensor([width, height] * repeats, dtype=like.dtype, device=like.device)


def _clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    height, width = image_size
    clipped = boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    return clipped


def _candidates(scores: torch.Tensor, conf_threshold: float, top_k: int) -> torch.Tensor:
    """Indices of priors above the threshold, best first (ties in prior order), at most top_k.

    Capping before NMS bounds its quadratic cost on cluttered images.  The
    order of tied scores must not depend on which other priors pass the
    threshold (topk's does): a detector's confident faces must come out the
    same at any lower threshold, or it would not agree with itself.
    """
    (above,) = torch.nonzero(scores > conf_threshold, as_tuple=True)
    best = torch.sort(scores[above], descending=True, stable=True).indices[:top_k]
    return above[best]


def _postprocess_one(
    bbox: torch.Tensor,
    scores: torch.Tensor,
    landmarks: torch.Tensor,
    priors: torch.Tensor,
    input_size: tuple[int, int],
    image_size: tuple[int, int] | None,
    conf_threshold: float,
    nms_threshold: float,
    top_k: int,
    keep_top_k: int,
    variances: tuple[float, float],
) -> Detections:
    idx = _candidates(scores, conf_threshold, top_k)
    # Decode only the survivors: most of the P priors are background.
    boxes = decode_boxes(bbox[idx], priors[idx], variances) * _pixel_scale(input_size, 2, bbox)
    points = decode_landmarks(landmarks[idx], priors[idx], variances)
    points = points * _pixel_scale(input_size, 5, landmarks)
    kept_scores = scores[idx]
    # Landmarks stay unclipped: a point outside is still the model's best estimate.
    if image_size is not None:
        # Clip before NMS, so that suppression judges the boxes as they are
        # reported: two boxes that differ only outside the image are one
        # detection, not two identical ones.  A box wholly in the padding
        # clips to a line on the image's border: no detection, only an
        # artefact of padding.
        boxes = _clip_boxes(boxes, image_size)
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, kept_scores, points = boxes[inside], kept_scores[inside], points[inside]

    # The candidates are ranked already; NMS gets that rank as its scores so
    # that tied scores are visited in this order (torchvision does not
    # promise a stable sort).  It returns indices best first, so slicing
    # keeps the best.
    rank = torch.arange(len(boxes), 0, -1, dtype=boxes.dtype, device=boxes.device)
    keep = nms(boxes, rank, nms_threshold)[:keep_top_k]
    boxes, kept_scores, points = boxes[keep], kept_scores[keep], points[keep]
    return Detections(boxes=boxes, scores=kept_scores, landmarks=points)


def postprocess(
    bbox: torch.Tensor,
    conf_logits: torch.Tensor,
    landmarks: torch.Tensor,
    priors: torch.Tensor,
    input_size: tuple[int, int],
    *,
    conf_threshold: float = 0.02,
    nms_threshold: float = 0.4,
    top_k: int = 5000,
    keep_top_k: int = 750,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    variances: tuple[float, float] = VARIANCES,
) -> list[Detections]:
    """Raw model outputs (N×P×4, N×P×2 logits, N×P×10) to one Detections per image.

    `input_size` is the network input's (H, W), padding included, because the
    priors and hence the decoded boxes are normalised by it. `image_sizes`
    holds each image's (h, w) before padding: boxes are clipped to it before
    NMS, and those left without area (wholly in the padding) are dropped.
    Tied scores keep the priors' order.
    """
    priors = priors.to(device=bbox.device)
    _check_outputs(bbox, conf_logits, landmarks, priors)
    if image_sizes is not None and len(image_sizes) != bbox.shape[0]:
        raise ValueError(f"got {len(image_sizes)} image_sizes for a batch of {bbox.shape[0]}")
    # The model emits logits in every mode; probabilities are made here.
    face_scores = torch.softmax(conf_logits.float(), dim=-1)[..., _FACE_CLASS]
    return [
        _postprocess_one(
            bbox[i].float(),
            face_scores[i],
            landmarks[i].float(),
            priors,
            input_size,
            None if image_sizes is None else tuple(image_sizes[i]),
            conf_threshold,
            nms_threshold,
            top_k,
            keep_top_k,
            variances,
        )
        for i in range(bbox.shape[0])
    ]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Remember every submodule's flag, not just the root's: a model with some
    # parts deliberately frozen in eval mode must come back exactly as it was.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def detect(
    model: nn.Module,
    images: torch.Tensor,
    *,
    conf_threshold: float = 0.02,
    nms_threshold: float = 0.4,
    top_k: int = 5000,
    keep_top_k: int = 750,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    priors: torch.Tensor | None = None,
) -> list[Detections]:
    """Detect faces in a preprocessed N×3×H×W batch (see preprocess.py).

    Boxes and landmarks come back in pixels of the input; pass the
    pre-padding (h, w) of each image as `image_sizes` to clip boxes to it
    (and drop those wholly in the padding).
    Priors are rebuilt from the input size unless given (pass them to avoid
    recomputing for a fixed input size).
    """
    input_size = (int(images.shape[-2]), int(images.shape[-1]))
    with _eval_mode(model), torch.no_grad():
        bbox, conf_logits, landmarks = model(images)
    if priors is None:
        priors = make_priors(input_size, device=images.device)
    return postprocess(
        bbox,
        conf_logits,
        landmarks,
        priors,
        input_size,
        conf_threshold=conf_threshold,
        nms_threshold=nms_threshold,
        top_k=top_k,
        keep_top_k=keep_top_k,
        image_sizes=image_sizes,
    )
