"""The held-out test split of the embedded dataset, and how runs measure on it.

- the dataset: the test split's crops are disjoint from train's and val's, its bytes are stable, it
  has its own random stream, it loads like val;
- the engine: ``compress run`` measures the baseline and the final model on it (``test_ap`` with its
  interval), never a stage, and says so in report.md; without a test split, or with
  ``--no-finetune``, no ``test_`` metric appears.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compressor.cli import cli
from compressor.record import TEST_PREFIX
from facedet.data import SPLITS, FaceDataset, generate_embedded_dataset, read_image_list, read_label_file
from facedet.data import synthetic
from facedet.data.synthetic import _split_range, plan_layouts
from facedet.training import evaluate_ap, has_split

SIZE = 96
COUNTS = {"num_train": 2, "num_val": 2, "num_test": 3}
NUM_FACE_CROPS = 100
NUM_NON_FACE_CROPS = 100 - len(synthetic.EXCLUDED_NON_FACE_CROPS)

# sha256 of test/label.txt followed by test/images/synthetic/00000.jpg, generated with seed 0 at
# SIZE with COUNTS. When a generator change moves this, the cached datasets are stale: bump
# synthetic.DATASET_VERSION (it names the cache folder) along with this constant.
TEST_SPLIT_SHA256 = "f4eaf334a47deffe8c5f28ada1a6547fee116755a815bdb4d5faffc8e54dbc01"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_embedded_dataset(tmp_path_factory.mktemp("data") / "tiny", **COUNTS, size=SIZE)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def crops_used(split: str, is_face: bool, count: int = 300) -> set[int]:
    """The crop indices, among all LFW face (or kept non-face) crops, that ``count`` planned images of ``split`` paste."""
    total = NUM_FACE_CROPS if is_face else NUM_NON_FACE_CROPS
    pool = _split_range(total, split)
    return {pool[paste.crop] for layout in plan_layouts(split, count, size=640)
            for paste in layout.pastes if paste.is_face == is_face}


# ------------------------------------------------------------ disjoint crops


@pytest.mark.parametrize("is_face", [True, False], ids=["faces", "non-faces"])
def test_splits_paste_disjoint_crops(is_face):
    """No face (or non-face) crop is pasted into two splits' images, and each split uses most of its pool."""
    used = {split: crops_used(split, is_face) for split in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not used[a] & used[b], f"{a} and {b} share crops {sorted(used[a] & used[b])}"
    total = NUM_FACE_CROPS if is_face else NUM_NON_FACE_CROPS
    for split in SPLITS:
        pool = set(_split_range(total, split))
        assert used[split] <= pool
        assert len(used[split]) >= 0.9 * len(pool), f"{split} pastes only {len(used[split])} of {len(pool)} crops"


def test_test_pool_is_the_last_15_percent():
    """The crop pools are 70/15/15 by index: faces 0-69/70-84/85-99, non-faces 0-64/65-78/79-92."""
    assert {s: _split_range(NUM_FACE_CROPS, s) for s in SPLITS} == {
        "train": range(0, 70), "val": range(70, 85), "test": range(85, 100)}
    assert {s: _split_range(NUM_NON_FACE_CROPS, s) for s in SPLITS} == {
        "train": range(0, 65), "val": range(65, 79), "test": range(79, 93)}


def test_rendered_test_pool_holds_the_test_crops():
    """The pixels the test split pastes are LFW crops 85-99 (faces) and 79-92 of the kept non-faces."""
    _, faces, non_faces = synthetic._assets()
    test_faces, test_non_faces = synthetic._split_pools("test")
    assert torch.equal(test_faces, faces[85:100])
    assert torch.equal(test_non_faces, non_faces[79:93])


@pytest.mark.parametrize("kind,total", [("face_crops", NUM_FACE_CROPS), ("non_face_crops", NUM_NON_FACE_CROPS)])
def test_manifest_crop_ranges_are_disjoint_and_cover_the_pool(data, kind, total):
    """manifest.json lists each split's [first, last] crop index; together they tile 0..total-1 without overlap."""
    manifest = json.loads((data / "manifest.json").read_text())
    ranges = manifest[kind]
    assert set(ranges) == set(SPLITS)
    indices = [i for split in SPLITS for i in range(ranges[split][0], ranges[split][1] + 1)]
    assert sorted(indices) == list(range(total))  # covers everything, each index once
    assert manifest["version"] == synthetic.DATASET_VERSION
    assert manifest["images"] == {"train": 2, "val": 2, "test": 3}


# ------------------------------------------------------------ stable bytes


def test_generation_is_byte_stable(data, tmp_path):
    """A second generation with the same arguments writes exactly the same files, byte for byte."""
    again = generate_embedded_dataset(tmp_path / "again", **COUNTS, size=SIZE)
    first, second = files(data), files(again)
    assert first.keys() == second.keys()
    assert {"test/label.txt", "test/wider_val.txt", "test/images/synthetic/00002.jpg"} <= first.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_test_split_matches_its_recorded_hash(data):
    """The test split's labels and first image hash to the recorded constant (see TEST_SPLIT_SHA256)."""
    digest = hashlib.sha256()
    digest.update((data / "test" / "label.txt").read_bytes())
    digest.update((data / "test" / "images" / "synthetic" / "00000.jpg").read_bytes())
    assert digest.hexdigest() == TEST_SPLIT_SHA256, (
        "the generator's output changed: bump synthetic.DATASET_VERSION and update TEST_SPLIT_SHA256")


def test_splits_and_seeds_draw_different_images(data, tmp_path):
    """Each split has its own random stream, and another seed gives other images."""
    first = {split: (data / split / "images" / "synthetic" / "00000.jpg").read_bytes() for split in SPLITS}
    assert len(set(first.values())) == len(SPLITS)
    assert plan_layouts("test", 4) != plan_layouts("val", 4)

    other = generate_embedded_dataset(tmp_path / "seed1", num_train=1, num_val=1, num_test=1, seed=1, size=SIZE)
    assert (other / "test" / "images" / "synthetic" / "00000.jpg").read_bytes() != first["test"]
    first_label = (data / "test" / "label.txt").read_text().split("# synthetic/00001.jpg")[0]
    assert (other / "test" / "label.txt").read_text() != first_label


def test_an_image_does_not_depend_on_the_count():
    """Image i of the test split is planned the same whatever num_test is (one stream per image)."""
    assert plan_layouts("test", 2, size=SIZE) == plan_layouts("test", 5, size=SIZE)[:2]


def test_at_least_one_test_image_is_required(tmp_path):
    """num_test=0 is refused like an empty train or val split, before anything is written."""
    with pytest.raises(ValueError, match="num_test=0"):
        generate_embedded_dataset(tmp_path / "none", num_train=1, num_val=1, num_test=0, size=SIZE)
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------ loading


def test_test_split_loads_with_valid_boxes(data):
    """FaceDataset reads test/ like val/: every image has at least one face box inside the canvas."""
    dataset = FaceDataset(data, "test")
    assert len(dataset) == 3
    for image, target in dataset:
        assert image.shape == (3, SIZE, SIZE)
        boxes = target["boxes"]
        assert len(boxes) >= 1 and (boxes >= 0).all() and (boxes <= SIZE).all()
    samples, _ = read_label_file(data / "test" / "label.txt")
    assert read_image_list(data / "test" / "wider_val.txt") == [s.image for s in samples]


def test_unknown_split_is_refused(data):
    """A split name outside SPLITS is a ValueError naming the three splits."""
    with pytest.raises(ValueError, match="split must be one of train, val, test, got 'holdout'"):
        FaceDataset(data, "holdout")
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        plan_layouts("holdout", 1)


def test_has_split(data, tmp_path):
    """has_split is true for each generated split, false once test/ is gone or for a split never written."""
    assert all(has_split(data, split) for split in SPLITS)
    copy = Path(shutil.copytree(data, tmp_path / "copy"))
    shutil.rmtree(copy / "test")
    assert not has_split(copy, "test")
    assert has_split(copy, "val")


def test_evaluate_ap_on_the_test_split(data, one_thread):
    """evaluate_ap(split="test") measures AP with its bootstrap interval over the test images."""
    from featherface import featherface_baseline

    torch.manual_seed(0)
    metrics = evaluate_ap(featherface_baseline().eval(), data, 64, split="test")
    assert set(metrics) == {"ap", "ap_low", "ap_high", "test_images"}
    assert metrics["test_images"] == 3.0
    assert 0.0 <= metrics["ap_low"] <= metrics["ap"] <= metrics["ap_high"] <= 1.0


# ------------------------------------------------------------ compress run


def recipe(tmp_path: Path, data_root: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{family: featherface}}\ninput_size: 64\nseed: 1\ndata: {{root: {data_root}}}\n"
                    "finetune: {steps: 0}\nstages:\n  - pass: unify_heads\n")
    return path


def run(tmp_path: Path, data_root: Path, *options: str) -> tuple[dict, str]:
    """``compress run`` of the one-stage recipe; its report.json and report.md."""
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(recipe(tmp_path, data_root)), "--out", str(out), "--quiet",
                                      *options], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def held_out_keys(metrics: dict) -> set[str]:
    """The metric names measured on the test split."""
    return {key for key in metrics if key.startswith(TEST_PREFIX)}


def test_run_measures_baseline_and_final_on_the_test_split(tmp_path, data):
    """test_ap, test_ap_low and test_ap_high are in the baseline's and the final metrics, in no stage's,
    and report.md shows them in a "Held-out test split" section, not in the stages table."""
    report, markdown = run(tmp_path, data)
    interval = {"test_ap", "test_ap_low", "test_ap_high"}
    for measured in (report["baseline"], report["final"]):
        metrics = measured["metrics"]
        assert interval <= held_out_keys(metrics)
        assert 0.0 <= metrics["test_ap_low"] <= metrics["test_ap"] <= metrics["test_ap_high"] <= 1.0
        assert {"ap", "ap_low", "ap_high"} <= metrics.keys()  # the validation metrics stay as they were
    assert [held_out_keys(stage["metrics"]) for stage in report["stages"]] == [set()]
    assert "ap" in report["stages"][0]["metrics"]
    # unify_heads is lossless and nothing is finetuned: the final model measures as the baseline does.
    assert report["final"]["metrics"]["test_ap"] == pytest.approx(report["baseline"]["metrics"]["test_ap"], abs=1e-6)

    section = markdown.split("## Held-out test split\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ")]
    assert rows[0] == ["model", "params", "test_ap"]
    assert [row[0] for row in rows[2:]] == ["baseline", "final"]
    assert "Drop in test_ap: " in section
    stages = markdown.split("## Stages\n", 1)[1].split("\n## ", 1)[0]
    assert "test_ap" not in stages  # the stages table holds validation metrics only


def test_run_without_a_test_split_records_no_test_metric(tmp_path, data):
    """A data root without test/ runs as before: no test_ key anywhere, no test section."""
    root = Path(shutil.copytree(data, tmp_path / "no_test"))
    shutil.rmtree(root / "test")
    report, markdown = run(tmp_path, root)
    assert held_out_keys(report["baseline"]["metrics"]) == set() and held_out_keys(report["final"]["metrics"]) == set()
    assert "ap" in report["final"]["metrics"]
    assert "Held-out test split" not in markdown


def test_run_without_finetuning_measures_nothing_on_the_test_split(tmp_path, data):
    """--no-finetune evaluates nothing, so no test_ metric either, even though the data has a test split."""
    report, markdown = run(tmp_path, data, "--no-finetune")
    assert held_out_keys(report["baseline"]["metrics"]) == set() and held_out_keys(report["final"]["metrics"]) == set()
    assert "Held-out test split" not in markdown
