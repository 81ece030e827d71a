"""Training augmentation and evaluation resizing for face detection.

Everything takes and returns ``(image, target)``: image uint8 3×H×W RGB,
target a dict with ``boxes`` (N×4 xyxy pixels), ``landmarks`` (N×10, x,y
interleaved, -1 where unannotated) and ``landmark_valid`` (N bool).
TrainTransform/EvalTransform end with the network convention instead: a
float32 3×S×S BGR-minus-mean image and coordinates divided by S, which is
what prior matching works in.

Every random draw takes an optional ``torch.Generator``; without one the
global torch RNG is used, so ``torch.manual_seed`` makes runs repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

from facedet.preprocess import MEAN_BGR, to_network_input

__all__ = [
    "CROP_SCALES",
    "LANDMARK_FLIP_ORDER",
    "Photometric",
    "random_square_crop",
    "horizontal_flip",
    "random_horizontal_flip",
    "photometric_distort",
    "pad_to_square",
    "resize_square",
    "normalise_target",
    "TrainTransform",
    "EvalTransform",
]

Target = dict[str, torch.Tensor]

# Fractions of the short side tried for the square crop (RetinaFace's set):
# small crops zoom in, so small faces are also seen at large scales.
CROP_SCALES: tuple[float, ...] = (0.3, 0.45, 0.6, 0.8, 1.0)

# Points are left eye, right eye, nose, left mouth, right mouth. Mirroring
# the image turns the left eye into the right one, so after mirroring the x
# coordinates the point order must be permuted too, or the landmark head
# learns that "left eye" sits on either side.
LANDMARK_FLIP_ORDER: tuple[int, ...] = (1, 0, 2, 4, 3)

# Padding in the mean colour becomes exactly 0 after to_network_input.
_MEAN_RGB: tuple[float, float, float] = tuple(reversed(MEAN_BGR))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def _coin(p: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator).item() < p


def _map_valid_landmarks(target: Target, fn) -> torch.Tensor:
    """Apply `fn` to the N×5×2 points of annotated faces only.

    Unannotated faces keep their -1 sentinel through every geometric step.
    """
    landmarks = target["landmarks"].clone()
    valid = target["landmark_valid"]
    if valid.any():
        points = landmarks[valid].view(-1, 5, 2)
        landmarks[valid] = fn(points).reshape(-1, 10)
    return landmarks


def _centres_inside(boxes: torch.Tensor, left: int, top: int, side: int) -> torch.Tensor:
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    low = torch.tensor([left, top], dtype=boxes.dtype)
    return ((centres > low) & (centres < low + side)).all(dim=1)


def _crop(image: torch.Tensor, target: Target, left: int, top: int, side: int, keep: torch.Tensor) -> tuple[torch.Tensor, Target]:
    offset = torch.tensor([left, top], dtype=torch.float32)
    boxes = target["boxes"][keep] - offset.repeat(2)
    boxes = boxes.clamp(0, side)
    kept = {key: value[keep] for key, value in target.items()}
    kept["boxes"] = boxes
    kept["landmarks"] = _map_valid_landmarks(kept, lambda p: p - offset)
    return image[:, top : top + side, left : left + side], kept


def random_square_crop(
    image: torch.Tensor,
    target: Target,
    scales: Sequence[float] = CROP_SCALES,
    attempts: int = 250,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Target, bool]:
    """Crop a random square whose side is a random fraction of the short side.

    A crop is accepted only if at least one face has its centre strictly
    inside; faces whose centre falls outside are dropped (a sliver of a face
    is a worse label than none), the rest are clipped to the crop. After
    `attempts` failures the input is returned unchanged. The third value
    says whether a crop was made.
    """
    height, width = image.shape[-2:]
    boxes = target["boxes"]
    if len(boxes) == 0:
        return image, target, False
    short = min(height, width)
    for _ in range(attempts):
        side = max(1, int(scales[_randint(0, len(scales) - 1, generator)] * short))
        left = _randint(0, width - side, generator)
        top = _randint(0, height - side, generator)
        keep = _centres_inside(boxes, left, top, side)
        if keep.any():
            cropped, kept = _crop(image, target, left, top, side, keep)
            return cropped, kept, True
    return image, target, False


def horizontal_flip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror the image, boxes and landmarks; swap left/right landmark points."""
    width = image.shape[-1]
    flipped = dict(target)
    boxes = target["boxes"]
    flipped["boxes"] = torch.stack(
        (width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1
    )

    def mirror(points: torch.Tensor) -> torch.Tensor:
        mirrored = points.clone()
        mirrored[..., 0] = width - points[..., 0]
        return mirrored[:, list(LANDMARK_FLIP_ORDER)]

    flipped["landmarks"] = _map_valid_landmarks(target, mirror)
    return image.flip(-1), flipped


def random_horizontal_flip(
    image: torch.Tensor, target: Target, p: float = 0.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, Target]:
    if _coin(p, generator):
        return horizontal_flip(image, target)
    return image, target


@dataclass(frozen=True)
class Photometric:
    """Ranges of the colour jitter; each adjustment is applied with probability p.

    Defaults are close to RetinaFace's (brightness ±32 of 255, contrast and
    saturation ×0.5..1.5, hue ±18°), expressed as torchvision factors.
    """

    brightness: tuple[float, float] = (0.875, 1.125)
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.05, 0.05)
    p: float = 0.5


def photometric_distort(
    image: torch.Tensor,
    params: Photometric = Photometric(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue on a uint8 RGB image.

    Written with torchvision's functional ops rather than v2.ColorJitter
    because ColorJitter always draws from the global RNG.
    """
    steps = (
        (TF.adjust_brightness, params.brightness),
        (TF.adjust_contrast, params.contrast),
        (TF.adjust_saturation, params.saturation),
        (TF.adjust_hue, params.hue),
    )
    # Saturation and hue leave a gray image (three equal channels) unchanged, and
    # the HSV round trip is the costliest step: skip it when it cannot matter.
    gray = bool((image[0] == image[1]).all() and (image[1] == image[2]).all())
    for adjust, (low, high) in steps:
        # Draw both numbers every time so the RNG stream does not depend on
        # which adjustments fired.
        fire = _coin(params.p, generator)
        factor = _uniform(low, high, generator)
        # A range that is the identity only (hue (0, 0), a factor (1, 1)) turns an adjustment off.
        no_op = low == high == (0.0 if adjust is TF.adjust_hue else 1.0)
        if fire and not no_op and not (gray and adjust in (TF.adjust_saturation, TF.adjust_hue)):
            image = adjust(image, factor)
    return image


def pad_to_square(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Pad bottom/right with the mean colour; coordinates are unchanged."""
    height, width = image.shape[-2:]
    side = max(height, width)
    if height == width:
        return image, target
    padded = torch.empty((image.shape[0], side, side), dtype=image.dtype)
    padded[:] = torch.tensor(_MEAN_RGB, dtype=torch.float32).round().to(image.dtype).view(-1, 1, 1)
    padded[:, :height, :width] = image
    return padded, target


def resize_square(image: torch.Tensor, target: Target, size: int) -> tuple[torch.Tensor, Target]:
    """Resize to size×size (aspect not kept: pad first to keep it)."""
    height, width = image.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
    resized_image = TF.resize(image, [size, size], antialias=True)
    resized_boxes = TF.resize(boxes, [size, size])
    scale = torch.tensor([size / width, size / height])
    resized = dict(target)
    resized["boxes"] = resized_boxes.as_subclass(torch.Tensor)
    resized["landmarks"] = _map_valid_landmarks(target, lambda p: p * scale)
    return resized_image, resized


def _drop_empty(target: Target) -> Target:
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {key: value[keep] for key, value in target.items()}


def normalise_target(target: Target, size: int) -> Target:
    """Divide coordinates by the square side; add class labels (1 = face).

    Unannotated landmarks stay at -1, outside [0, 1], so a loss that forgot
    to mask with ``landmark_valid`` fails loudly instead of learning zeros.
    """
    target = _drop_empty(target)
    normalised = dict(target)
    normalised["boxes"] = target["boxes"] / size
    normalised["landmarks"] = _map_valid_landmarks(target, lambda p: p / size)
    normalised["labels"] = torch.ones(len(target["boxes"]), dtype=torch.int64)
    return normalised


def _to_network(image: torch.Tensor) -> torch.Tensor:
    return to_network_input(image)[0]


class TrainTransform:
    """Crop → flip → colour → resize → network input, RetinaFace style.

    Pass `generator` for a private, reproducible stream. With DataLoader
    workers leave it None: each worker gets a copy of a passed generator
    (identical augmentations across workers), whereas the global RNG is
    reseeded per worker by the DataLoader.
    """

    def __init__(
        self,
        size: int = 640,
        crop_scales: Sequence[float] = CROP_SCALES,
        crop_attempts: int = 250,
        flip_p: float = 0.5,
        photometric: Photometric | None = Photometric(),
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = size
        self.crop_scales = tuple(crop_scales)
        self.crop_attempts = crop_attempts
        self.flip_p = flip_p
        self.photometric = photometric
        self.generator = generator

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        gen = self.generator
        image, target, cropped = random_square_crop(image, target, self.crop_scales, self.crop_attempts, gen)
        if not cropped:
            # Keep the image whole but square, so resizing does not distort faces.
            image, target = pad_to_square(image, target)
        image, target = random_horizontal_flip(image, target, self.flip_p, gen)
        image, target = resize_square(image, target, self.size)
        # Colour jitter after resizing: the same distribution, on fewer pixels.
        if self.photometric is not None:
            image = photometric_distort(image, self.photometric, gen)
        return _to_network(image), normalise_target(target, self.size)


class EvalTransform:
    """Deterministic: pad bottom/right to square, resize to size×size.

    Adds ``orig_size`` (H, W) and ``scale`` (network pixels per original
    pixel) so detections can be mapped back: original = normalised * size / scale.
    """

    def __init__(self, size: int = 640) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        image, target = pad_to_square(image, target)
        image, target = resize_square(image, target, self.size)
        target = normalise_target(target, self.size)
        target["orig_size"] = torch.tensor([height, width])
        target["scale"] = torch.tensor(self.size / max(height, width))
        return _to_network(image), target
