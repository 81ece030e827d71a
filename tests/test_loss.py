"""Matching, multibox loss and distillation loss against hand-built cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facedet.boxes import encode_boxes, encode_landmarks
from facedet.loss import DistillationLoss, MultiBoxLoss, hard_negative_mask, match_priors
from facedet.priors import make_priors

# --------------------------------------------------------------------------- helpers


def _target(boxes: list[list[float]], valid: list[bool] | None = None) -> dict[str, torch.Tensor]:
    box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    # Landmarks: five points spread inside each box, so encodings are finite.
    frac = torch.tensor([0.3, 0.3, 0.7, 0.3, 0.5, 0.5, 0.35, 0.7, 0.65, 0.7])
    x1, y1, x2, y2 = box_t.unbind(-1)
    xs = x1[:, None] + frac[0::2] * (x2 - x1)[:, None]
    ys = y1[:, None] + frac[1::2] * (y2 - y1)[:, None]
    landmarks = torch.stack((xs, ys), dim=-1).reshape(-1, 10)
    valid_t = torch.tensor(valid if valid is not None else [True] * len(boxes), dtype=torch.bool)
    return {"boxes": box_t, "landmarks": landmarks, "landmark_valid": valid_t.reshape(-1)}


def _no_faces() -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros(0, 4),
        "landmarks": torch.zeros(0, 10),
        "landmark_valid": torch.zeros(0, dtype=torch.bool),
    }


def _perfect_predictions(
    targets: list[dict[str, torch.Tensor]], priors: torch.Tensor, margin: float = 20.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_priors = priors.shape[0]
    bbox = torch.zeros(len(targets), num_priors, 4)
    landmarks = torch.zeros(len(targets), num_priors, 10)
    conf = torch.tensor([margin, -margin]).repeat(len(targets), num_priors, 1)
    for i, target in enumerate(targets):
        matched, _ = match_priors(target["boxes"], priors)
        pos = matched >= 0
        bbox[i, pos] = encode_boxes(target["boxes"][matched[pos]], priors[pos])
        landmarks[i, pos] = encode_landmarks(target["landmarks"][matched[pos]], priors[pos])
        conf[i, pos] = torch.tensor([-margin, margin])
    return bbox, conf, landmarks


def _row_priors(count: int) -> torch.Tensor:
    # Touching, non-overlapping 0.1×0.1 cells along the top row: every IoU
    # between different cells is 0, so a gt equal to cell 0 matches only it.
    cx = torch.arange(count, dtype=torch.float32) * 0.1 + 0.05
    cy, size = torch.full_like(cx, 0.05), torch.full_like(cx, 0.1)
    return torch.stack((cx, cy, size, size), dim=1)


# --------------------------------------------------------------------------- matching

# Priors (cx, cy, w, h) → corners:
#   p0 (0.25, 0.25, 0.5, 0.5) → [0,    0,    0.5,  0.5 ]
#   p1 (0.50, 0.50, 0.5, 0.5) → [0.25, 0.25, 0.75, 0.75]
#   p2 (0.75, 0.75, 0.5, 0.5) → [0.5,  0.5,  1,    1   ]
# gt0 = [0, 0, 0.5, 0.5]:       p0: 1;  p1: 0.0625/(0.25+0.25-0.0625) = 1/7 ≈ 0.143;  p2: 0
# gt1 = [0.55, 0.55, 0.8, 0.8]: p0: 0;  p1: 0.04/(0.25+0.0625-0.04) ≈ 0.147;
#                               p2: 0.0625/0.25 = 0.25 (below 0.35, above 0.2 → forced)
HAND_PRIORS = torch.tensor(
    [[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]
)
HAND_GT = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.55, 0.55, 0.8, 0.8]])


def test_match_hand_case_threshold_and_forced_prior() -> None:
    matched, best_prior = match_priors(HAND_GT, HAND_PRIORS, iou_threshold=0.35)
    # p0 by threshold (IoU 1), p1 background (best 0.147), p2 forced to gt1 (0.25).
    assert matched.tolist() == [0, -1, 1]
    assert best_prior.tolist() == [0, 2]
    assert matched.dtype == torch.long


def test_match_forcing_disabled_leaves_gt1_unmatched() -> None:
    matched, _ = match_priors(HAND_GT, HAND_PRIORS, iou_threshold=0.35, force_min_iou=0.3)
    assert matched.tolist() == [0, -1, -1]


def test_match_low_threshold_admits_p1() -> None:
    # At 0.14, p1 passes by threshold and takes its best gt: gt1 (0.147 > 0.143).
    matched, _ = match_priors(HAND_GT, HAND_PRIORS, iou_threshold=0.14)
    assert matched.tolist() == [0, 1, 1]


def test_match_tiny_face_is_not_forced() -> None:
    # [0.9, 0.9, 0.95, 0.95] lies inside p2 only: IoU 0.0025/0.25 = 0.01 < 0.2.
    matched, best_prior = match_priors(torch.tensor([[0.9, 0.9, 0.95, 0.95]]), HAND_PRIORS)
    assert matched.tolist() == [-1, -1, -1]
    assert best_prior.tolist() == [2]


def test_match_shared_best_prior_goes_to_higher_iou() -> None:
    # Both gts have p2 as best prior: [0.5, 0.5, 0.9, 0.9] at 0.16/0.25 = 0.64 and
    # [0.55, 0.55, 0.8, 0.8] at 0.25. The higher IoU (gt 0) wins, not the later gt.
    gt = torch.tensor([[0.5, 0.5, 0.9, 0.9], [0.55, 0.55, 0.8, 0.8]])
    matched, best_prior = match_priors(gt, HAND_PRIORS)
    assert best_prior.tolist() == [2, 2]
    assert matched[2].item() == 0


def test_match_forced_prior_overrides_threshold_winner() -> None:
    # gt_a = [0.3, 0.3, 0.85, 0.85]: p0 0.04/0.5125 ≈ 0.078, p1 0.2025/0.35 ≈ 0.579,
    #                                p2 0.1225/0.43 ≈ 0.285 → best p1
    # gt_b = [0.6, 0.6, 0.85, 0.85]: p1 0.0225/0.29 ≈ 0.078, p2 0.0625/0.25 = 0.25 → best p2
    # At threshold 0.25, p2 alone would go to gt_a (0.285 > 0.25), but gt_b
    # claims its best prior so that it is not left without a positive.
    gt = torch.tensor([[0.3, 0.3, 0.85, 0.85], [0.6, 0.6, 0.85, 0.85]])
    matched, best_prior = match_priors(gt, HAND_PRIORS, iou_threshold=0.25)
    assert best_prior.tolist() == [1, 2]
    assert matched.tolist() == [-1, 0, 1]


def test_match_no_gt_is_all_background() -> None:
    matched, best_prior = match_priors(torch.zeros(0, 4), HAND_PRIORS)
    assert matched.tolist() == [-1, -1, -1]
    assert best_prior.numel() == 0


def test_match_real_priors_every_face_gets_a_prior() -> None:
    priors = make_priors((64, 64))
    gt = torch.tensor([[0.1, 0.1, 0.3, 0.35], [0.5, 0.4, 0.95, 0.9], [0.6, 0.05, 0.75, 0.2]])
    matched, best_prior = match_priors(gt, priors)
    assert set(matched[matched >= 0].tolist()) == {0, 1, 2}
    assert matched[best_prior].tolist() == [0, 1, 2]


# --------------------------------------------------------------------------- hard negatives


def test_hard_negative_mask_picks_top_losses_excluding_positives() -> None:
    loss = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0, 2.0, 0.5, 6.0, 0.0, 7.0]])
    positive = torch.zeros(1, 10, dtype=torch.bool)
    positive[0, 0] = True  # highest loss, but positives are never negatives
    mask = hard_negative_mask(loss, positive, neg_pos_ratio=3)
    assert mask.sum().item() == 3
    assert mask[0].nonzero().flatten().tolist() == [2, 7, 9]  # losses 5, 6, 7


def test_hard_negative_mask_zero_loss_ties_do_not_shrink_count() -> None:
    # All-zero losses (perfectly confident background): the positive must not
    # win the tie and take one of the three negative slots.
    positive = torch.tensor([[True, False, False, False, False, False]])
    mask = hard_negative_mask(torch.zeros(1, 6), positive, neg_pos_ratio=3)
    assert mask.sum().item() == 3 and not mask[0, 0]


def test_hard_negative_mask_clamps_and_minimum() -> None:
    loss = torch.arange(6.0).repeat(2, 1)
    positive = torch.zeros(2, 6, dtype=torch.bool)
    positive[0, :2] = True  # 2 positives · 5 = 10 → clamped to P-1 = 5, only 4 negatives exist
    mask = hard_negative_mask(loss, positive, neg_pos_ratio=5, min_negatives=2)
    assert mask[0].tolist() == [False, False, True, True, True, True]
    # The face-free image still mines min_negatives = 2: the two largest losses.
    assert mask[1].tolist() == [False, False, False, False, True, True]


# --------------------------------------------------------------------------- multibox loss


def test_multibox_perfect_predictions_give_zero_regression_loss() -> None:
    priors = make_priors((32, 32))
    targets = [
        _target([[0.1, 0.1, 0.45, 0.45], [0.5, 0.55, 0.9, 0.95]]),
        _target([[0.2, 0.3, 0.8, 0.9]]),
    ]
    predictions = _perfect_predictions(targets, priors)
    out = MultiBoxLoss()(predictions, targets, priors)
    assert set(out) == {"loss", "box", "class", "landmark"}
    assert out["box"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["landmark"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["class"].item() == pytest.approx(0.0, abs=1e-6)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.values())


def test_multibox_total_is_weighted_sum() -> None:
    torch.manual_seed(0)
    priors = make_priors((32, 32))
    targets = [_target([[0.1, 0.1, 0.45, 0.45]])]
    predictions = (torch.randn(1, 42, 4), torch.randn(1, 42, 2), torch.randn(1, 42, 10))
    out = MultiBoxLoss(box_weight=2.0, landmark_weight=0.5)(predictions, targets, priors)
    expected = 2.0 * out["box"] + out["class"] + 0.5 * out["landmark"]
    assert out["loss"].item() == pytest.approx(expected.item())


def test_multibox_class_loss_uses_three_hardest_negatives_per_positive() -> None:
    priors = _row_priors(10)
    targets = [_target([[0.0, 0.0, 0.1, 0.1]])]  # matches cell 0 only
    z = torch.tensor([0.0, -3.0, 2.0, -1.0, 1.5, -2.0, 0.5, 3.0, -0.5, 1.0])
    conf = torch.stack((torch.zeros(10), z), dim=-1).unsqueeze(0)
    predictions = (torch.zeros(1, 10, 4), conf, torch.zeros(1, 10, 10))
    out = MultiBoxLoss()(predictions, targets, priors)
    # Positive CE: softplus(-z0) = ln 2. Negative CE: softplus(z); the three
    # largest z among negatives are 3.0, 2.0, 1.5 (cells 7, 2, 4). One positive.
    expected = math.log(2) + sum(math.log1p(math.exp(v)) for v in (3.0, 2.0, 1.5))
    assert out["class"].item() == pytest.approx(expected, rel=1e-5)


def test_multibox_unannotated_landmarks_are_ignored() -> None:
    priors = make_priors((32, 32))
    target = _target([[0.1, 0.1, 0.45, 0.45], [0.5, 0.55, 0.9, 0.95]], valid=[True, False])
    torch.manual_seed(1)
    predictions = (torch.randn(1, 42, 4), torch.randn(1, 42, 2), torch.randn(1, 42, 10))
    loss_fn = MultiBoxLoss()
    base = loss_fn(predictions, [target], priors)

    for junk in (torch.full((10,), -1.0), torch.full((10,), 1e6), torch.full((10,), float("nan"))):
        changed = dict(target, landmarks=target["landmarks"].clone())
        changed["landmarks"][1] = junk
        out = loss_fn(predictions, [changed], priors)
        for key in base:
            assert out[key].item() == base[key].item(), key


def test_multibox_landmark_loss_counts_only_annotated_positives() -> None:
    priors = _row_priors(10)
    # Two faces, each exactly one cell; only the first has landmarks.
    target = _target([[0.0, 0.0, 0.1, 0.1], [0.5, 0.0, 0.6, 0.1]], valid=[True, False])
    landmarks = torch.zeros(1, 10, 10)
    landmarks[0, 0] = encode_landmarks(target["landmarks"][0], priors[0]) + 0.5  # 10 × 0.125
    landmarks[0, 5] = 100.0  # unannotated face's prior: must not count
    predictions = (torch.zeros(1, 10, 4), torch.zeros(1, 10, 2), landmarks)
    out = MultiBoxLoss()(predictions, [target], priors)
    assert out["landmark"].item() == pytest.approx(10 * 0.5 * 0.5**2, rel=1e-5)


def test_multibox_no_face_image_is_finite_and_mines_negatives() -> None:
    priors = _row_priors(10)
    z = torch.tensor([0.0, -3.0, 2.0, -1.0, 1.5, -2.0, 0.5, 3.0, -0.5, 1.0])
    conf = torch.stack((torch.zeros(10), z), dim=-1).unsqueeze(0).requires_grad_()
    bbox = torch.randn(1, 10, 4, requires_grad=True)
    landmarks = torch.randn(1, 10, 10, requires_grad=True)
    out = MultiBoxLoss()((bbox, conf, landmarks), [_no_faces()], priors)
    assert out["box"].item() == 0.0 and out["landmark"].item() == 0.0
    # No positives: min_negatives = 3 hardest negatives, normaliser clamped to 1.
    expected = sum(math.log1p(math.exp(v)) for v in (3.0, 2.0, 1.5))
    assert out["class"].item() == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    for tensor in (bbox, conf, landmarks):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


def test_multibox_mixed_batch_with_face_free_image() -> None:
    priors = make_priors((32, 32))
    targets = [_target([[0.2, 0.3, 0.8, 0.9]]), _no_faces()]
    torch.manual_seed(2)
    out = MultiBoxLoss()(
        (torch.randn(2, 42, 4), torch.randn(2, 42, 2), torch.randn(2, 42, 10)), targets, priors
    )
    assert all(torch.isfinite(v) for v in out.values())


def test_multibox_gradients_flow_to_all_outputs() -> None:
    priors = make_priors((32, 32))
    targets = [_target([[0.1, 0.1, 0.45, 0.45], [0.5, 0.55, 0.9, 0.95]])]
    torch.manual_seed(3)
    outputs = [torch.randn(1, 42, c, requires_grad=True) for c in (4, 2, 10)]
    MultiBoxLoss()(outputs, targets, priors)["loss"].backward()
    for tensor in outputs:
        assert tensor.grad is not None
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_multibox_rejects_mismatched_batch() -> None:
    priors = make_priors((32, 32))
    predictions = (torch.zeros(2, 42, 4), torch.zeros(2, 42, 2), torch.zeros(2, 42, 10))
    with pytest.raises(ValueError, match="targets"):
        MultiBoxLoss()(predictions, [_no_faces()], priors)


def test_multibox_under_cpu_autocast_matches_float32() -> None:
    priors = make_priors((32, 32))
    targets = [_target([[0.1, 0.1, 0.45, 0.45]])]
    torch.manual_seed(4)
    predictions = [torch.randn(1, 42, c).bfloat16() for c in (4, 2, 10)]
    reference = MultiBoxLoss()([p.float() for p in predictions], targets, priors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MultiBoxLoss()(predictions, targets, priors)
    for key in reference:
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(reference[key].item(), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_on_cuda_with_autocast_match_cpu() -> None:
    priors = make_priors((32, 32))
    targets = [_target([[0.1, 0.1, 0.45, 0.45]]), _no_faces()]
    torch.manual_seed(5)
    predictions = [torch.randn(2, 42, c).half() for c in (4, 2, 10)]
    teacher = [torch.randn(2, 42, c).half() for c in (4, 2, 10)]
    cpu_mb = MultiBoxLoss()([p.float() for p in predictions], targets, priors)
    cpu_kd = DistillationLoss()([p.float() for p in predictions], [t.float() for t in teacher])
    cuda_preds = [p.cuda().requires_grad_() for p in predictions]
    with torch.autocast("cuda", dtype=torch.float16):
        # Targets and priors stay on the CPU: the loss moves them itself.
        mb = MultiBoxLoss()(cuda_preds, targets, priors)
        kd = DistillationLoss()(cuda_preds, [t.cuda() for t in teacher])
    for cpu, cuda in ((cpu_mb, mb), (cpu_kd, kd)):
        for key in cpu:
            assert cuda[key].dtype == torch.float32 and cuda[key].is_cuda
            assert cuda[key].item() == pytest.approx(cpu[key].item(), rel=1e-4, abs=1e-6)
    (mb["loss"] + kd["loss"]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cuda_preds)


# --------------------------------------------------------------------------- distillation


def test_distillation_identical_outputs_give_zero() -> None:
    torch.manual_seed(6)
    outputs = [torch.randn(2, 42, c) for c in (4, 2, 10)]
    outputs[1][:, :5] = torch.tensor([-4.0, 4.0])  # some confident priors so box/landmark run
    out = DistillationLoss()(outputs, [t.clone() for t in outputs])
    assert set(out) == {"loss", "class", "box", "landmark"}
    for value in out.values():
        assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_temperature_scaling_one_prior() -> None:
    # Teacher logits [2 ln 3, 0] / T=2 → [ln 3, 0] → p = [0.75, 0.25];
    # student [0, 0] → q = [0.5, 0.5].
    # KL(p‖q) = 0.75 ln 1.5 + 0.25 ln 0.5 ≈ 0.304099 − 0.173287 = 0.130812;
    # × T² = 4 → 0.523248.
    teacher_conf = torch.tensor([[[2 * math.log(3), 0.0]]])
    teacher = [torch.zeros(1, 1, 4), teacher_conf, torch.zeros(1, 1, 10)]
    student = [torch.zeros(1, 1, 4), torch.zeros(1, 1, 2), torch.zeros(1, 1, 10)]
    out = DistillationLoss(temperature=2.0)(student, teacher)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert out["class"].item() == pytest.approx(4 * kl, rel=1e-5)
    assert out["class"].item() == pytest.approx(0.523248, rel=1e-5)


def test_distillation_regression_only_on_confident_teacher_priors() -> None:
    # Prior 0: teacher face prob sigmoid(2) ≈ 0.88 → kept.
    # Prior 1: sigmoid(-2) ≈ 0.12 → ignored.
    teacher_conf = torch.tensor([[[0.0, 2.0], [0.0, -2.0]]])
    teacher = [torch.zeros(1, 2, 4), teacher_conf, torch.zeros(1, 2, 10)]
    s_box = torch.zeros(1, 2, 4)
    s_box[0, 0] = 0.5  # smooth-L1 0.125 per coordinate
    s_box[0, 1] = 100.0  # would dominate if it counted
    s_landmarks = torch.zeros(1, 2, 10)
    s_landmarks[0, 0] = 2.0  # |d| = 2 → 1.5 per coordinate
    s_landmarks[0, 1] = -100.0
    student = [s_box, teacher_conf.clone(), s_landmarks]
    out = DistillationLoss(box_weight=1.0, landmark_weight=1.0)(student, teacher)
    assert out["box"].item() == pytest.approx(4 * 0.125)
    assert out["landmark"].item() == pytest.approx(10 * 1.5)
    assert out["class"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["loss"].item() == pytest.approx(0.5 + 15.0)


def test_distillation_no_confident_prior_gives_zero_regression_and_grads() -> None:
    teacher = [torch.randn(1, 3, 4), torch.tensor([[[3.0, 0.0]] * 3]), torch.randn(1, 3, 10)]
    student = [torch.randn(1, 3, c, requires_grad=True) for c in (4, 2, 10)]
    out = DistillationLoss()(student, teacher)
    assert out["box"].item() == 0.0 and out["landmark"].item() == 0.0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert student[1].grad is not None and student[1].grad.abs().sum() > 0


def test_distillation_does_not_backprop_into_teacher() -> None:
    torch.manual_seed(7)
    teacher = [torch.randn(1, 4, c, requires_grad=True) for c in (4, 2, 10)]
    student = [torch.randn(1, 4, c, requires_grad=True) for c in (4, 2, 10)]
    DistillationLoss(confidence=0.0)(student, teacher)["loss"].backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None for s in student)


def test_distillation_matches_kl_div_reference() -> None:
    torch.manual_seed(8)
    s_conf, t_conf = torch.randn(2, 5, 2), torch.randn(2, 5, 2)
    box, landmarks = torch.zeros(2, 5, 4), torch.zeros(2, 5, 10)
    out = DistillationLoss(temperature=3.0)([box, s_conf, landmarks], [box, t_conf, landmarks])
    p = F.softmax(t_conf / 3, -1)
    per_prior = (p * (p.log() - F.log_softmax(s_conf / 3, -1))).sum(-1) * 9
    assert out["class"].item() == pytest.approx(per_prior.mean().item(), rel=1e-5)
    faces = int((F.softmax(t_conf, -1)[..., 1] >= 0.5).sum())
    assert faces > 1  # the normaliser below is not the clamp
    by_faces = DistillationLoss(temperature=3.0, class_normaliser="faces")([box, s_conf, landmarks],
                                                                          [box, t_conf, landmarks])
    assert by_faces["class"].item() == pytest.approx(per_prior.sum().item() / faces, rel=1e-5)


def test_distillation_without_labels_normalises_the_class_term_by_the_teachers_faces() -> None:
    # 1 face prior among 1,000: the same per-prior disagreement costs as much as
    # with 1 prior in all, instead of a thousandth of it.
    t_conf = torch.tensor([4.0, 0.0]).repeat(1, 1000, 1)  # background everywhere...
    t_conf[0, 0] = torch.tensor([0.0, 4.0])  # ...but one face
    s_conf = t_conf.clone()
    s_conf[0, 0] = torch.tensor([4.0, 0.0])
    zeros = [torch.zeros(1, 1000, 4), torch.zeros(1, 1000, 10)]
    loss = DistillationLoss(class_normaliser="faces")
    many = loss([zeros[0], s_conf, zeros[1]], [zeros[0], t_conf, zeros[1]])["class"]
    one = loss([zeros[0][:, :1], s_conf[:, :1], zeros[1][:, :1]], [zeros[0][:, :1], t_conf[:, :1], zeros[1][:, :1]])["class"]
    assert many.item() == pytest.approx(one.item(), rel=1e-6) and one.item() > 1
