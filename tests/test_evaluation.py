"""Tests for the WIDER FACE evaluation protocol (facedet.evaluation)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from facedet.evaluation import (
    WiderFaceGroundTruth,
    average_precision,
    average_precision_all_points,
    evaluate_widerface,
    evaluate_widerface_predictions,
    image_pr_counts,
    iou_matrix,
    load_ground_truth,
    pr_thresholds,
    read_prediction_file,
    read_predictions,
    voc_ap,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIDER_REF = SHARED / "reference" / "widerface_eval"


# --------------------------------------------------------------------------
# Reference reproduction
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wider_pred_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = WIDER_REF / "predictions_seed0.tar.gz"
    if not archive.is_file():
        pytest.skip(f"WIDER FACE reference predictions not available at {archive}")
    out = tmp_path_factory.mktemp("widerface_pred")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(out, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(out)
    return out / "pred0"


def test_reproduces_reference_aps(wider_pred_dir: Path) -> None:
    expected = json.loads((WIDER_REF / "expected_seed0.json").read_text())
    result = evaluate_widerface(wider_pred_dir, WIDER_REF / "ground_truth")
    assert set(result) == {"easy", "medium", "hard"}
    for setting in ("easy", "medium", "hard"):
        assert result[setting] == pytest.approx(expected[setting], abs=1e-6), setting


def test_reference_predictions_parse(wider_pred_dir: Path) -> None:
    preds = read_predictions(wider_pred_dir)
    assert len(preds) == 61
    assert sum(len(images) for images in preds.values()) == 3226
    boxes = preds["0--Parade"]["0_Parade_Parade_0_102"]
    assert boxes.shape == (27, 5)
    np.testing.assert_allclose(boxes[0], [222.8, 527.5, 12.2, 18.2, 0.683686])


# --------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------


def test_voc_ap_hand_computed() -> None:
    # Padded: mrec = [0, .5, .5, 1, 1], mpre = [0, 1, .5, 2/3, 0]
    # envelope   mpre = [1, 1, 2/3, 2/3, 0]
    # recall changes 0->.5 (precision 1) and .5->1 (precision 2/3):
    # AP = .5 * 1 + .5 * 2/3 = 5/6
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision) == pytest.approx(5 / 6)


def test_voc_ap_envelope_lifts_earlier_points() -> None:
    # A later, higher precision lifts the earlier one: envelope [.. 1, 1 ..]
    # AP = .5 * 1 + .5 * 1 = 1
    assert voc_ap(np.array([0.5, 1.0]), np.array([0.5, 1.0])) == pytest.approx(1.0)


def test_pr_thresholds() -> None:
    t = pr_thresholds()
    assert t.shape == (1000,)
    assert t[0] == pytest.approx(0.999) and t[-1] == 0.0
    assert np.all(np.diff(t) < 0)


GT_A = [0, 0, 10, 10]
GT_B = [20, 20, 30, 30]
GT_C = [40, 40, 50, 50]
FAR_AWAY = [100, 100, 110, 110]


def test_average_precision_hand_built() -> None:
    # 2 gt (A, B); predictions: TP on A (0.9), FP far away (0.6), TP on B (0.3).
    # Min-max normalised scores: 1.0, 0.5, 0.0.
    #   0.5 < t <= 0.999: {A-hit}            -> P = 1/1, R = 1/2
    #   0   < t <= 0.5  : {A-hit, FP}        -> P = 1/2, R = 1/2
    #   t = 0           : all three          -> P = 2/3, R = 1
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    image = (
        np.array([GT_A, FAR_AWAY, GT_B], dtype=float),
        np.array([0.9, 0.6, 0.3]),
        np.array([GT_A, GT_B], dtype=float),
        None,
    )
    assert average_precision([image]) == pytest.approx(5 / 6)


def test_ignored_gt_match_is_neither_tp_nor_fp() -> None:
    # As above plus an ignored face C and a prediction on it (0.8): that
    # prediction must not count as a proposal, so the AP stays 5/6.
    preds = np.array([GT_A, GT_C, FAR_AWAY, GT_B], dtype=float)
    scores = np.array([0.9, 0.8, 0.6, 0.3])
    gt = np.array([GT_A, GT_B, GT_C], dtype=float)
    ignored = np.array([False, False, True])
    assert average_precision([(preds, scores, gt, ignored)]) == pytest.approx(5 / 6)

    # Control: with C kept, that prediction is a TP. Normalised scores 1, 5/6,
    # 1/2, 0 -> (P, R) = (1, 1/3), (1, 2/3), (2/3, 2/3), (3/4, 1);
    # AP = 1/3 + 1/3 + 1/3 * 3/4 = 11/12.
    assert average_precision([(preds, scores, gt, None)]) == pytest.approx(11 / 12)


def test_duplicate_detection_is_false_positive() -> None:
    # Two predictions on the same face: the second is a proposal but recalls
    # nothing new (the reference never re-assigns it to another face).
    thresholds = np.array([0.5, 0.0])
    proposals, tp = image_pr_counts(
        np.array([GT_A, GT_A], dtype=float),
        np.array([1.0, 0.2]),
        np.array([GT_A, [1, 1, 11, 11]], dtype=float),
        None,
        thresholds,
    )
    np.testing.assert_array_equal(proposals, [1, 2])
    np.testing.assert_array_equal(tp, [1, 1])


def test_image_pr_counts_sorts_by_score() -> None:
    # Input order must not matter: the FP has the top score here.
    thresholds = np.array([0.9, 0.4, 0.0])
    proposals, tp = image_pr_counts(
        np.array([GT_A, FAR_AWAY], dtype=float),
        np.array([0.5, 1.0]),
        np.array([GT_A], dtype=float),
        None,
        thresholds,
    )
    np.testing.assert_array_equal(proposals, [1, 2, 2])
    np.testing.assert_array_equal(tp, [0, 1, 1])


def test_images_without_predictions_count_their_faces() -> None:
    # Same as the hand-built case plus an image with 2 faces and no detection:
    # recall halves -> (P, R) = (1, 1/4), (1/2, 1/4), (2/3, 1/2), padded to 1
    # with precision 0; AP = 1/4 * 1 + 1/4 * 2/3 = 5/12.
    hit = (
        np.array([GT_A, FAR_AWAY, GT_B], dtype=float),
        np.array([0.9, 0.6, 0.3]),
        np.array([GT_A, GT_B], dtype=float),
        None,
    )
    missed = (np.zeros((0, 4)), np.zeros(0), np.array([GT_A, GT_B], dtype=float), None)
    assert average_precision([hit, missed]) == pytest.approx(5 / 12)
    assert average_precision([missed]) == 0.0


def test_voc_ap_of_a_perfect_ranking_is_exactly_one() -> None:
    # Summing 452 recall steps of 1/452 would round to 0.9999999999999999.
    recall = np.arange(1, 453) / 452
    assert voc_ap(recall, np.ones(452)) == 1.0


def test_all_points_hand_built() -> None:
    # The case of test_average_precision_hand_built on raw scores: TP 0.9, FP 0.6, TP 0.3
    # -> (P, R) = (1, 1/2), (1/2, 1/2), (2/3, 1); AP = 1/2 + 1/2 * 2/3 = 5/6.
    image = (
        np.array([GT_A, FAR_AWAY, GT_B], dtype=float),
        np.array([0.9, 0.6, 0.3]),
        np.array([GT_A, GT_B], dtype=float),
        None,
    )
    assert average_precision_all_points([image]) == pytest.approx(5 / 6)


def test_all_points_every_distinct_score_is_a_threshold() -> None:
    # TP 1.0, TP 0.5001, FP 0.5 on 2 faces: all points (1, 1/2), (1, 1), (2/3, 1) -> AP 1.
    # On the grid of 1,000 normalised thresholds 0.5001 and 0.5 (0.0002 and 0) enter
    # together: (1, 1/2), (2/3, 1) -> 5/6.
    image = (
        np.array([GT_A, GT_B, FAR_AWAY], dtype=float),
        np.array([1.0, 0.5001, 0.5]),
        np.array([GT_A, GT_B], dtype=float),
        None,
    )
    assert average_precision_all_points([image]) == pytest.approx(1.0)
    assert average_precision([image]) == pytest.approx(5 / 6)


def test_all_points_tied_scores_enter_together() -> None:
    # A hit and a false positive with the same score give one point (1/2, 1), whatever
    # their order: AP 1/2, not 1.
    image = (np.array([GT_A, FAR_AWAY], dtype=float), np.array([0.7, 0.7]), np.array([GT_A], dtype=float), None)
    assert average_precision_all_points([image]) == pytest.approx(0.5)


def test_all_points_pools_images_into_one_ranking() -> None:
    # Image 1: TP 0.9, FP 0.8; image 2: TP 0.7.  Pooled: (1, 1/2), (1/2, 1/2), (2/3, 1) -> 5/6
    # (each image alone has AP 1).  An image without predictions still counts its faces.
    first = (np.array([GT_A, FAR_AWAY], dtype=float), np.array([0.9, 0.8]), np.array([GT_A], dtype=float), None)
    second = (np.array([GT_B], dtype=float), np.array([0.7]), np.array([GT_B], dtype=float), None)
    missed = (np.zeros((0, 4)), np.zeros(0), np.array([GT_C], dtype=float), None)
    assert average_precision_all_points([first, second]) == pytest.approx(5 / 6)
    assert average_precision_all_points([first, second, missed]) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    assert average_precision_all_points([missed]) == 0.0
    assert average_precision_all_points([]) == 0.0


def test_all_points_ignored_faces_and_bad_records() -> None:
    # As test_ignored_gt_match_is_neither_tp_nor_fp: the prediction on the ignored face C is dropped.
    preds = np.array([GT_A, GT_C, FAR_AWAY, GT_B], dtype=float)
    gt = np.array([GT_A, GT_B, GT_C], dtype=float)
    ignored = np.array([False, False, True])
    assert average_precision_all_points([(preds, np.array([0.9, 0.8, 0.6, 0.3]), gt, ignored)]) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="4 boxes but 3 scores"):
        average_precision_all_points([(preds, np.array([0.9, 0.8, 0.6]), gt, None)])


def test_iou_matrix_pixel_offset() -> None:
    a = np.array([[0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=float)
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0]])
    # Inclusive pixels: 11x11 boxes overlapping on 6x11.
    np.testing.assert_allclose(iou_matrix(a, b, offset=1.0), [[1.0, 66 / 176, 0.0]])
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 3)


# --------------------------------------------------------------------------
# WIDER FACE adapter and file handling
# --------------------------------------------------------------------------


def _tiny_gt() -> WiderFaceGroundTruth:
    boxes = {"ev": {"img1": np.array([[0, 0, 10, 10]], float), "img2": np.array([[20, 20, 10, 10]], float)}}
    keep_all = {"ev": {"img1": np.array([0]), "img2": np.array([0])}}
    return WiderFaceGroundTruth(boxes=boxes, keep={s: keep_all for s in ("easy", "medium", "hard")})


def test_missing_images_and_empty_predictions() -> None:
    gt = _tiny_gt()
    # img2 missing from the predictions: no detections, its face still counts.
    preds = {"ev": {"img1": np.array([[0, 0, 10, 10, 0.9], [50, 50, 5, 5, 0.1]])}}
    assert evaluate_widerface_predictions(preds, gt)["easy"] == pytest.approx(0.5)
    preds["ev"]["img2"] = np.zeros((0, 5))
    assert evaluate_widerface_predictions(preds, gt)["hard"] == pytest.approx(0.5)
    assert evaluate_widerface_predictions({}, gt) == {"easy": 0.0, "medium": 0.0, "hard": 0.0}


def test_read_predictions_tree(tmp_path: Path) -> None:
    event = tmp_path / "0--Parade"
    event.mkdir()
    (event / "a.txt").write_text("a.jpg\n2\n1 2 3 4 0.9\n5 6 7 8 0.1\n")
    (event / "b.txt").write_text("0--Parade/b.jpg\n0\n")
    preds = read_predictions(tmp_path)
    np.testing.assert_array_equal(preds["0--Parade"]["a"], [[1, 2, 3, 4, 0.9], [5, 6, 7, 8, 0.1]])
    assert preds["0--Parade"]["b"].shape == (0, 5)


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("a\n2\n1 2 3 4 0.9\n1 2 3 0.5\n", 4),  # 4 values
        ("a\n1\n1 2 x 4 0.9\n", 3),  # not a number
        ("a\n3\n1 2 3 4 0.9\n", 2),  # count disagrees with the boxes
        ("a\ntwo\n", 2),  # count not an integer
        ("b\n0\n", 1),  # name does not match the file
        ("a\n", 2),  # truncated
    ],
)
def test_malformed_prediction_file(tmp_path: Path, content: str, line: int) -> None:
    path = tmp_path / "a.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"a\.txt: line {line}:") as info:
        read_prediction_file(path)
    assert str(path) in str(info.value)


def test_missing_ground_truth_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="wider_face_val.mat"):
        load_ground_truth(tmp_path)
