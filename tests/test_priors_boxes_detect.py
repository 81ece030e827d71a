"""Priors, box coding, preprocessing and post-processing against hand values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from facedet.boxes import (
    VARIANCES,
    decode_boxes,
    decode_landmarks,
    encode_boxes,
    encode_landmarks,
)
from facedet.detect import Detections, detect, postprocess
from facedet.preprocess import MEAN_BGR, pad_to_multiple, to_network_input
from facedet.priors import PriorConfig, make_priors, num_priors


# --------------------------------------------------------------------------- priors


def test_prior_count_64x96() -> None:
    # step 8: 8×12 cells, step 16: 4×6, step 32: 2×3; two sizes each
    # → 2·(96 + 24 + 6) = 252
    priors = make_priors((64, 96))
    assert priors.shape == (252, 4)
    assert priors.dtype == torch.float32
    assert num_priors((64, 96)) == 252


def test_prior_count_rounds_up_partial_cells() -> None:
    # 100×70: ceil(100/8)=13, ceil(70/8)=9 → 117; ceil(100/16)=7, ceil(70/16)=5 → 35;
    # ceil(100/32)=4, ceil(70/32)=3 → 12; (117 + 35 + 12)·2 = 328
    assert num_priors((100, 70)) == 328
    assert make_priors((100, 70)).shape == (328, 4)


def test_prior_values_and_order_64x96() -> None:
    priors = make_priors((64, 96))
    expected = {
        # level 0 (step 8), row 0, col 0: centre (0.5·8/96, 0.5·8/64), size 16 then 32
        0: (4 / 96, 4 / 64, 16 / 96, 16 / 64),
        1: (4 / 96, 4 / 64, 32 / 96, 32 / 64),
        # row 0, col 1: cx = 1.5·8/96 = 12/96
        2: (12 / 96, 4 / 64, 16 / 96, 16 / 64),
        # row 1, col 0 comes after the 12 columns of row 0: index 12·2 = 24
        24: (4 / 96, 12 / 64, 16 / 96, 16 / 64),
        # level 1 (step 16) starts after 8·12·2 = 192 level-0 priors
        192: (8 / 96, 8 / 64, 64 / 96, 64 / 64),
        193: (8 / 96, 8 / 64, 128 / 96, 128 / 64),
        # level 2 (step 32) starts at 192 + 4·6·2 = 240
        240: (16 / 96, 16 / 64, 256 / 96, 256 / 64),
        # last: row 1, col 2, size 512: (2.5·32/96, 1.5·32/64) — not clipped
        251: (80 / 96, 48 / 64, 512 / 96, 512 / 64),
    }
    for index, values in expected.items():
        torch.testing.assert_close(priors[index], torch.tensor(values), rtol=0, atol=1e-7)


def test_prior_config_validates_lengths() -> None:
    with pytest.raises(ValueError):
        PriorConfig(min_sizes=((16, 32),), steps=(8, 16))


# ---------------------------------------------------------------------- box coding


def test_decode_boxes_by_hand() -> None:
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    loc = torch.tensor([[1.0, -1.0, 0.0, math.log(2) / 0.2]])
    # cx = 0.5 + 1·0.1·0.2 = 0.52, cy = 0.5 − 0.02 = 0.48,
    # w = 0.2·exp(0) = 0.2, h = 0.2·exp(ln 2) = 0.4
    # → (0.52 − 0.1, 0.48 − 0.2, 0.52 + 0.1, 0.48 + 0.2)
    expected = torch.tensor([[0.42, 0.28, 0.62, 0.68]])
    torch.testing.assert_close(decode_boxes(loc, priors), expected)


def test_decode_landmarks_by_hand() -> None:
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    ldm = torch.tensor([[1.0, -1.0, 0.0, 0.0, 2.0, 2.0, -5.0, 0.0, 0.0, 5.0]])
    # x = 0.5 + l·0.1·0.2 = 0.5 + 0.02·l; y = 0.5 + l·0.1·0.4 = 0.5 + 0.04·l
    expected = torch.tensor([[0.52, 0.46, 0.5, 0.5, 0.54, 0.58, 0.4, 0.5, 0.5, 0.7]])
    torch.testing.assert_close(decode_landmarks(ldm, priors), expected)


def _random_priors(generator: torch.Generator, count: int) -> torch.Tensor:
    centres = torch.rand(count, 2, generator=generator)
    sizes = torch.rand(count, 2, generator=generator) * 0.5 + 0.05
    return torch.cat((centres, sizes), dim=1)


def test_box_round_trip_with_batch_dims() -> None:
    generator = torch.Generator().manual_seed(0)
    priors = _random_priors(generator, 7)
    loc = torch.randn(2, 3, 7, 4, generator=generator)
    boxes = decode_boxes(loc, priors, VARIANCES)
    assert boxes.shape == (2, 3, 7, 4)
    torch.testing.assert_close(encode_boxes(boxes, priors), loc, rtol=0, atol=1e-5)
    torch.testing.assert_close(decode_boxes(encode_boxes(boxes, priors), priors), boxes, rtol=0, atol=1e-5)


def test_landmark_round_trip_with_batch_dims() -> None:
    generator = torch.Generator().manual_seed(1)
    priors = _random_priors(generator, 5)
    ldm = torch.randn(4, 5, 10, generator=generator)
    points = decode_landmarks(ldm, priors, VARIANCES)
    assert points.shape == (4, 5, 10)
    torch.testing.assert_close(encode_landmarks(points, priors, VARIANCES), ldm, rtol=0, atol=1e-5)


def test_encode_boxes_by_hand() -> None:
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    # box centre (0.52, 0.48), size (0.2, 0.4):
    # offsets (0.02/(0.1·0.2), −0.02/(0.1·0.2)) = (1, −1); sizes (ln 1, ln 2)/0.2
    box = torch.tensor([[0.42, 0.28, 0.62, 0.68]])
    expected = torch.tensor([[1.0, -1.0, 0.0, math.log(2) / 0.2]])
    torch.testing.assert_close(encode_boxes(box, priors), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------- preprocessing


def test_to_network_input_single_pixel() -> None:
    image = torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1)
    out = to_network_input(image)
    # RGB (10, 20, 30) → BGR (30, 20, 10) − (104, 117, 123)
    expected = torch.tensor([30 - 104, 20 - 117, 10 - 123], dtype=torch.float32).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(to_network_input(image.float().unsqueeze(0)), expected, rtol=0, atol=0)


def test_to_network_input_grayscale() -> None:
    image = torch.full((2, 1, 2, 3), 100, dtype=torch.uint8)
    out = to_network_input(image)
    assert out.shape == (2, 3, 2, 3)
    # grey 100 in every channel → (100 − 104, 100 − 117, 100 − 123)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-4.0, -17.0, -23.0]), rtol=0, atol=0)


def test_to_network_input_rejects_alpha() -> None:
    with pytest.raises(ValueError):
        to_network_input(torch.zeros(4, 2, 2, dtype=torch.uint8))


def test_pad_to_multiple() -> None:
    batch = to_network_input(torch.full((3, 33, 64), 7, dtype=torch.uint8))
    padded = pad_to_multiple(batch)
    # 33 → 64 rows (next multiple of 32), 64 columns already fine
    assert padded.shape == (1, 3, 64, 64)
    torch.testing.assert_close(padded[..., :33, :], batch, rtol=0, atol=0)
    assert torch.count_nonzero(padded[..., 33:, :]) == 0
    assert pad_to_multiple(padded).shape == (1, 3, 64, 64)
    assert MEAN_BGR == (104.0, 117.0, 123.0)


# ------------------------------------------------------------------------- detect
#
# A 32×32 input has 4·4·2 + 2·2·2 + 1·1·2 = 42 priors. Level-0 prior index for
# row i, column j, size a is (4i + j)·2 + a; size 16 px, centre ((j+0.5)·8, (i+0.5)·8) px.
#
#   prior 10 (row 1, col 1): centre (12, 12), loc 0     → box (4, 4, 20, 20),  score 9/10
#   prior 12 (row 1, col 2): centre (20, 12), loc x −2.5 → centre x 20 − 2.5·0.1·16 = 16
#                                                       → box (8, 4, 24, 20),  score 8/10
#       IoU with prior 10's box: 12·16 / (256 + 256 − 192) = 192/320 = 0.6 > 0.4 → suppressed
#   prior 30 (row 3, col 3): centre (28, 28), loc 0     → box (20, 20, 36, 36), score 7/10
#       touches prior 10's box only at a corner → IoU 0, kept
#   prior 20 (row 2, col 2): centre (20, 20), loc 0     → box (12, 12, 28, 28), score 1/100
#       (below the default threshold 0.02)
# Scores: softmax of logits (0, ln r) gives face probability r/(1 + r), so
# r = 9, 4, 7/3, 1/99 give 0.9, 0.8, 0.7, 0.01. All other priors get logits
# (10, −10), face probability 1/(1 + e^20) ≈ 2e-9.

_NUM_PRIORS_32 = 42


def _fake_outputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bbox = torch.zeros(1, _NUM_PRIORS_32, 4)
    bbox[0, 12, 0] = -2.5
    conf = torch.tensor([10.0, -10.0]).repeat(1, _NUM_PRIORS_32, 1)
    for prior, ratio in ((10, 9.0), (12, 4.0), (30, 7 / 3), (20, 1 / 99)):
        conf[0, prior] = torch.tensor([0.0, math.log(ratio)])
    ldm = torch.zeros(1, _NUM_PRIORS_32, 10)
    # prior 10: point = 12 + l·0.1·16 = 12 + 1.6·l → (8,8) (16,8) (12,12) (8,16) (16,16)
    ldm[0, 10] = torch.tensor([-2.5, -2.5, 2.5, -2.5, 0.0, 0.0, -2.5, 2.5, 2.5, 2.5])
    # prior 30: 28 + 5·1.6 = 36 in every coordinate (outside the image, not clipped)
    ldm[0, 30] = 5.0
    return bbox, conf, ldm


class _FixedOutputs(nn.Module):
    """Stands in for FeatherFace: fixed outputs, and records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.child = nn.Linear(1, 1)
        bbox, conf, ldm = _fake_outputs()
        self.register_buffer("bbox", bbox)
        self.register_buffer("conf", conf)
        self.register_buffer("ldm", ldm)
        self.seen_training: bool | None = None
        self.seen_grad: bool | None = None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert images.shape[1:] == (3, 32, 32)
        self.seen_training = self.training
        self.seen_grad = torch.is_grad_enabled()
        n = images.shape[0]
        return self.bbox.expand(n, -1, -1), self.conf.expand(n, -1, -1), self.ldm.expand(n, -1, -1)


def _images(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, 3, 32, 32)


def test_detect_hand_built_case() -> None:
    model = _FixedOutputs()
    (result,) = detect(model, _images())
    assert isinstance(result, Detections)
    assert len(result) == 2
    torch.testing.assert_close(result.scores, torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(
        result.boxes, torch.tensor([[4.0, 4.0, 20.0, 20.0], [20.0, 20.0, 36.0, 36.0]])
    )
    torch.testing.assert_close(
        result.landmarks,
        torch.tensor(
            [
                [8.0, 8.0, 16.0, 8.0, 12.0, 12.0, 8.0, 16.0, 16.0, 16.0],
                [36.0] * 10,
            ]
        ),
    )


def test_detect_clips_boxes_per_image() -> None:
    model = _FixedOutputs()
    first, second = detect(model, _images(2), image_sizes=[(32, 32), (30, 28)])
    # image 1 (h 32, w 32): (20, 20, 36, 36) → (20, 20, 32, 32)
    torch.testing.assert_close(first.boxes[1], torch.tensor([20.0, 20.0, 32.0, 32.0]))
    # image 2 (h 30, w 28): x clipped to 28, y to 30 → (20, 20, 28, 30)
    torch.testing.assert_close(second.boxes[1], torch.tensor([20.0, 20.0, 28.0, 30.0]))
    torch.testing.assert_close(second.boxes[0], torch.tensor([4.0, 4.0, 20.0, 20.0]))
    # landmarks are not clipped
    torch.testing.assert_close(second.landmarks[1], torch.full((10,), 36.0))


def test_detect_conf_threshold() -> None:
    model = _FixedOutputs()
    (strict,) = detect(model, _images(), conf_threshold=0.85)
    torch.testing.assert_close(strict.scores, torch.tensor([0.9]))
    # 0.005 lets prior 20 (0.01) through; its IoU with (4,4,20,20) is 64/448 ≈ 0.14
    (loose,) = detect(model, _images(), conf_threshold=0.005)
    torch.testing.assert_close(loose.scores, torch.tensor([0.9, 0.7, 0.01]))
    torch.testing.assert_close(loose.boxes[2], torch.tensor([12.0, 12.0, 28.0, 28.0]))


def test_detect_keep_top_k_truncates_after_nms() -> None:
    (result,) = detect(_FixedOutputs(), _images(), keep_top_k=1)
    torch.testing.assert_close(result.scores, torch.tensor([0.9]))


def test_detect_top_k_caps_before_nms() -> None:
    # top_k=2 keeps 0.9 and 0.8 only; NMS then drops 0.8, so 0.7 never returns.
    (result,) = detect(_FixedOutputs(), _images(), top_k=2)
    torch.testing.assert_close(result.scores, torch.tensor([0.9]))


def test_detect_nms_threshold() -> None:
    # IoU 0.6 is below a 0.7 threshold, so the overlapping pair both survive
    (result,) = detect(_FixedOutputs(), _images(), nms_threshold=0.7)
    torch.testing.assert_close(result.scores, torch.tensor([0.9, 0.8, 0.7]))
    torch.testing.assert_close(result.boxes[1], torch.tensor([8.0, 4.0, 24.0, 20.0]))


def test_detect_restores_training_flags() -> None:
    model = _FixedOutputs()
    model.train()
    model.child.eval()  # a mixed state must survive too
    detect(model, _images())
    assert model.seen_training is False
    assert model.seen_grad is False
    assert model.training is True
    assert model.child.training is False

    model.eval()
    detect(model, _images())
    assert model.training is False


def test_detect_empty_result() -> None:
    (result,) = detect(_FixedOutputs(), _images(), conf_threshold=0.95)
    assert len(result) == 0
    assert result.boxes.shape == (0, 4)
    assert result.landmarks.shape == (0, 10)


def test_postprocess_matches_detect_on_stored_outputs() -> None:
    bbox, conf, ldm = _fake_outputs()
    priors = make_priors((32, 32))
    assert priors.shape[0] == _NUM_PRIORS_32
    (stored,) = postprocess(bbox, conf, ldm, priors, (32, 32))
    (live,) = detect(_FixedOutputs(), _images(), priors=priors)
    torch.testing.assert_close(stored.boxes, live.boxes)
    torch.testing.assert_close(stored.scores, live.scores)
    torch.testing.assert_close(stored.landmarks, live.landmarks)


def test_postprocess_rejects_prior_mismatch() -> None:
    bbox, conf, ldm = _fake_outputs()
    with pytest.raises(ValueError):
        postprocess(bbox, conf, ldm, make_priors((64, 64)), (64, 64))
