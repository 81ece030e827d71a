"""WIDER FACE evaluation protocol, reproduced exactly and vectorised with numpy.

The official protocol (MATLAB toolbox and its widely used Python port) is:

* Scores are min-max normalised over the *whole* prediction set, so the fixed
  thresholds below mean the same thing for every detector.
* Per image, predictions are taken in descending score order; each one is
  matched to the ground-truth face of highest IoU.  If that IoU reaches the
  threshold (0.5) and the face is ignored in the current setting, the
  prediction is dropped (neither TP nor FP); if the face is kept, it counts as
  recalled from that prediction on.  Several predictions may match the same
  face: only the first recalls it, the later ones are still proposals (FP).
* For 1,000 thresholds ``t = 1 - (k + 1) / 1000`` the predictions with
  ``score >= t`` give ``proposals`` (not dropped) and ``tp`` (kept faces
  recalled); both are summed over images.
* ``precision = tp / proposals``, ``recall = tp / number of kept faces`` and
  the AP is the VOC area under the precision envelope.

The general-purpose core (:func:`image_pr_counts`, :func:`average_precision`,
:func:`voc_ap`) knows nothing about WIDER FACE, so the same code also gives a
single AP on any other set of images with optional ``ignore`` flags.
:func:`average_precision_all_points` is the VOC variant of the same matching:
raw scores, every distinct score a threshold.
:func:`evaluate_widerface` only adapts the WIDER FACE files to that core.

Files that cannot be evaluated as they are raise :class:`WiderFaceInputError`
(a ValueError) with one line naming the file (and line) and what is wrong:
prediction folders not in the ``<event>/<image>.txt`` layout or holding no
prediction at all, lines that are not five finite numbers or have a negative
width or height, files that are not UTF-8 text, prediction files for images
or events the ground truth does not know, ``.mat`` files that are not
readable MATLAB files or lack the WIDER FACE variables or their structure.
A missing ground-truth file is a FileNotFoundError.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from .data.errors import DataError
from .data.widerface import read_text_lines

__all__ = [
    "NUM_THRESHOLDS",
    "WIDER_BOX_OFFSET",
    "WIDER_SETTINGS",
    "WiderFaceGroundTruth",
    "WiderFaceInputError",
    "average_precision",
    "Interval",
    "average_precision_all_points",
    "average_precision_difference_interval",
    "average_precision_interval",
    "check_predictions_known",
    "evaluate_widerface",
    "evaluate_widerface_predictions",
    "image_pr_counts",
    "iou_matrix",
    "load_ground_truth",
    "normalise_scores",
    "pr_thresholds",
    "read_prediction_file",
    "read_predictions",
    "score_range",
    "voc_ap",
    "xywh_to_xyxy",
]

WIDER_SETTINGS: tuple[str, ...] = ("easy", "medium", "hard")
NUM_THRESHOLDS = 1000
# The official IoU uses the legacy inclusive-pixel convention: a box from x1 to
# x2 is x2 - x1 + 1 pixels wide (both for areas and for the intersection).  It
# was checked against the reference numbers: with +1 the APs match exactly,
# without it they are 4-5e-3 lower.
WIDER_BOX_OFFSET = 1.0

_GT_FILE = "wider_face_val.mat"
_SETTING_FILE = "wider_{}_val.mat"
_LAYOUT = "<event>/<image>.txt"


class WiderFaceInputError(DataError):
    """Prediction or ground-truth files that cannot be evaluated; the message names the file."""


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(N, >=4) ``x, y, w, h`` -> (N, 4) float64 ``x1, y1, x2, y2`` with ``x2 = x + w``."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4))
    out = boxes.reshape(-1, boxes.shape[-1])[:, :4].copy()
    out[:, 2:] += out[:, :2]
    return out


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """IoU of every box in ``boxes_a`` (N, 4) with every box in ``boxes_b`` (M, 4), xyxy.

    ``offset`` is added to every width and height: 0 for continuous
    coordinates, 1 (:data:`WIDER_BOX_OFFSET`) for the inclusive-pixel
    convention of the official WIDER FACE code.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0] + offset) * (a[:, 3] - a[:, 1] + offset)
    area_b = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + offset
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + offset
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    # Same summation order as the reference (area_a + area_b - inter) so that
    # IoUs sitting exactly on the threshold round the same way.
    union = area_a[:, None] + area_b[None, :] - inter
    # Degenerate (zero-area) boxes would give 0/0; they overlap nothing.
    iou = np.zeros_like(inter)
    np.divide(inter, union, out=iou, where=inter > 0)
    return iou


# --------------------------------------------------------------------------
# Core: per-image counts, score normalisation, AP
# --------------------------------------------------------------------------


def pr_thresholds(num_thresholds: int = NUM_THRESHOLDS) -> np.ndarray:
    """The protocol's score thresholds ``1 - (k + 1) / n``, k = 0..n-1 (descending).

    Computed with the same float64 operations as the reference so that scores
    equal to a threshold fall on the same side.
    """
    return 1.0 - np.arange(1, num_thresholds + 1, dtype=np.float64) / num_thresholds


def _match_sorted(
    pred_xyxy: np.ndarray,
    gt_xyxy: np.ndarray,
    gt_ignore: np.ndarray,
    iou_threshold: float,
    box_offset: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of score-sorted predictions to gt.

    Returns ``(is_proposal, first_recall)``, both bool (P,): a prediction is
    not a proposal when its best gt is an ignored face; ``first_recall`` marks
    the prediction that first recalls each kept face.  Later predictions on an
    already recalled face are still proposals (false positives) and are never
    re-assigned to another face, exactly as in the reference (treating them as
    neither TP nor FP moves the WIDER FACE APs by ~2e-4).
    """
    num_pred = pred_xyxy.shape[0]
    is_proposal = np.ones(num_pred, dtype=bool)
    first_recall = np.zeros(num_pred, dtype=bool)
    if num_pred == 0 or gt_xyxy.shape[0] == 0:
        return is_proposal, first_recall
    iou = iou_matrix(pred_xyxy, gt_xyxy, box_offset)
    best_gt = iou.argmax(axis=1)  # first maximum on ties, like the reference
    matched = iou[np.arange(num_pred), best_gt] >= iou_threshold
    on_ignored = matched & gt_ignore[best_gt]
    is_proposal[on_ignored] = False
    hits = np.flatnonzero(matched & ~on_ignored)
    _, first = np.unique(best_gt[hits], return_index=True)
    first_recall[hits[first]] = True
    return is_proposal, first_recall


def _ranked_flags(
    boxes: np.ndarray,
    scores: np.ndarray,
    gt: np.ndarray,
    ignore: np.ndarray,
    iou_threshold: float,
    box_offset: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's scores in descending order with :func:`_match_sorted`'s flags in that order."""
    # Stable sort: ties keep their input order, as the reference (which
    # relies on files already sorted by score) does.
    order = np.argsort(-scores, kind="stable")
    is_proposal, first_recall = _match_sorted(boxes[order], gt, ignore, iou_threshold, box_offset)
    return scores[order], is_proposal, first_recall


def image_pr_counts(
    pred_boxes_xyxy: np.ndarray,
    pred_scores: np.ndarray,
    gt_boxes_xyxy: np.ndarray,
    gt_ignore_mask: np.ndarray | None,
    thresholds: np.ndarray,
    iou_threshold: float = 0.5,
    box_offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-threshold ``(proposals, tp)`` of one image, each an int64 array like ``thresholds``.

    ``pred_scores`` should already be normalised to the thresholds' scale.
    ``gt_ignore_mask`` (bool, True = ignored face) may be None for "all count".
    At threshold ``t`` the predictions with ``score >= t`` are considered:
    ``proposals`` counts those not matched to an ignored face and ``tp`` the
    kept faces recalled by them.
    """
    boxes = np.asarray(pred_boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    gt = np.asarray(gt_boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    ignore = _ignore_mask(gt_ignore_mask, gt.shape[0])
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
    scores, is_proposal, first_recall = _ranked_flags(boxes, scores, gt, ignore, iou_threshold, box_offset)

    # Number of predictions with score >= t, for every t at once: -scores is
    # ascending, and -s <= -t  <=>  s >= t.
    n_above = np.searchsorted(-scores, -np.asarray(thresholds, dtype=np.float64), side="right")
    cum_proposals = np.concatenate(([0], np.cumsum(is_proposal, dtype=np.int64)))
    cum_tp = np.concatenate(([0], np.cumsum(first_recall, dtype=np.int64)))
    return cum_proposals[n_above], cum_tp[n_above]


def _ignore_mask(mask: np.ndarray | None, num_gt: int) -> np.ndarray:
    if mask is None:
        return np.zeros(num_gt, dtype=bool)
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    if mask.shape[0] != num_gt:
        raise ValueError(f"ignore mask has {mask.shape[0]} entries for {num_gt} gt boxes")
    return mask


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC area under the precision envelope (all points, not 11-point).

    ``recall`` must be non-decreasing.  The curve is padded with (0, 0) and
    (1, 0), precision is replaced by its running maximum from the right, and
    the rectangles where recall changes are summed.
    """
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    # The same sum of rectangles, regrouped by where the envelope drops:
    # sum (r[j] - r[j-1]) * p[j] = sum r[j] * (p[j] - p[j+1]).  Summing recall
    # differences would round (a perfect detector on 452 faces scored
    # 0.9999999999999999); here it gives exactly 1 * (1 - 0).
    levels, heights = mrec[changes + 1], mpre[changes + 1]
    return float(np.sum(levels * (heights - np.append(heights[1:], 0.0))))


def score_range(score_arrays: Iterable[np.ndarray]) -> tuple[float, float]:
    """(min, max) over every score of every image; (0, 1) when there are none."""
    lo, hi = math.inf, -math.inf
    for scores in score_arrays:
        scores = np.asarray(scores)
        if scores.size:
            lo = min(lo, float(scores.min()))
            hi = max(hi, float(scores.max()))
    return (0.0, 1.0) if lo > hi else (lo, hi)


def normalise_scores(scores: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max normalisation ``(s - lo) / (hi - lo)``.

    When every score is equal the ranking carries no information; all
    predictions then get 1.0 so that they enter at the first threshold
    together instead of producing NaNs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if hi <= lo:
        return np.ones_like(scores)
    return (scores - lo) / (hi - lo)


ImageRecord = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]


def average_precision(
    images: Iterable[ImageRecord],
    iou_threshold: float = 0.5,
    num_thresholds: int = NUM_THRESHOLDS,
    box_offset: float = 0.0,
    scores_range: tuple[float, float] | None = None,
) -> float:
    """AP of a detector over a set of images, WIDER FACE style.

    Each image is ``(pred_xyxy (P, 4), scores (P,), gt_xyxy (G, 4), ignore)``
    with ``ignore`` a bool mask over the gt (True = neither TP nor FP when
    matched) or None.  Raw scores are min-max normalised over the whole set
    (or over ``scores_range`` when given: WIDER FACE normalises over every
    prediction file, including images that the protocol then skips).
    Recall is relative to the number of non-ignored gt over all images.
    """
    return _weighted_ap(_per_image_counts(images, iou_threshold, num_thresholds, box_offset, scores_range), None)


def _per_image_counts(
    images: Iterable[ImageRecord],
    iou_threshold: float,
    num_thresholds: int,
    box_offset: float,
    scores_range: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image (rows): proposals and true positives at each threshold (columns), and its countable faces."""
    records = [_as_record(image) for image in images]
    lo, hi = scores_range if scores_range is not None else score_range(r[1] for r in records)
    thresholds = pr_thresholds(num_thresholds)
    proposals = np.zeros((len(records), num_thresholds), dtype=np.int64)
    tp = np.zeros((len(records), num_thresholds), dtype=np.int64)
    faces = np.zeros(len(records), dtype=np.int64)
    for row, (boxes, scores, gt, ignore) in enumerate(records):
        faces[row] = np.count_nonzero(~ignore)
        if boxes.shape[0] == 0:
            continue
        proposals[row], tp[row] = image_pr_counts(
            boxes, normalise_scores(scores, lo, hi), gt, ignore, thresholds, iou_threshold, box_offset
        )
    return proposals, tp, faces


@dataclass(frozen=True)
class Interval:
    """A metric on a set of images and its percentile bootstrap interval over those images."""

    value: float
    low: float
    high: float
    confidence: float
    resamples: int


def average_precision_interval(
    images: Iterable[ImageRecord],
    iou_threshold: float = 0.5,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    num_thresholds: int = NUM_THRESHOLDS,
) -> Interval:
    """:func:`average_precision` with a percentile bootstrap interval: images are drawn with replacement.

    Each image's counts at every threshold are computed once, with the scores
    normalised over the whole set, so a resample is a weighted sum of rows: a
    thousand resamples of a few hundred images take well under a second.
    Seeded, so the same images always give the same interval.
    """
    counts = _per_image_counts(images, iou_threshold, num_thresholds, 0.0, None)
    return _bootstrap(len(counts[2]), lambda weights: _weighted_ap(counts, weights), confidence, resamples, seed)


def average_precision_difference_interval(
    first: Sequence[ImageRecord],
    second: Sequence[ImageRecord],
    iou_threshold: float = 0.5,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    num_thresholds: int = NUM_THRESHOLDS,
) -> Interval:
    """AP(first) - AP(second) for two detectors' results on the same images, with a paired bootstrap interval.

    Both are scored on each resample of the images, so what the images have in
    common (an easy or a hard set) cancels: the interval of the difference is
    much narrower than the two APs' own intervals suggest, and it is the one
    that says whether a drop is real.
    """
    if len(first) != len(second):
        raise ValueError(f"the two result sets must cover the same images, got {len(first)} and {len(second)}")
    a = _per_image_counts(first, iou_threshold, num_thresholds, 0.0, None)
    b = _per_image_counts(second, iou_threshold, num_thresholds, 0.0, None)
    if not np.array_equal(a[2], b[2]):
        raise ValueError("the two result sets must cover the same images (their face counts differ)")
    return _bootstrap(len(a[2]), lambda weights: _weighted_ap(a, weights) - _weighted_ap(b, weights),
                      confidence, resamples, seed)


def _weighted_ap(counts: tuple[np.ndarray, np.ndarray, np.ndarray], weights: np.ndarray | None) -> float:
    """AP from per-image counts, each image counted ``weights`` times (once each when None)."""
    proposals, tp, faces = counts
    if weights is None:
        return _ap_from_counts(proposals.sum(axis=0), tp.sum(axis=0), int(faces.sum()))
    return _ap_from_counts(weights @ proposals, weights @ tp, int(weights @ faces))


def _bootstrap(count: int, statistic: Callable[[np.ndarray | None], float], confidence: float, resamples: int,
               seed: int) -> Interval:
    """``statistic`` on all ``count`` images, and its percentile interval over seeded resamples of them."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    value = statistic(None)
    if count == 0:
        return Interval(value, value, value, confidence, resamples)
    generator = np.random.default_rng(seed)
    samples = np.empty(resamples)
    for index in range(resamples):
        samples[index] = statistic(np.bincount(generator.integers(0, count, count), minlength=count))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(value, float(low), float(high), confidence, resamples)


def average_precision_all_points(
    images: Iterable[ImageRecord],
    iou_threshold: float = 0.5,
    box_offset: float = 0.0,
) -> float:
    """AP of a detector over a set of images, VOC style: every distinct score is a threshold.

    Images are given as for :func:`average_precision`, but the raw scores are
    used as they are (no normalisation, no fixed grid of thresholds): the
    predictions of all images form one ranked list, and the precision-recall
    curve has one point per distinct score (tied predictions enter together),
    under which :func:`voc_ap` takes the all-point area.  Matching is the same
    greedy one (a second prediction on a recalled face is a false positive).
    """
    ranked_scores, proposals, recalls = [np.zeros(0)], [np.zeros(0, dtype=bool)], [np.zeros(0, dtype=bool)]
    num_faces = 0
    for boxes, scores, gt, ignore in (_as_record(image) for image in images):
        num_faces += int(np.count_nonzero(~ignore))
        ranked, is_proposal, first_recall = _ranked_flags(boxes, scores, gt, ignore, iou_threshold, box_offset)
        ranked_scores.append(ranked)
        proposals.append(is_proposal)
        recalls.append(first_recall)
    scores = np.concatenate(ranked_scores)
    # Stable, so that within an image the matching order above is kept.
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    cum_proposals = np.cumsum(np.concatenate(proposals)[order], dtype=np.int64)
    cum_tp = np.cumsum(np.concatenate(recalls)[order], dtype=np.int64)
    # One point per threshold: the last prediction of each run of equal scores, where all of them are in.
    last = np.flatnonzero(np.append(scores[1:] != scores[:-1], scores.size > 0))
    return _ap_from_counts(cum_proposals[last], cum_tp[last], num_faces)


def _as_record(image: ImageRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    boxes, scores, gt, ignore = image
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
    return boxes, scores, gt, _ignore_mask(ignore, gt.shape[0])


def _ap_from_counts(proposals: np.ndarray, tp: np.ndarray, num_faces: int) -> float:
    if num_faces == 0:
        return 0.0
    # At the highest thresholds there may be no proposal at all; the
    # reference divides 0/0 there, but those points have recall 0 and never
    # weigh in the AP, so precision 0 gives the same number without NaNs.
    precision = np.divide(tp, proposals, out=np.zeros(tp.shape, dtype=np.float64), where=proposals > 0)
    recall = tp / num_faces
    return voc_ap(recall, precision)


# --------------------------------------------------------------------------
# WIDER FACE files
# --------------------------------------------------------------------------


def format_prediction_file(image: str, boxes_xyxy: np.ndarray, scores: np.ndarray) -> str:
    """The standard ``<image>.txt`` text: name, count, then ``x y w h score`` by decreasing score."""
    order = np.argsort(-scores, kind="stable")
    lines = [Path(image).stem, str(len(order))]
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in boxes_xyxy[i])
        lines.append(f"{x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f} {float(scores[i]):.6f}")
    return "\n".join(lines) + "\n"


def read_prediction_file(path: str | Path) -> tuple[str, np.ndarray]:
    """Parse one ``<image>.txt``: image name, box count, then ``x y w h score`` lines.

    Returns ``(image name without extension, (K, 5) float64)``.  Any deviation
    raises ``ValueError`` naming the file and the 1-based line, because a
    silently skipped box would change the AP without anyone noticing.
    """
    path = Path(path)
    lines = read_text_lines(path, WiderFaceInputError)
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    if len(lines) < 2:
        raise WiderFaceInputError(f"{path}: line {len(lines) + 1}: expected image name and box count")

    name = _image_name(lines[0])
    if name != path.stem:
        raise WiderFaceInputError(f"{path}: line 1: image name {lines[0].strip()!r} does not match the file name")
    try:
        count = int(lines[1].strip())
    except ValueError:
        raise WiderFaceInputError(f"{path}: line 2: box count {lines[1].strip()!r} is not an integer") from None
    box_lines = lines[2:]
    if count != len(box_lines):
        raise WiderFaceInputError(f"{path}: line 2: box count {count} but {len(box_lines)} box lines follow")

    boxes = np.empty((count, 5), dtype=np.float64)
    for i, line in enumerate(box_lines):
        boxes[i] = _parse_box(line, path, lineno=i + 3)
    return name, boxes


def _image_name(line: str) -> str:
    # Writers differ: bare name, name.jpg, or event/name.jpg.
    base = line.strip().replace("\\", "/").rsplit("/", 1)[-1]
    return base[:-4] if base.lower().endswith(".jpg") else base


def _parse_box(line: str, path: Path, lineno: int) -> list[float]:
    fields = line.split()
    if len(fields) != 5:
        raise WiderFaceInputError(f"{path}: line {lineno}: expected 5 values 'x y w h score', got {len(fields)}")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise WiderFaceInputError(f"{path}: line {lineno}: non-numeric value in {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise WiderFaceInputError(f"{path}: line {lineno}: non-finite value in {line.strip()!r}")
    if values[2] < 0 or values[3] < 0:
        raise WiderFaceInputError(
            f"{path}: line {lineno}: negative width or height (w={values[2]:g}, h={values[3]:g}) in {line.strip()!r}"
        )
    return values


def _visible(folder: Path) -> list[Path]:
    # Hidden entries (.DS_Store, .ipynb_checkpoints, ...) are not predictions.
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def read_predictions(pred_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read ``pred_dir/<event>/<image>.txt`` into ``{event: {image: (K, 5) x, y, w, h, score}}``.

    The layout is strict, because a file the reader does not look at would
    silently count as "no detections": a ``.txt`` directly in ``pred_dir``
    or a folder inside an event folder is refused, and so is a tree with no
    prediction file at all.  Other files (and hidden ones) are ignored.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction directory not found: {pred_dir}")
    top = _visible(pred_dir)
    stray = [p for p in top if p.suffix == ".txt" and not p.is_dir()]
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise WiderFaceInputError(
            f"{stray[0]}: prediction file directly in {pred_dir}{more}; the layout is {_LAYOUT}, "
            "one folder per event"
        )
    predictions: dict[str, dict[str, np.ndarray]] = {}
    nested: list[Path] = []
    for event_dir in (p for p in top if p.is_dir()):
        event: dict[str, np.ndarray] = {}
        for entry in _visible(event_dir):
            if entry.is_dir():
                nested.append(entry)
            elif entry.suffix == ".txt":
                name, boxes = read_prediction_file(entry)
                event[name] = boxes
        predictions[event_dir.name] = event
    count = sum(len(images) for images in predictions.values())
    if nested and count:
        raise WiderFaceInputError(f"{nested[0]}: folder inside event folder {nested[0].parent.name}; "
                                  f"the layout is {_LAYOUT}")
    if nested:
        raise WiderFaceInputError(
            f"{pred_dir}: no prediction files at {_LAYOUT}, but folders one level deeper (e.g. {nested[0]}); "
            f"is {nested[0].parent} the prediction folder?"
        )
    if not count:
        others = sum(1 for p in top if not p.is_dir())
        raise WiderFaceInputError(
            f"{pred_dir}: no prediction files found (expected {_LAYOUT}; found {len(predictions)} folders "
            f"without .txt files and {others} other files)"
        )
    return predictions


@dataclass(frozen=True)
class WiderFaceGroundTruth:
    """WIDER FACE validation ground truth, in the official image order.

    ``boxes[event][image]`` is (G, 4) float64 ``x, y, w, h``;
    ``keep[setting][event][image]`` are the 0-based indices of the faces that
    count in that setting (the others are ignored).
    """

    boxes: dict[str, dict[str, np.ndarray]]
    keep: dict[str, dict[str, dict[str, np.ndarray]]]

    def ignore_mask(self, setting: str, event: str, image: str) -> np.ndarray:
        """Bool (G,): True for faces ignored in ``setting``."""
        mask = np.ones(self.boxes[event][image].shape[0], dtype=bool)
        mask[self.keep[setting][event][image]] = False
        return mask

    def images(self) -> Iterator[tuple[str, str]]:
        """(event, image) pairs in the official order."""
        for event, images in self.boxes.items():
            for image in images:
                yield event, image


def load_ground_truth(gt_dir: str | Path) -> WiderFaceGroundTruth:
    """Load ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat`` from ``gt_dir``.

    Every file is checked as it is read: a missing file is a
    FileNotFoundError, an unreadable one, a missing variable, lists of
    different lengths, boxes that are not N×4, face indices outside an
    image's faces, or a ground truth without any face a WiderFaceInputError
    naming the file and the variable.
    """
    gt_dir = Path(gt_dir)
    main_path = gt_dir / _GT_FILE
    main = _load_mat(main_path, ("event_list", "file_list", "face_bbx_list"))
    events = [_mat_str(e, main_path, "event_list", i) for i, e in enumerate(_cells(main["event_list"], main_path, "event_list"))]
    duplicates = sorted({e for e in events if events.count(e) > 1})
    if duplicates:
        raise WiderFaceInputError(f"{main_path}: event_list: event {duplicates[0]!r} is listed twice")
    file_lists = _per_event(main, "file_list", events, main_path)
    bbx_lists = _per_event(main, "face_bbx_list", events, main_path)
    boxes: dict[str, dict[str, np.ndarray]] = {}
    for event, file_cell, bbx_cell in zip(events, file_lists, bbx_lists):
        names = [_mat_str(f, main_path, f"file_list of {event}", i)
                 for i, f in enumerate(_cells(file_cell, main_path, f"file_list of {event}"))]
        cells = _cells(bbx_cell, main_path, f"face_bbx_list of {event}", len(names))
        boxes[event] = {name: _boxes(b, main_path, event, name) for name, b in zip(names, cells)}
    if not any(b.shape[0] for images in boxes.values() for b in images.values()):
        raise WiderFaceInputError(f"{main_path}: face_bbx_list holds no face at all")
    keep = {}
    for setting in WIDER_SETTINGS:
        path = gt_dir / _SETTING_FILE.format(setting)
        gt_list = _per_event(_load_mat(path, ("gt_list",)), "gt_list", events, path)
        keep[setting] = {
            event: {
                name: _keep_indices(k, path, event, name, boxes[event][name].shape[0])
                for name, k in zip(boxes[event], _cells(cell, path, f"gt_list of {event}", len(boxes[event])))
            }
            for event, cell in zip(events, gt_list)
        }
        if not any(k.size for images in keep[setting].values() for k in images.values()):
            raise WiderFaceInputError(f"{path}: gt_list keeps no face in the {setting} setting")
    return WiderFaceGroundTruth(boxes=boxes, keep=keep)


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"WIDER FACE ground-truth file not found: {path}")
    try:
        content = scipy.io.loadmat(str(path))
    except NotImplementedError:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise WiderFaceInputError(f"{path}: MATLAB v7.3 (HDF5) .mat files are not supported; save with -v7") from None
    except Exception as err:  # noqa: BLE001 - scipy reports a corrupt file with many types (MatReadError, OSError,
        # ValueError, IndexError, zlib.error, ...); each means the same thing here
        reason = str(err).strip() or type(err).__name__
        raise WiderFaceInputError(f"{path}: not a readable MATLAB .mat file ({reason})") from None
    missing = [key for key in keys if key not in content]
    if missing:
        present = sorted(k for k in content if not k.startswith("__"))
        has = f"it has {', '.join(present)}" if present else "it holds no variables"
        raise WiderFaceInputError(f"{path}: no variable {missing[0]!r} ({has}); is this the WIDER FACE {path.name}?")
    return content


def _cells(cell: object, path: Path, what: str, expected: int | None = None) -> list:
    # A MATLAB cell loads as an (N, 1) object array of per-item arrays.
    if not isinstance(cell, np.ndarray) or cell.dtype != object:
        raise WiderFaceInputError(f"{path}: {what}: expected a cell array, got {_describe(cell)}")
    items = list(cell.ravel())
    if expected is not None and len(items) != expected:
        raise WiderFaceInputError(f"{path}: {what}: {len(items)} entries for {expected} images")
    return items


def _per_event(content: dict, key: str, events: list[str], path: Path) -> list:
    cells = _cells(content[key], path, key)
    if len(cells) != len(events):
        raise WiderFaceInputError(f"{path}: {key} has {len(cells)} events but event_list has {len(events)}")
    return cells


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} with shape {value.shape}"
    return type(value).__name__


def _mat_str(value: object, path: Path, what: str, index: int) -> str:
    while isinstance(value, np.ndarray):
        if value.size == 0:
            raise WiderFaceInputError(f"{path}: {what}: entry {index + 1} is empty, expected a name")
        value = value.ravel()[0]
    if not isinstance(value, str):
        raise WiderFaceInputError(f"{path}: {what}: entry {index + 1} is {_describe(value)}, expected a name")
    return str(value)  # numpy's str_ is a str subclass; keep names plain


def _boxes(value: object, path: Path, event: str, image: str) -> np.ndarray:
    try:
        boxes = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        boxes = None
    if boxes is None or boxes.size % 4 or (boxes.size and boxes.shape[-1] != 4):
        raise WiderFaceInputError(
            f"{path}: face_bbx_list of {event}/{image}: expected N×4 boxes, got {_describe(value)}"
        )
    boxes = boxes.reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise WiderFaceInputError(f"{path}: face_bbx_list of {event}/{image}: non-finite box values")
    return boxes


def _keep_indices(value: object, path: Path, event: str, image: str, faces: int) -> np.ndarray:
    try:
        indices = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise WiderFaceInputError(
            f"{path}: gt_list of {event}/{image}: expected face indices, got {_describe(value)}"
        ) from None
    # 1-based MATLAB indices; the arrays come as uint8/uint16.
    if indices.size and (not np.all(indices == np.round(indices)) or indices.min() < 1 or indices.max() > faces):
        raise WiderFaceInputError(
            f"{path}: gt_list of {event}/{image}: face indices must be whole numbers 1..{faces}, "
            f"got {indices.min():g}..{indices.max():g}"
        )
    return indices.astype(np.int64) - 1


def _widerface_images(
    gt: WiderFaceGroundTruth,
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    setting: str,
) -> Iterator[ImageRecord]:
    """The images of one setting as core records.

    Protocol details: images without any gt face are left out entirely (their
    predictions are not counted as false positives), as the reference does.
    Images whose faces are all ignored in this setting are still evaluated:
    their unmatched predictions are false positives (skipping them instead
    raises the easy AP by 1.2e-2 and no longer matches the reference).
    A missing prediction file means no detections.
    """
    empty = np.zeros((0, 5))
    for event, image in gt.images():
        gt_xywh = gt.boxes[event][image]
        if gt_xywh.shape[0] == 0:
            continue
        pred = predictions.get(event, {}).get(image, empty)
        yield (
            xywh_to_xyxy(pred),
            pred[:, 4],
            xywh_to_xyxy(gt_xywh),
            gt.ignore_mask(setting, event, image),
        )


def evaluate_widerface_predictions(
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    gt: WiderFaceGroundTruth,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """Easy/medium/hard AP of in-memory predictions (``{event: {image: (K, 5) xywh+score}}``)."""
    # Normalisation spans every prediction given, also for images that the
    # protocol skips, exactly like the reference.
    lo_hi = score_range(p[:, 4] for images in predictions.values() for p in images.values())
    return {
        setting: average_precision(
            _widerface_images(gt, predictions, setting),
            iou_threshold=iou_threshold,
            box_offset=WIDER_BOX_OFFSET,
            scores_range=lo_hi,
        )
        for setting in WIDER_SETTINGS
    }


def check_predictions_known(
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    gt: WiderFaceGroundTruth,
    pred_dir: str | Path,
    gt_source: str | Path = _GT_FILE,
) -> None:
    """Refuse prediction files for events or images that the ground truth does not list.

    The protocol would silently skip them, so a prediction set for another
    split (or with renamed files) would score 0 without a word.
    """
    pred_dir = Path(pred_dir)
    files = [(event, image) for event, images in predictions.items() for image in images]
    unknown = [(e, i) for e, i in files if i not in gt.boxes.get(e, {})]
    if not unknown:
        return
    event, image = unknown[0]
    if len(unknown) == len(files):
        where = (f"e.g. event folder {event!r} is not in it" if event not in gt.boxes
                 else f"e.g. {event}/{image}.txt is not one of its images")
        raise WiderFaceInputError(
            f"{pred_dir}: none of the {len(files)} prediction files is for an image of the ground truth "
            f"{gt_source} ({where})"
        )
    more = f"; {len(unknown) - 1} more prediction files are for unknown images" if len(unknown) > 1 else ""
    if event not in gt.boxes:
        close = difflib.get_close_matches(event, list(gt.boxes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise WiderFaceInputError(
            f"{pred_dir / event}: event folder {event!r} is not in the ground truth {gt_source}{hint}{more}"
        )
    raise WiderFaceInputError(
        f"{pred_dir / event / (image + '.txt')}: image {image!r} is not in event {event!r} of the ground truth "
        f"{gt_source}{more}"
    )


def evaluate_widerface(pred_dir: str | Path, gt_dir: str | Path, iou_threshold: float = 0.5) -> dict[str, float]:
    """Official WIDER FACE validation AP: ``{"easy": ..., "medium": ..., "hard": ...}``.

    ``pred_dir`` holds the event folders (e.g. ``.../pred0``); ``gt_dir`` the
    four ``.mat`` files.  Bad files raise WiderFaceInputError (see the module
    docstring); prediction files for images the ground truth does not list are
    refused (:func:`check_predictions_known`).
    """
    predictions = read_predictions(pred_dir)
    gt = load_ground_truth(gt_dir)
    check_predictions_known(predictions, gt, pred_dir, Path(gt_dir) / _GT_FILE)
    return evaluate_widerface_predictions(predictions, gt, iou_threshold)
