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
:func:`evaluate_widerface` only adapts the WIDER FACE files to that core.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

__all__ = [
    "NUM_THRESHOLDS",
    "WIDER_BOX_OFFSET",
    "WIDER_SETTINGS",
    "WiderFaceGroundTruth",
    "average_precision",
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

    # Stable sort: ties keep their input order, as the reference (which
    # relies on files already sorted by score) does.
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    is_proposal, first_recall = _match_sorted(boxes, gt, ignore, iou_threshold, box_offset)

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
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


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
    records = [_as_record(image) for image in images]
    lo, hi = scores_range if scores_range is not None else score_range(r[1] for r in records)
    thresholds = pr_thresholds(num_thresholds)

    proposals = np.zeros(num_thresholds, dtype=np.int64)
    tp = np.zeros(num_thresholds, dtype=np.int64)
    num_faces = 0
    for boxes, scores, gt, ignore in records:
        num_faces += int(np.count_nonzero(~ignore))
        if boxes.shape[0] == 0:
            continue
        p, t = image_pr_counts(
            boxes, normalise_scores(scores, lo, hi), gt, ignore, thresholds, iou_threshold, box_offset
        )
        proposals += p
        tp += t
    return _ap_from_counts(proposals, tp, num_faces)


def _as_record(image: ImageRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    boxes, scores, gt, ignore = image
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    return (
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(scores, dtype=np.float64).reshape(-1),
        gt,
        _ignore_mask(ignore, gt.shape[0]),
    )


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
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    if len(lines) < 2:
        raise ValueError(f"{path}: line {len(lines) + 1}: expected image name and box count")

    name = _image_name(lines[0])
    if name != path.stem:
        raise ValueError(f"{path}: line 1: image name {lines[0].strip()!r} does not match the file name")
    try:
        count = int(lines[1].strip())
    except ValueError:
        raise ValueError(f"{path}: line 2: box count {lines[1].strip()!r} is not an integer") from None
    box_lines = lines[2:]
    if count != len(box_lines):
        raise ValueError(f"{path}: line 2: box count {count} but {len(box_lines)} box lines follow")

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
        raise ValueError(f"{path}: line {lineno}: expected 5 values 'x y w h score', got {len(fields)}")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise ValueError(f"{path}: line {lineno}: non-numeric value in {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{path}: line {lineno}: non-finite value in {line.strip()!r}")
    return values


def read_predictions(pred_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read ``pred_dir/<event>/<image>.txt`` into ``{event: {image: (K, 5) x, y, w, h, score}}``."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction directory not found: {pred_dir}")
    predictions: dict[str, dict[str, np.ndarray]] = {}
    for event_dir in sorted(p for p in pred_dir.iterdir() if p.is_dir()):
        event: dict[str, np.ndarray] = {}
        for txt in sorted(event_dir.glob("*.txt")):
            name, boxes = read_prediction_file(txt)
            event[name] = boxes
        predictions[event_dir.name] = event
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
    """Load ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat`` from ``gt_dir``."""
    gt_dir = Path(gt_dir)
    main = _load_mat(gt_dir / _GT_FILE)
    events = [_mat_str(e) for e in main["event_list"].ravel()]
    files = [[_mat_str(f) for f in fl.ravel()] for fl in main["file_list"].ravel()]
    boxes = {
        event: {
            name: np.asarray(b, dtype=np.float64).reshape(-1, 4)
            for name, b in zip(names, _cells(cell))
        }
        for event, names, cell in zip(events, files, main["face_bbx_list"].ravel())
    }
    keep = {}
    for setting in WIDER_SETTINGS:
        gt_list = _load_mat(gt_dir / _SETTING_FILE.format(setting))["gt_list"].ravel()
        keep[setting] = {
            event: {
                # 1-based MATLAB indices; the arrays come as uint8/uint16.
                name: np.asarray(k, dtype=np.int64).reshape(-1) - 1
                for name, k in zip(names, _cells(cell))
            }
            for event, names, cell in zip(events, files, gt_list)
        }
    return WiderFaceGroundTruth(boxes=boxes, keep=keep)


def _load_mat(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"WIDER FACE ground-truth file not found: {path}")
    return scipy.io.loadmat(str(path))


def _cells(cell: np.ndarray) -> list[np.ndarray]:
    # A per-event MATLAB cell loads as an (N, 1) object array of per-image arrays.
    return list(cell.ravel())


def _mat_str(value: np.ndarray) -> str:
    while isinstance(value, np.ndarray):
        value = value.ravel()[0]
    return str(value)


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


def evaluate_widerface(pred_dir: str | Path, gt_dir: str | Path, iou_threshold: float = 0.5) -> dict[str, float]:
    """Official WIDER FACE validation AP: ``{"easy": ..., "medium": ..., "hard": ...}``.

    ``pred_dir`` holds the event folders (e.g. ``.../pred0``); ``gt_dir`` the
    four ``.mat`` files.
    """
    return evaluate_widerface_predictions(read_predictions(pred_dir), load_ground_truth(gt_dir), iou_threshold)
