"""The RetinaFace flavour of the WIDER FACE annotation format, and a Dataset.

Layout under a root directory::

    train/label.txt        annotations (format below)
    train/images/<path>    images named in label.txt
    val/label.txt          same format; the public WIDER release has none,
                           our embedded set writes one for exact AP
    val/wider_val.txt      one relative image path per line
    val/images/<path>

label.txt: a line ``# relative/path.jpg`` opens an image; each following
line is one face: ``x y w h`` then five landmarks as ``lx ly flag`` triples,
then a blur/confidence value — 20 numbers. Landmark coordinates of -1 mean
"not annotated". Lines with only ``x y w h`` (as in some val files) are
accepted as faces without landmarks.

Coordinates are continuous pixel edges: a box x y w h covers [x, x+w)
horizontally, so its corners are (x, y, x+w, y+h).

Boxes that stick out of the image are handled when the image is decoded
(its size is unknown before): they are clipped to the image, and a box left
with no area (entirely outside) is dropped with a logged warning.

Bad data raises :class:`~facedet.data.errors.DataError` with one line
naming the root, file and line: a missing split or label file, a label file
that is not UTF-8 text or holds no image or no usable face, a split where not
one image decodes.  Images are read by :func:`facedet.data.images.read_image`
(every common format, 8-bit RGB, the pixel limit checked from the header);
one that cannot be used is skipped, logged and counted in ``skipped``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset

from .errors import DataError, NoUsableImagesError
from .images import ImageError, max_pixels_limit, read_image

__all__ = [
    "NUM_LANDMARKS",
    "SPLITS",
    "Sample",
    "read_label_file",
    "read_image_list",
    "format_label_file",
    "clip_target_to_image",
    "empty_target",
    "FaceDataset",
]

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 5
# The splits a dataset root may hold; "test" is held out: only ever measured, never tuned on.
SPLITS: tuple[str, ...] = ("train", "val", "test")
_FULL_LINE = 4 + 3 * NUM_LANDMARKS + 1
_BOX_ONLY_LINE = 4

Target = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sample:
    """One annotated image. `image` is relative to the split's images/ folder."""

    image: str
    boxes: torch.Tensor  # N×4 float32, xyxy pixels
    landmarks: torch.Tensor  # N×10 float32, x,y interleaved; -1 where unannotated
    landmark_valid: torch.Tensor  # N bool

    def target(self) -> Target:
        """Fresh copies, so transforms may modify them in place."""
        return {
            "boxes": self.boxes.clone(),
            "landmarks": self.landmarks.clone(),
            "landmark_valid": self.landmark_valid.clone(),
        }


@dataclass
class _Face:
    box: list[float]
    landmarks: list[float]
    valid: bool


def _parse_numbers(text: str) -> list[float] | None:
    try:
        values = [float(token) for token in text.split()]
    except ValueError:
        return None
    # nan/inf parse as floats but would poison every loss they reach.
    if not all(math.isfinite(v) for v in values):
        return None
    return values


def _face_from_values(values: list[float]) -> _Face:
    x, y, w, h = values[:4]
    if len(values) == _BOX_ONLY_LINE:
        return _Face([x, y, x + w, y + h], [-1.0] * (2 * NUM_LANDMARKS), False)
    triples = values[4 : 4 + 3 * NUM_LANDMARKS]
    points = [coord for i in range(NUM_LANDMARKS) for coord in triples[3 * i : 3 * i + 2]]
    # The flag (visible/occluded) is not a validity marker; -1 coordinates are.
    # Requiring all points keeps a half-annotated face out of the landmark loss.
    valid = all(coord >= 0 for coord in points)
    if not valid:
        points = [-1.0] * (2 * NUM_LANDMARKS)
    return _Face([x, y, x + w, y + h], points, valid)


def _check_face_line(values: list[float] | None) -> str | None:
    """Why a face line is unusable, or None if it is fine."""
    if values is None:
        return "non-numeric or non-finite value"
    if len(values) not in (_FULL_LINE, _BOX_ONLY_LINE):
        return f"expected {_FULL_LINE} (or {_BOX_ONLY_LINE}) numbers, got {len(values)}"
    if values[2] <= 0 or values[3] <= 0:
        return f"box of non-positive size w={values[2]:g} h={values[3]:g}"
    return None


def _make_sample(image: str, faces: list[_Face]) -> Sample:
    if not faces:
        return Sample(
            image,
            torch.zeros((0, 4)),
            torch.zeros((0, 2 * NUM_LANDMARKS)),
            torch.zeros(0, dtype=torch.bool),
        )
    return Sample(
        image,
        torch.tensor([f.box for f in faces], dtype=torch.float32),
        torch.tensor([f.landmarks for f in faces], dtype=torch.float32),
        torch.tensor([f.valid for f in faces], dtype=torch.bool),
    )


def _inside_images(image: str, where: str) -> str:
    """``image`` when it stays inside the split's images/ folder; DataError naming ``where`` otherwise."""
    if ".." in PurePosixPath(image.replace("\\", "/")).parts:
        raise DataError(f"{where}: image path {image!r} leaves the split's images/ folder ('..' is not allowed)")
    return image


def _parse_lines(lines: Iterable[str], name: str, source: Path | None = None) -> tuple[list[Sample], list[str]]:
    samples: list[Sample] = []
    warnings: list[str] = []
    image: str | None = None
    faces: list[_Face] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if image is not None:
                samples.append(_make_sample(image, faces))
            image, faces = line[1:].strip().lstrip("/"), []
            if not image:
                warnings.append(f"{name}:{number}: '#' line without an image path")
                image = None
            else:
                _inside_images(image, f"{source or name}: line {number}")
            continue
        if image is None:
            warnings.append(f"{name}:{number}: face line before any '# image' line")
            continue
        values = _parse_numbers(line)
        problem = _check_face_line(values)
        if problem is not None:
            warnings.append(f"{name}:{number}: {problem}; line skipped")
            continue
        faces.append(_face_from_values(values))
    if image is not None:
        samples.append(_make_sample(image, faces))
    return samples, warnings


def read_text_lines(path: Path, error: type[DataError] = DataError) -> list[str]:
    """The lines of a UTF-8 text file; ``error`` naming the file (and line) for anything else."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a text file") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "is this a binary file?"
        ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise error(f"{path}: line {line}: NUL byte; this is a binary file, not text")
    # Lines end at "\n" only (and "\r\n"), so line numbers are the ones editors show.
    return text.replace("\r\n", "\n").split("\n")


def read_label_file(path: str | Path) -> tuple[list[Sample], list[str]]:
    """Parse a RetinaFace-style label.txt.

    Returns the samples (images with no usable face are kept, with empty
    targets: they are valid negatives) and one warning per skipped line,
    formatted ``label.txt:LINE: reason``. Raises DataError (a ValueError)
    when the file cannot be read as UTF-8 text, or holds no image or not a
    single usable face.
    """
    path = Path(path)
    lines = read_text_lines(path)
    samples, warnings = _parse_lines(lines, path.name, path)
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: empty file: no '# image' entries")
    if not samples:
        raise DataError(f"{path}: no '# image' entries found (not a label file?); {_first_problem(warnings)}")
    if sum(len(s.boxes) for s in samples) == 0:
        detail = f"; {_first_problem(warnings)}" if warnings else ""
        raise DataError(f"{path}: {len(samples)} images but no usable face annotation{detail}")
    return samples, warnings


def _first_problem(warnings: list[str]) -> str:
    """'line N: reason' of the first ``name:N: reason`` warning (reasons hold no colon)."""
    _, number, reason = warnings[0].rsplit(":", 2)
    reason = reason.strip().removesuffix("; line skipped")
    more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
    return f"line {number}: {reason}{more}"


def read_image_list(path: str | Path) -> list[str]:
    """Relative image paths from a wider_val.txt-style list.

    The public list writes them with a leading '/', which would make
    `Path(root) / line` absolute, so it is stripped.
    """
    path = Path(path)
    names = [_inside_images(line.strip().lstrip("/"), f"{path}: line {number}")
             for number, line in enumerate(read_text_lines(path), start=1) if line.strip()]
    if not names:
        raise DataError(f"{path}: no image paths found")
    return names


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def _format_face(box: Sequence[float], landmarks: Sequence[float], valid: bool) -> str:
    x1, y1, x2, y2 = (float(v) for v in box)
    fields = [_format_number(v) for v in (x1, y1, x2 - x1, y2 - y1)]
    for i in range(NUM_LANDMARKS):
        if valid:
            fields += [f"{float(landmarks[2 * i]):.3f}", f"{float(landmarks[2 * i + 1]):.3f}", "0.0"]
        else:
            fields += ["-1.0", "-1.0", "-1.0"]
    # Last field: RetinaFace files hold a confidence here, -1.0 for faces
    # without landmarks; readers ignore it.
    fields.append("1.0" if valid else "-1.0")
    return " ".join(fields)


def format_label_file(samples: Iterable[Sample]) -> str:
    """The label.txt text for `samples` (inverse of read_label_file)."""
    lines: list[str] = []
    for sample in samples:
        lines.append(f"# {sample.image}")
        for box, points, valid in zip(sample.boxes, sample.landmarks, sample.landmark_valid):
            lines.append(_format_face(box.tolist(), points.tolist(), bool(valid)))
    return "\n".join(lines) + "\n"


def empty_target() -> Target:
    return _make_sample("", []).target()


def clip_target_to_image(target: Target, height: int, width: int) -> tuple[Target, int]:
    """Clip boxes to the image; drop boxes left without area.

    Landmarks are not clipped: a point of a truncated face legitimately lies
    outside the image, and the prior encoding handles it. Returns the new
    target and how many faces were dropped.
    """
    boxes = target["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    clipped = {key: value[keep] for key, value in target.items()}
    clipped["boxes"] = boxes[keep]
    return clipped, int((~keep).sum())


def _decode(path: Path, max_pixels: int) -> torch.Tensor:
    # The transforms pad every image to a square of its longer side, so the
    # limit applies to that square: it is what gets allocated.
    return read_image(path, max_pixels, square=True)


def _try_decode(path: Path, max_pixels: int) -> torch.Tensor | None:
    try:
        return _decode(path, max_pixels)
    except ImageError as error:
        logger.warning("skipping %s", error)
        return None


def _load_split_samples(split_dir: Path) -> tuple[list[Sample], list[str]]:
    """The split's samples and the warnings to log about them (skipped lines, missing labels)."""
    root = split_dir.parent
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found" if not root.exists() else f"{root}: dataset root is not a folder")
    if not split_dir.is_dir():
        raise DataError(f"{root}: no {split_dir.name}/ folder (expected {split_dir.name}/label.txt and "
                        f"{split_dir.name}/images/)")
    labels = split_dir / "label.txt"
    if labels.exists():
        return read_label_file(labels)
    image_list = split_dir / "wider_val.txt"
    if image_list.exists():
        # The public val split ships no ground truth here; images still load
        # (for inference/export) with empty targets.
        samples = [_make_sample(name, []) for name in read_image_list(image_list)]
        return samples, [f"{labels} missing; loading {image_list} without ground truth"]
    raise DataError(f"{split_dir}: neither label.txt nor wider_val.txt found")


class FaceDataset(Dataset):
    """Images and face targets of one split in the RetinaFace WIDER layout.

    Items are ``(image, target)``: image a uint8 3×H×W RGB tensor, target a
    dict with ``boxes`` (N×4 float xyxy pixels), ``landmarks`` (N×10) and
    ``landmark_valid`` (N bool); `transform(image, target)` is applied last.

    With ``verify=True`` every image is decoded once up front, so unreadable
    ones are skipped before training starts and ``len()`` is honest; they are
    logged and listed in ``skipped``; when none is left, NoUsableImagesError
    (a DataError) names the split and the first reason, and nothing is logged.
    With ``verify=False`` (faster start on large sets) an unreadable image is
    discovered in ``__getitem__``, logged, added to ``skipped`` and replaced by
    the next readable one. Note that with DataLoader workers, ``skipped`` is
    updated in the workers' copies only.

    ``max_pixels`` is the pixel limit of :func:`facedet.data.images.read_image`
    (default: ``$COMPRESSOR_MAX_PIXELS`` or 40 megapixels), applied to the
    square each image is padded to; larger images are skipped like unreadable ones.

    ``min_images`` usable images are required (``needed_for`` says why, in
    the message); fewer raise DataError before anything is logged.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None = None,
        verify: bool = True,
        max_pixels: int | None = None,
        min_images: int = 1,
        needed_for: str = "",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.image_dir = self.root / split / "images"
        self.max_pixels = max_pixels_limit(max_pixels)
        self.min_images = max(min_images, 1)
        self.needed_for = needed_for
        self.skipped: list[Path] = []
        self._warned_clipping: set[int] = set()
        samples, warnings = _load_split_samples(self.root / split)
        if not self.image_dir.is_dir():
            raise NoUsableImagesError(
                f"{self.image_dir}: folder not found ({len(samples)} images listed in {self.root / split})"
            )
        # Warnings are logged only once the split is known to be usable, so a
        # refused split is one line, not a screen of warnings and then the error.
        self.samples = self._verified(samples, warnings) if verify else samples
        if not verify:
            self._check_enough(len(samples))
            for warning in warnings:
                logger.warning("%s", warning)

    def _verified(self, samples: list[Sample], warnings: list[str]) -> list[Sample]:
        readable = []
        problems: list[str] = []
        for sample in samples:
            path = self.image_dir / sample.image
            try:
                _decode(path, self.max_pixels)
            except ImageError as error:
                self.skipped.append(path)
                problems.append(str(error))
            else:
                readable.append(sample)
        if not readable:
            listed = "label.txt" if (self.root / self.split / "label.txt").exists() else "wider_val.txt"
            raise NoUsableImagesError(
                f"{self.root / self.split}: none of the {len(samples)} images listed in {listed} could be "
                f"decoded; first: {problems[0]}"
            )
        self._check_enough(len(readable))
        for warning in warnings:
            logger.warning("%s", warning)
        for problem in problems:
            logger.warning("skipping %s", problem)
        if self.skipped:
            logger.warning(
                "%s: skipped %d of %d images that could not be decoded",
                self.root / self.split, len(self.skipped), len(samples),
            )
        return readable

    def _check_enough(self, usable: int) -> None:
        if usable >= self.min_images:
            return
        skipped = f" ({len(self.skipped)} more could not be decoded)" if self.skipped else ""
        raise DataError(
            f"{self.root / self.split}: {usable} usable images{skipped}, fewer than {self.min_images}"
            + (f": {self.needed_for}" if self.needed_for else "")
        )

    def __len__(self) -> int:
        return len(self.samples)

    def _decode_from(self, index: int) -> tuple[int, torch.Tensor]:
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            path = self.image_dir / self.samples[candidate].image
            if path in self.skipped:
                continue
            image = _try_decode(path, self.max_pixels)
            if image is not None:
                return candidate, image
            self.skipped.append(path)
        raise NoUsableImagesError(f"{self.root / self.split}: no image could be decoded "
                                  f"({len(self.skipped)} skipped, last: {self.skipped[-1]})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        # IndexError ends plain `for item in dataset` iteration; without it
        # the wrap-around in _decode_from would loop forever.
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        index, image = self._decode_from(index % len(self.samples))
        sample = self.samples[index]
        height, width = image.shape[-2:]
        target, dropped = clip_target_to_image(sample.target(), height, width)
        if dropped and index not in self._warned_clipping:
            self._warned_clipping.add(index)
            logger.warning("%s: dropped %d box(es) outside the %dx%d image", sample.image, dropped, width, height)
        if self.transform is not None:
            return self.transform(image, target)
        return image, target
