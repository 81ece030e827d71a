"""AP against a reference detector or human boxes on photos at their own size.

facedet.agreement and `compress eval --images`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from compressor.cli import cli
from facedet.agreement import AgreementResult, agreement_ap, labelled_ap
from facedet.boxes import encode_boxes
from facedet.data.errors import DataError
from facedet.data.folder import image_files
from facedet.data.images import read_image
from facedet.detect import detect
from facedet.preprocess import pad_to_multiple, to_network_input
from facedet.priors import make_priors

Box = tuple[float, float, float, float]
# Photo sizes (H, W); a photo is recognised by the hand-made models below from its input size.
FIRST, SECOND = (80, 100), (90, 120)
A: Box = (10, 10, 40, 40)  # a face in the first photo
B: Box = (50, 30, 80, 60)  # a face in the second photo
ELSEWHERE: Box = (60, 40, 90, 70)  # nothing there in the first photo


class FixedFaces(nn.Module):
    """A "detector" that outputs given faces, ``{input (H, W): [(x1, y1, x2, y2, score), ...]}``, over the priors.

    Face k is regressed from prior k (the box coding is exact whatever the
    prior), every other prior is confident background.  It records the input
    sizes it saw.
    """

    def __init__(self, faces: dict[tuple[int, int], list[tuple[float, ...]]]) -> None:
        super().__init__()
        self.faces = faces
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2:]
        self.seen.append((height, width))
        priors = make_priors((height, width))
        boxes = torch.zeros(len(priors), 4)
        logits = torch.tensor([10.0, -10.0]).repeat(len(priors), 1)  # face probability ~2e-9
        for k, (*box, score) in enumerate(self.faces.get((height, width), [])):
            normalised = torch.tensor(box) / torch.tensor([width, height, width, height])
            boxes[k] = encode_boxes(normalised, priors[k])
            logits[k] = torch.tensor([0.0, math.log(score / (1 - score))])
        return boxes[None], logits[None], torch.zeros(1, len(priors), 10)


def _photos(folder: Path, *sizes: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        Image.new("RGB", (width, height), (90, 120, 150)).save(folder / f"photo_{i}.png")
    return image_files(folder)


REFERENCE = FixedFaces({FIRST: [(*A, 0.9), (*ELSEWHERE, 0.3)], SECOND: [(*B, 0.8)]})  # 2 faces >= 0.5


def test_a_model_against_itself_is_one(tmp_path):
    result = agreement_ap(REFERENCE, REFERENCE, _photos(tmp_path, FIRST, SECOND))
    assert result == AgreementResult(ap=1.0, images=2, reference_faces=2)


def test_a_model_that_finds_nothing_is_zero(tmp_path):
    result = agreement_ap(FixedFaces({}), REFERENCE, _photos(tmp_path, FIRST, SECOND))
    assert result == AgreementResult(ap=0.0, images=2, reference_faces=2)


def test_hand_built_ap_pools_the_photos_into_one_ranking(tmp_path):
    # Ranked over both photos: A (0.9, hit), ELSEWHERE (0.7, false positive in the first photo),
    # B (0.6, hit).  (precision, recall) = (1, 1/2), (1/2, 1/2), (2/3, 1); all-point envelope:
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.  (Averaging per-photo APs would give 1.)
    model = FixedFaces({FIRST: [(*A, 0.9), (*ELSEWHERE, 0.7)], SECOND: [(*B, 0.6)]})
    result = agreement_ap(model, REFERENCE, _photos(tmp_path, FIRST, SECOND))
    assert result.ap == pytest.approx(5 / 6) and (result.images, result.reference_faces) == (2, 2)


def test_every_distinct_score_is_a_threshold(tmp_path):
    # A at 0.9, B at 0.5001, the false positive at 0.5: on a grid of 1,000 normalised
    # thresholds the last two would enter together (AP 5/6); here B is in first: AP 1.
    model = FixedFaces({FIRST: [(*A, 0.9), (*ELSEWHERE, 0.5)], SECOND: [(*B, 0.5001)]})
    assert agreement_ap(model, REFERENCE, _photos(tmp_path, FIRST, SECOND)).ap == pytest.approx(1.0)


def test_no_reference_face_names_the_folder(tmp_path):
    photos = _photos(tmp_path / "photos", FIRST)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "photos")) + ".*no face"):
        agreement_ap(REFERENCE, FixedFaces({}), photos)


def test_train_and_eval_modes_are_restored(tmp_path):
    model, reference = FixedFaces(REFERENCE.faces).train(), FixedFaces(REFERENCE.faces).eval()
    agreement_ap(model, reference, _photos(tmp_path, FIRST))
    assert model.training and not reference.training


def test_padding_never_yields_boxes_outside_the_photo(tmp_path):
    # A 70x90 photo is padded to 96x96 for a size multiple of 32.  The model sees a face in the
    # photo, one straddling its right border, and a confident one wholly in the padding.
    inside, straddling, in_padding = (10, 10, 40, 40, 0.9), (70, 30, 94, 60, 0.8), (91, 10, 95, 40, 0.95)
    model = FixedFaces({(96, 96): [inside, straddling, in_padding], (70, 90): [inside]})
    photos = _photos(tmp_path, (70, 90))
    result = agreement_ap(model, model, photos, size_multiple=32)
    assert model.seen == [(96, 96), (96, 96)]
    # Two reference faces (the one in the padding is gone), both found first: AP 1.
    assert result == AgreementResult(ap=1.0, images=1, reference_faces=2)

    # The same through detect() itself: clipped to the photo, nothing left in the padding.
    batch = pad_to_multiple(to_network_input(read_image(photos[0])), 32)
    (found,) = detect(model, batch, image_sizes=[(70, 90)])
    boxes = found.boxes
    assert len(boxes) == 2 and (boxes >= 0).all() and (boxes[:, 2] <= 90).all() and (boxes[:, 3] <= 70).all()
    assert boxes[1].tolist() == pytest.approx([70, 30, 90, 60], abs=1e-3)

    # Without a multiple the photo is run at its own size.
    model.seen.clear()
    agreement_ap(FixedFaces({}), model, photos)
    assert model.seen == [(70, 90)]


def test_tied_scores_keep_the_priors_order_at_any_threshold(tmp_path):
    # Two overlapping boxes with the same score: NMS keeps the first prior's, whichever other
    # candidates pass the threshold, so a detector's confident faces are the same at 0.5 and 0.02.
    left, right, weak = (10, 10, 40, 40, 0.9), (12, 10, 42, 40, 0.9), (50, 30, 80, 60, 0.1)
    batch = to_network_input(read_image(_photos(tmp_path, FIRST)[0]))
    for faces, kept in (([left, right, weak], left), ([right, left, weak], right)):
        model = FixedFaces({FIRST: faces})
        for threshold in (0.5, 0.02):
            (found,) = detect(model, batch, conf_threshold=threshold, image_sizes=[FIRST])
            assert found.boxes[0].tolist() == pytest.approx(kept[:4], abs=1e-3)


def test_boxes_that_differ_only_outside_the_photo_are_one_face(tmp_path):
    # Unclipped IoU 40/140 (both would survive NMS), clipped the same box: one detection,
    # so the detector still agrees with itself.
    model = FixedFaces({FIRST: [(0, 10, 40, 40, 0.9), (-100, 10, 40, 40, 0.8)]})
    photos = _photos(tmp_path, FIRST)
    (found,) = detect(model, to_network_input(read_image(photos[0])), image_sizes=[FIRST])
    assert found.boxes.tolist() == [pytest.approx([0, 10, 40, 40], abs=1e-3)]
    assert agreement_ap(model, model, photos) == AgreementResult(ap=1.0, images=1, reference_faces=1)


def _labelled_split(root: Path) -> Path:
    _photos(root / "images", FIRST, SECOND)
    # The first photo's face is A; the second is a negative.
    (root / "label.txt").write_text(f"# photo_0.png\n{A[0]} {A[1]} {A[2] - A[0]} {A[3] - A[1]}\n# photo_1.png\n")
    return root


def test_labelled_ap_on_human_boxes(tmp_path):
    split = _labelled_split(tmp_path / "val")
    # A hit at 0.9, then a false positive in the negative photo: AP 1; ranked the other way round, 1/2.
    assert labelled_ap(FixedFaces({FIRST: [(*A, 0.9)], SECOND: [(*B, 0.6)]}), split) == AgreementResult(1.0, 2, 1)
    assert labelled_ap(FixedFaces({FIRST: [(*A, 0.6)], SECOND: [(*B, 0.9)]}), split).ap == pytest.approx(0.5)


# ------------------------------------------------------------------ compress eval --images


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_eval_against_a_teacher_prints_the_three_keys(checkpoint, tmp_path):
    _photos(tmp_path / "photos", (70, 90))  # not a multiple of 32: FeatherFace pads
    result = invoke("eval", str(checkpoint), "--images", str(tmp_path / "photos"), "--against", str(checkpoint),
                    "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert list(got) == ["ap", "images", "reference_faces"]
    assert got["ap"] == 1.0 and got["images"] == 1 and got["reference_faces"] > 0
    human = invoke("eval", str(checkpoint), "--images", str(tmp_path / "photos"), "--against", str(checkpoint))
    assert human.output == (f"agreement AP 1.0000 on 1 photos ({got['reference_faces']} reference faces "
                            f"from {checkpoint})\n")


def test_eval_pads_for_the_teacher_family_too(checkpoint, tmp_path):
    # RetinaFace takes any size, the FeatherFace teacher does not: both see the photo padded to 32.
    _photos(tmp_path / "photos", (70, 90))
    torch.manual_seed(0)
    result = invoke("eval", "retinaface", "--images", str(tmp_path / "photos"), "--against", str(checkpoint),
                    "--json")
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.output)["ap"] <= 1.0


def test_eval_with_labels(checkpoint, tmp_path):
    split = _labelled_split(tmp_path / "val")
    result = invoke("eval", str(checkpoint), "--images", str(split), "--labels", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert list(got) == ["ap", "images", "reference_faces"] and 0.0 <= got["ap"] <= 1.0
    assert (got["images"], got["reference_faces"]) == (2, 1)
    human = invoke("eval", str(checkpoint), "--images", str(split), "--labels")
    assert human.output.endswith(f"on 2 photos (1 labelled faces from {split / 'label.txt'})\n")


@pytest.mark.parametrize("extra, message", [
    ((), "--images needs --against TEACHER"),
    (("--labels", "--against", "x"), "--against and --labels exclude each other"),
    (("--labels", "--input-size", "320"), "--input-size does not apply with --images"),
    (("--labels", "--data", "."), "--data does not apply with --images"),
])
def test_eval_refuses_bad_combinations_in_one_line(checkpoint, tmp_path, extra, message):
    result = invoke("eval", str(checkpoint), "--images", str(tmp_path), *extra)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("option", [("--labels",), ("--against", "x")])
def test_eval_refuses_ground_truth_without_images(checkpoint, option):
    result = invoke("eval", str(checkpoint), *option)
    assert result.exit_code == 2 and "needs --images DIR" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_eval_without_a_reference_face_is_one_line(checkpoint, tmp_path):
    split = _labelled_split(tmp_path / "val")
    (split / "label.txt").write_text("# photo_0.png\n")  # no face at all
    result = invoke("eval", str(checkpoint), "--images", str(split), "--labels")
    assert result.exit_code == 2 and "label.txt" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ the real RetinaFace


def test_real_retinaface_agrees_with_itself_and_with_people(reference_dir):
    from compressor import load_model

    model = load_model(reference_dir / "retinaface_mnet025_widerface.pth")
    val = reference_dir / "real_photos" / "annotated" / "val"
    result = agreement_ap(model, model, image_files(val)[:2])
    assert result.ap == 1.0 and result.images == 2 and result.reference_faces > 0
    assert labelled_ap(model, val) == AgreementResult(ap=1.0, images=9, reference_faces=43)
