"""Tests of facedet.data: label reading, the Dataset, augmentation and
the embedded dataset generator."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.io import ImageReadMode, decode_image

from facedet.data import synthetic
from facedet.data.collate import collate
from facedet.data.synthetic import (
    ensure_embedded_dataset,
    generate_embedded_dataset,
    plan_layouts,
    save_sample_grid,
)
from facedet.data.transforms import (
    EvalTransform,
    TrainTransform,
    horizontal_flip,
    pad_to_square,
    random_square_crop,
)
from facedet.data.widerface import FaceDataset, read_image_list, read_label_file

UNANNOTATED = " ".join(["-1.0"] * 16)

LABELS = f"""\
# event/one.jpg
10 20 30 40 12 25 0.0 30 25 0.0 20 35 1.0 14 45 0.0 28 45 0.0 0.9
5 5 0 10 {UNANNOTATED}
1 2 3
1 2 3 x {UNANNOTATED}
# /event/two.jpg
50 60 10 10 {UNANNOTATED}
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------ label reader


def test_read_label_file_parses_faces_and_reports_bad_lines(tmp_path):
    samples, warnings = read_label_file(_write(tmp_path / "label.txt", LABELS))

    assert [s.image for s in samples] == ["event/one.jpg", "event/two.jpg"]
    first, second = samples
    assert first.boxes.tolist() == [[10, 20, 40, 60]]
    assert first.landmarks.tolist() == [[12, 25, 30, 25, 20, 35, 14, 45, 28, 45]]
    assert first.landmark_valid.tolist() == [True]
    assert second.boxes.tolist() == [[50, 60, 60, 70]]
    assert second.landmark_valid.tolist() == [False]
    assert (second.landmarks == -1).all()

    assert len(warnings) == 3
    assert warnings[0].startswith("label.txt:3:") and "size" in warnings[0]
    assert warnings[1].startswith("label.txt:4:") and "got 3" in warnings[1]
    assert warnings[2].startswith("label.txt:5:") and "non-numeric" in warnings[2]


def test_read_label_file_rejects_empty_and_unusable_files(tmp_path):
    with pytest.raises(ValueError, match="empty.txt"):
        read_label_file(_write(tmp_path / "empty.txt", ""))
    with pytest.raises(ValueError, match="no usable face"):
        read_label_file(_write(tmp_path / "bad.txt", "# a.jpg\n1 2 0 0\n"))


def test_read_image_list_strips_leading_slash(tmp_path):
    listing = _write(tmp_path / "wider_val.txt", "/0--Parade/a.jpg\n\nb.jpg\n")
    assert read_image_list(listing) == ["0--Parade/a.jpg", "b.jpg"]


# ----------------------------------------------------------- augmentation


def _face_target(boxes, landmarks=None):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    if landmarks is None:
        landmarks = torch.full((len(boxes), 10), -1.0)
        valid = torch.zeros(len(boxes), dtype=torch.bool)
    else:
        landmarks = torch.tensor(landmarks, dtype=torch.float32)
        valid = torch.ones(len(boxes), dtype=torch.bool)
    return {"boxes": boxes, "landmarks": landmarks, "landmark_valid": valid}


def test_flip_mirrors_coordinates_and_swaps_left_right_points():
    image = torch.arange(3 * 10 * 20, dtype=torch.uint8).reshape(3, 10, 20)
    # left eye, right eye, nose, left mouth, right mouth
    target = _face_target([[2, 3, 8, 9]], [[3, 4, 7, 4, 5, 6, 4, 8, 6, 8]])

    flipped_image, flipped = horizontal_flip(image, target)

    assert torch.equal(flipped_image[..., 0], image[..., -1])
    assert flipped["boxes"].tolist() == [[12, 3, 18, 9]]
    # Old right eye (7,4) mirrors to x=13 and becomes the new left eye.
    assert flipped["landmarks"].tolist() == [[13, 4, 17, 4, 15, 6, 14, 8, 16, 8]]
    again_image, again = horizontal_flip(flipped_image, flipped)
    assert torch.equal(again_image, image) and torch.equal(again["landmarks"], target["landmarks"])


def test_flip_leaves_unannotated_landmarks_alone():
    _, flipped = horizontal_flip(torch.zeros(3, 10, 20, dtype=torch.uint8), _face_target([[2, 3, 8, 9]]))
    assert (flipped["landmarks"] == -1).all()


def _coordinate_image(size: int) -> torch.Tensor:
    # Channel 0 holds x, channel 1 holds y: a crop reveals its own offset.
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack((xs, ys, torch.zeros_like(xs))).to(torch.uint8)


def test_crop_keeps_faces_with_centre_inside_and_clips_them():
    boxes = [[5, 5, 15, 15], [85, 85, 95, 95], [30, 40, 70, 60], [45, 0, 60, 12]]
    target = _face_target(boxes, [[x1, y1] * 5 for x1, y1, _, _ in boxes])
    original = torch.tensor(boxes, dtype=torch.float32)
    centres = (original[:, :2] + original[:, 2:]) / 2
    image = _coordinate_image(100)

    for seed in range(25):
        generator = torch.Generator().manual_seed(seed)
        cropped, kept, did_crop = random_square_crop(image, target, scales=(0.5,), generator=generator)
        assert did_crop and cropped.shape == (3, 50, 50)
        offset = torch.tensor([cropped[0, 0, 0], cropped[1, 0, 0]], dtype=torch.float32)
        inside = ((centres > offset) & (centres < offset + 50)).all(dim=1)
        assert inside.any()
        expected = (original[inside] - offset.repeat(2)).clamp(0, 50)
        assert torch.equal(kept["boxes"], expected)
        assert torch.equal(kept["landmarks"][:, :2], original[inside, :2] - offset)


def test_crop_gives_up_and_keeps_the_image():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    target = _face_target([[1, 1, 5, 5]])
    same, kept, did_crop = random_square_crop(image, target, attempts=0)
    assert not did_crop and same is image and kept is target


def test_pad_to_square_uses_the_mean_colour():
    padded, _ = pad_to_square(torch.zeros(3, 4, 6, dtype=torch.uint8), _face_target([[0, 0, 1, 1]]))
    assert padded.shape == (3, 6, 6)
    assert padded[:, 5, 0].tolist() == [123, 117, 104]


# ------------------------------------------------------- embedded dataset


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate_embedded_dataset(tmp_path_factory.mktemp("tiny"), num_train=4, num_val=2, num_test=2, size=160)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_byte_identical(tiny_root, tmp_path):
    again = generate_embedded_dataset(tmp_path / "again", num_train=4, num_val=2, num_test=2, size=160)
    first, second = _files(tiny_root), _files(again)
    assert first.keys() == second.keys()
    assert first == second
    assert {"train/label.txt", "val/label.txt", "val/wider_val.txt", "test/label.txt", "test/wider_val.txt",
            "manifest.json"} <= first.keys()


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_generated_split_loads_with_valid_boxes(tiny_root, split):
    dataset = FaceDataset(tiny_root, split)
    assert len(dataset) == {"train": 4, "val": 2, "test": 2}[split]
    for image, target in dataset:
        assert image.dtype == torch.uint8 and image.shape == (3, 160, 160)
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        boxes = target["boxes"]
        assert len(boxes) >= 1
        assert (boxes >= 0).all() and (boxes <= 160).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()
        assert not target["landmark_valid"].any() and (target["landmarks"] == -1).all()


@pytest.mark.parametrize("split", ["val", "test"])
def test_val_image_list_matches_labels(tiny_root, split):
    samples, _ = read_label_file(tiny_root / split / "label.txt")
    assert read_image_list(tiny_root / split / "wider_val.txt") == [s.image for s in samples]


def test_planned_faces_cover_all_prior_scales():
    layouts = plan_layouts("train", 400, seed=0, size=640)
    assert all(layout.face_boxes() for layout in layouts)
    boxes = torch.tensor([b for layout in layouts for b in layout.face_boxes()], dtype=torch.float32)
    heights = boxes[:, 3] - boxes[:, 1]
    assert heights.min() < 16 and heights.max() > 300
    for low, high in [(16, 32), (64, 128), (256, 512)]:
        share = ((heights >= low) & (heights < high)).float().mean()
        assert share > 0.05, f"only {share:.1%} of faces in {low}-{high} px"
    assert (boxes >= 0).all() and (boxes <= 640).all()


def test_planned_pastes_never_overlap():
    for layout in plan_layouts("val", 50, seed=3, size=640):
        boxes = [p.box for p in layout.pastes]
        for i, (ax1, ay1, ax2, ay2) in enumerate(boxes):
            for bx1, by1, bx2, by2 in boxes[i + 1 :]:
                assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1


def test_ensure_generates_once_atomically(tmp_path, monkeypatch):
    real = synthetic.generate_embedded_dataset
    monkeypatch.setattr(synthetic, "generate_embedded_dataset", lambda root: real(root, 2, 1, 1, size=96))
    monkeypatch.setenv("COMPRESSOR_DATA", str(tmp_path))

    root = ensure_embedded_dataset()
    assert root == tmp_path / synthetic.DATASET_VERSION
    assert (root / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no staging dir left

    monkeypatch.setattr(synthetic, "generate_embedded_dataset", lambda root: pytest.fail("regenerated"))
    assert ensure_embedded_dataset() == root


def test_sample_grid_is_written(tiny_root, tmp_path):
    path = save_sample_grid(tiny_root, tmp_path / "grid.png", n=4, tile=64, nrow=2)
    grid = decode_image(str(path), mode=ImageReadMode.RGB)
    assert grid.shape == (3, 2 * 64 + 3 * 4, 2 * 64 + 3 * 4)


# ------------------------------------------------ dataset, transforms, batches


def test_corrupt_image_is_skipped_and_counted(tiny_root, tmp_path, caplog):
    root = Path(shutil.copytree(tiny_root, tmp_path / "copy"))
    samples, _ = read_label_file(root / "train" / "label.txt")
    bad = root / "train" / "images" / samples[1].image
    bad.write_bytes(b"not an image at all")

    with caplog.at_level(logging.WARNING, logger="facedet.data.widerface"):
        dataset = FaceDataset(root, "train")
    assert len(dataset) == 3 and dataset.skipped == [bad]
    assert any(bad.name in record.getMessage() for record in caplog.records)

    lazy = FaceDataset(root, "train", verify=False)
    assert len(lazy) == 4
    image, _ = lazy[1]  # falls through to the next readable image
    assert torch.equal(image, decode_image(str(root / "train" / "images" / samples[2].image), mode=ImageReadMode.RGB))
    assert lazy.skipped == [bad]

    for sample in samples:
        (root / "train" / "images" / sample.image).write_bytes(b"broken")
    with pytest.raises(RuntimeError, match="could be decoded"):
        FaceDataset(root, "train")


def test_boxes_outside_the_image_are_clipped_or_dropped(tiny_root, tmp_path):
    root = tmp_path / "clip"
    samples, _ = read_label_file(tiny_root / "train" / "label.txt")
    image_dir = root / "train" / "images"
    image_dir.mkdir(parents=True)
    shutil.copy(tiny_root / "train" / "images" / samples[0].image, image_dir / "a.jpg")
    _write(root / "train" / "label.txt", f"# a.jpg\n-10 150 30 20 {UNANNOTATED}\n200 10 5 5 {UNANNOTATED}\n")

    _, target = FaceDataset(root, "train")[0]
    assert target["boxes"].tolist() == [[0, 150, 20, 160]]
    assert target["landmark_valid"].tolist() == [False]


def test_train_transform_is_seeded_and_normalised(tiny_root):
    def run(seed):
        dataset = FaceDataset(tiny_root, "train", transform=TrainTransform(128, generator=torch.Generator().manual_seed(seed)))
        return [dataset[i] for i in range(len(dataset))]

    first, second = run(7), run(7)
    for (image, target), (image2, target2) in zip(first, second):
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
        assert torch.equal(image, image2) and torch.equal(target["boxes"], target2["boxes"])
        assert len(target["boxes"]) >= 1
        assert (target["boxes"] >= 0).all() and (target["boxes"] <= 1).all()
        assert target["labels"].tolist() == [1] * len(target["boxes"])
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, run(8)))

    images, targets = collate(first)
    assert images.shape == (4, 3, 128, 128) and len(targets) == 4


def test_eval_transform_pads_resizes_and_reports_scale():
    image = torch.full((3, 50, 100), 200, dtype=torch.uint8)
    target = _face_target([[10, 10, 30, 40]], [[12, 14, 26, 14, 20, 24, 14, 32, 26, 32]])

    network_input, out = EvalTransform(200)(image, target)

    assert network_input.shape == (3, 200, 200)
    # Bottom padding is the mean colour, i.e. exactly 0 in network space.
    assert network_input[:, 150:, :].abs().max() == 0
    assert torch.allclose(out["boxes"], torch.tensor([[0.1, 0.1, 0.3, 0.4]]))
    assert torch.allclose(out["landmarks"][0, :2], torch.tensor([0.12, 0.14]))
    assert out["orig_size"].tolist() == [50, 100] and float(out["scale"]) == 2.0
