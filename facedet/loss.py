"""Training losses: RetinaFace-style multibox loss and detector distillation.

Conventions shared with the model and `facedet.boxes`:

* predictions are `(bbox N×P×4, conf N×P×C raw logits, landmarks N×P×10)`,
  class 1 = face, class 0 = background;
* priors are P×4 `(cx, cy, w, h)` and ground truth is normalised corners;
* every loss is computed in float32 with autocast switched off, so mixed
  precision training only changes the network, never the loss arithmetic.

Images with no positive prior (no faces, or faces too small to reach any
prior) still mine `min_negatives` hard negatives, so background-only images
keep teaching the classifier what is *not* a face. All normalisers are
clamped to at least 1, so a batch without a single positive yields finite
losses (box and landmark terms are exactly zero, still attached to the graph).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, box_iou

from .boxes import VARIANCES, encode_boxes, encode_landmarks

__all__ = [
    "DistillationLoss",
    "MultiBoxLoss",
    "hard_negative_mask",
    "match_priors",
]

# RetinaFace only forces a gt's best prior when it overlaps it reasonably:
# forcing a prior onto a face it barely touches teaches a regression the
# prior cannot reach and a "face" label for mostly background pixels.
FORCE_MATCH_MIN_IOU = 0.2

Outputs = Sequence[torch.Tensor]


# --------------------------------------------------------------------------- matching


def match_priors(
    gt_boxes_xyxy: torch.Tensor,
    priors: torch.Tensor,
    iou_threshold: float = 0.35,
    force_min_iou: float = FORCE_MATCH_MIN_IOU,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each prior a ground-truth index, or -1 for background.

    Returns `(matched_index, best_prior_per_gt)`: a P long tensor and a G
    long tensor holding each gt's highest-IoU prior (whether or not it was
    forced). A prior takes the gt it overlaps most and is background when
    that IoU is below `iou_threshold`. On top of that, each gt whose best
    IoU is at least `force_min_iou` claims its best prior even below the
    threshold, so every reasonably sized face gets at least one positive.
    When several gts claim the same prior, the one overlapping it most wins.
    """
    num_priors = priors.shape[0]
    device = gt_boxes_xyxy.device
    if gt_boxes_xyxy.shape[0] == 0:
        background = torch.full((num_priors,), -1, dtype=torch.long, device=device)
        return background, torch.empty(0, dtype=torch.long, device=device)

    # Matching is bookkeeping, not learning: float32 regardless of autocast.
    priors_xyxy = box_convert(
        priors.to(device=device, dtype=torch.float32), in_fmt="cxcywh", out_fmt="xyxy"
    )
    iou = box_iou(gt_boxes_xyxy.float(), priors_xyxy)  # G×P

    best_iou_per_prior, best_gt_per_prior = iou.max(dim=0)
    matched = torch.where(best_iou_per_prior >= iou_threshold, best_gt_per_prior, -1)

    best_iou_per_gt, best_prior_per_gt = iou.max(dim=1)
    forced_gt, is_forced = _forced_assignment(
        iou, best_prior_per_gt, best_iou_per_gt >= force_min_iou
    )
    matched = torch.where(is_forced, forced_gt, matched)
    return matched, best_prior_per_gt


def _forced_assignment(
    iou: torch.Tensor, best_prior_per_gt: torch.Tensor, may_force: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # A G×P claim matrix instead of an indexed write: duplicate indices in a
    # scatter have no defined winner on CUDA, argmax over claims does.
    num_gt = iou.shape[0]
    claims = torch.zeros_like(iou, dtype=torch.bool)
    claims[torch.arange(num_gt, device=iou.device), best_prior_per_gt] = may_force
    claimed_iou = torch.where(claims, iou, torch.full_like(iou, -1.0))
    forced_gt = claimed_iou.argmax(dim=0)
    return forced_gt, claims.any(dim=0)


# --------------------------------------------------------------------------- hard negatives


def hard_negative_mask(
    per_prior_loss: torch.Tensor,
    positive: torch.Tensor,
    neg_pos_ratio: int,
    min_negatives: int = 0,
) -> torch.Tensor:
    """N×P mask of the hardest negatives: `neg_pos_ratio`× positives per image.

    The count is clamped below by `min_negatives` (so positive-free images
    still contribute) and above by P-1; positives are never selected. Ties
    are broken by prior index, so the selection is deterministic.
    """
    num_priors = per_prior_loss.shape[1]
    num_neg = (positive.sum(dim=1) * neg_pos_ratio).clamp(min=min_negatives, max=num_priors - 1)
    # -inf rather than RetinaFace's 0: an easy negative with zero loss must
    # not tie with (and displace) the excluded positives.
    ranking_loss = per_prior_loss.detach().masked_fill(positive, float("-inf"))
    order = ranking_loss.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    return (rank < num_neg.unsqueeze(1)) & ~positive


# --------------------------------------------------------------------------- targets


def _image_targets(
    target: Mapping[str, torch.Tensor],
    priors: torch.Tensor,
    iou_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positive P, box targets P×4, landmark targets P×10, landmark mask P)."""
    device = priors.device
    boxes = target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
    landmarks = target["landmarks"].to(device=device, dtype=torch.float32).reshape(-1, 10)
    landmark_valid = target["landmark_valid"].to(device=device, dtype=torch.bool).reshape(-1)

    matched, _ = match_priors(boxes, priors, iou_threshold)
    positive = matched >= 0
    box_t = priors.new_zeros(priors.shape[0], 4)
    landmark_t = priors.new_zeros(priors.shape[0], 10)
    landmark_mask = torch.zeros_like(positive)

    # Encode only positives: background rows would pair priors with an
    # arbitrary (possibly degenerate) gt and produce inf/NaN for nothing.
    gt_index = matched[positive]
    pos_priors = priors[positive]
    box_t[positive] = encode_boxes(boxes[gt_index], pos_priors, VARIANCES)
    valid = landmark_valid[gt_index]
    # Unannotated landmarks are often -1 or NaN; zero them so they cannot
    # leak into the loss even through masked arithmetic.
    matched_landmarks = landmarks[gt_index]
    clean = torch.where(valid.unsqueeze(1), matched_landmarks, torch.zeros_like(matched_landmarks))
    landmark_t[positive] = encode_landmarks(clean, pos_priors, VARIANCES)
    landmark_mask[positive] = valid
    return positive, box_t, landmark_t, landmark_mask


def _batch_targets(
    targets: Sequence[Mapping[str, torch.Tensor]],
    priors: torch.Tensor,
    iou_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    per_image = [_image_targets(t, priors, iou_threshold) for t in targets]
    return tuple(torch.stack(parts) for parts in zip(*per_image))  # type: ignore[return-value]


# --------------------------------------------------------------------------- helpers


def _float32_region(device: torch.device) -> AbstractContextManager[None]:
    # Losses (exp/log in CE, sums over many priors) are where half precision
    # hurts most, so autocast is switched off and inputs are upcast.
    return torch.autocast(device_type=device.type, enabled=False)


def _masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 summed over masked rows, divided by their count (at least 1).

    An empty mask sums an empty tensor: exactly zero, yet still attached to
    `pred`, so backward works without special cases.
    """
    total = F.smooth_l1_loss(pred[mask], target[mask], reduction="sum")
    return total / mask.sum().clamp(min=1)


def _unpack(outputs: Outputs, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(outputs) != 3:
        raise ValueError(f"{name} must be (bbox, conf, landmarks), got {len(outputs)} tensors")
    bbox, conf, landmarks = (t.float() for t in outputs)
    return bbox, conf, landmarks


def _check_same_shapes(student: Outputs, teacher: Outputs) -> None:
    for name, s, t in zip(("bbox", "conf", "landmarks"), student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"student {name} {tuple(s.shape)} != teacher {tuple(t.shape)}")


# --------------------------------------------------------------------------- multibox


class MultiBoxLoss(nn.Module):
    """RetinaFace training loss: box + hard-negative-mined class + landmarks.

    `forward` returns `{"loss", "box", "class", "landmark"}` with
    `loss = box_weight·box + class + landmark_weight·landmark`. All three
    terms are normalised by positives over the whole batch (landmarks by
    positives with annotated landmarks), clamped to at least 1.

    `min_negatives` is the least number of hard negatives mined per image;
    it only matters for images with (almost) no positives. The default
    treats a face-free image like an image with a single face, so it still
    penalises its most face-like background priors.
    """

    def __init__(
        self,
        num_classes: int = 2,
        iou_threshold: float = 0.35,
        neg_pos_ratio: int = 3,
        box_weight: float = 2.0,
        landmark_weight: float = 1.0,
        min_negatives: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"need at least background and face classes, got {num_classes}")
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.box_weight = box_weight
        self.landmark_weight = landmark_weight
        self.min_negatives = min_negatives

    def forward(
        self,
        predictions: Outputs,
        targets: Sequence[Mapping[str, torch.Tensor]],
        priors: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        bbox, conf, landmarks = _unpack(predictions, "predictions")
        self._check_shapes(bbox, conf, landmarks, targets, priors)
        with _float32_region(bbox.device):
            priors = priors.to(device=bbox.device, dtype=torch.float32)
            positive, box_t, landmark_t, landmark_mask = _batch_targets(
                targets, priors, self.iou_threshold
            )
            box = _masked_smooth_l1(bbox, box_t, positive)
            landmark = _masked_smooth_l1(landmarks, landmark_t, landmark_mask)
            cls = self._class_loss(conf, positive)
            total = self.box_weight * box + cls + self.landmark_weight * landmark
        return {"loss": total, "box": box, "class": cls, "landmark": landmark}

    def _class_loss(self, conf: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        labels = positive.long()
        with torch.no_grad():
            ranking = F.cross_entropy(
                conf.reshape(-1, self.num_classes), labels.reshape(-1), reduction="none"
            ).view_as(labels)
        negative = hard_negative_mask(ranking, positive, self.neg_pos_ratio, self.min_negatives)
        selected = positive | negative
        total = F.cross_entropy(conf[selected], labels[selected], reduction="sum")
        return total / positive.sum().clamp(min=1)

    def _check_shapes(
        self,
        bbox: torch.Tensor,
        conf: torch.Tensor,
        landmarks: torch.Tensor,
        targets: Sequence[Mapping[str, torch.Tensor]],
        priors: torch.Tensor,
    ) -> None:
        n, p = conf.shape[:2]
        expected = {"bbox": (n, p, 4), "conf": (n, p, self.num_classes), "landmarks": (n, p, 10)}
        actual = {"bbox": bbox.shape, "conf": conf.shape, "landmarks": landmarks.shape}
        for name, shape in expected.items():
            if tuple(actual[name]) != shape:
                raise ValueError(f"{name} has shape {tuple(actual[name])}, expected {shape}")
        if priors.shape != (p, 4):
            raise ValueError(f"priors have shape {tuple(priors.shape)}, expected {(p, 4)}")
        if len(targets) != n:
            raise ValueError(f"got {len(targets)} targets for a batch of {n} images")


# --------------------------------------------------------------------------- distillation


class DistillationLoss(nn.Module):
    """Teacher → student loss on raw detector outputs.

    * class: KL(teacher ‖ student) between softmax(logits / T), summed over
      classes, scaled by T² (Hinton et al.) so its gradient magnitude does
      not shrink as T grows, and with ``class_normaliser="priors"`` averaged
      over all priors; with ``"faces"`` summed over the priors and divided by
      the number the teacher calls a face (softmax at T=1, class 1 ≥
      `confidence`; at least 1).  Faces hold about one prior in a thousand:
      the mean drowns them in easy background, which is right beside a task
      loss that supervises them, and wrong when the teacher is the only
      signal (finetuning without labels), where the face count weighs the
      class term like the regression terms below (as the multibox loss
      normalises by its matched priors);
    * box / landmark: smooth-L1 between raw regressions, only on priors the
      teacher calls a face — regressions on background priors are untrained
      noise not worth copying — normalised by that count; zero when there is
      none.

    The teacher is detached here so callers cannot leak gradients into it.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        class_weight: float = 1.0,
        box_weight: float = 1.0,
        landmark_weight: float = 1.0,
        confidence: float = 0.5,
        class_normaliser: Literal["priors", "faces"] = "priors",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.class_normaliser = class_normaliser
        self.temperature = temperature
        self.class_weight = class_weight
        self.box_weight = box_weight
        self.landmark_weight = landmark_weight
        self.confidence = confidence

    def forward(
        self, student_outputs: Outputs, teacher_outputs: Outputs
    ) -> dict[str, torch.Tensor]:
        s_box, s_conf, s_landmarks = _unpack(student_outputs, "student_outputs")
        teacher = _unpack(teacher_outputs, "teacher_outputs")
        t_box, t_conf, t_landmarks = (t.detach().to(s_box.device) for t in teacher)
        _check_same_shapes((s_box, s_conf, s_landmarks), (t_box, t_conf, t_landmarks))

        with _float32_region(s_box.device):
            confident = t_conf.softmax(dim=-1)[..., 1] >= self.confidence
            cls = self._soft_class_loss(s_conf, t_conf, confident)
            box = _masked_smooth_l1(s_box, t_box, confident)
            landmark = _masked_smooth_l1(s_landmarks, t_landmarks, confident)
            total = (
                self.class_weight * cls + self.box_weight * box + self.landmark_weight * landmark
            )
        return {"loss": total, "class": cls, "box": box, "landmark": landmark}

    def _soft_class_loss(self, s_conf: torch.Tensor, t_conf: torch.Tensor, confident: torch.Tensor) -> torch.Tensor:
        temperature = self.temperature
        s_log = F.log_softmax(s_conf / temperature, dim=-1)
        t_log = F.log_softmax(t_conf / temperature, dim=-1)
        per_prior = F.kl_div(s_log, t_log, reduction="none", log_target=True).sum(dim=-1)
        if self.class_normaliser == "faces":
            return per_prior.sum() * temperature**2 / confident.sum().clamp(min=1)
        return per_prior.mean() * temperature**2
