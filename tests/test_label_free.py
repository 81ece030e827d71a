"""Finetuning without labels (data.images), a teacher of another family, measuring by agreement (data.eval_images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from compressor import load_model
from compressor.checkpoint import save_checkpoint
from compressor.cli import cli
from compressor.errors import UsageError
from compressor.recipe import TrainConfig
from compressor.train import train
from compressor_plugins import face_family
from facedet.agreement import AgreementResult
from facedet.data import DataError, unlabelled_batches

TOY = Path(__file__).parent / "fixtures" / "toy_passes.py"
FILES = 3  # in the `photos` fixture


pytestmark = pytest.mark.usefixtures("one_thread")


def write_image(path: Path, height: int, width: int, seed: int, gray: bool = False) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width) if gray else (height, width, 3),
                                                  dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture()
def photos(tmp_path) -> Path:
    """Three photographs of mixed sizes and formats, one smaller than a 64-pixel window, one in a subfolder."""
    folder = tmp_path / "photos"
    write_image(folder / "small.png", 20, 30, seed=1)
    write_image(folder / "wide.jpg", 70, 150, seed=2)
    write_image(folder / "more" / "gray.png", 90, 60, seed=3, gray=True)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture()
def fake_agreement(monkeypatch) -> list[dict]:
    """agreement_ap as a stand-in, for numbers known in advance: 1.0 for a model against itself, 0.75 otherwise."""
    calls: list[dict] = []

    def agreement_ap(model, reference, files, size_multiple, device):
        calls.append({"same": model is reference, "files": files, "size_multiple": size_multiple})
        return AgreementResult(ap=1.0 if model is reference else 0.75, images=len(files), reference_faces=7)

    monkeypatch.setattr(face_family, "agreement_ap", agreement_ap)
    return calls


@pytest.fixture(scope="module")
def retinaface_checkpoint(tmp_path_factory) -> Path:
    """A RetinaFace baseline (random weights, seeded) saved by the engine's own saver."""
    from compressor_plugins.retinaface_family import FAMILY
    from retinaface.model import retinaface_mnet025

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "retina.pt"
    save_checkpoint(path, retinaface_mnet025().eval(), FAMILY)
    return path


def recipe(tmp_path: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"plugins: [{TOY}]\ninput_size: 64\nseed: 1\n{body}")
    return path


def invoke(*args: str):
    quiet = ["--quiet"] if args[0] in ("run", "train") else []
    return CliRunner().invoke(cli, [*args, *quiet], catch_exceptions=False)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


# ------------------------------------------------------------------ the data source


def test_unlabelled_batches_are_seeded_views_of_mixed_images(photos):
    first = unlabelled_batches(photos, 64, batch_size=5, seed=4)  # more samples than images: other windows
    images, targets = next(first)
    assert images.shape == (5, 3, 64, 64) and images.dtype == torch.float32 and targets is None
    again = unlabelled_batches(photos, 64, batch_size=5, seed=4)
    other = unlabelled_batches(photos, 64, batch_size=5, seed=5)
    assert torch.equal(next(again)[0], images) and not torch.equal(next(other)[0], images)
    assert torch.equal(next(again)[0], next(first)[0])
    # Ranks take their own stride of one stream: different samples, the same shapes.
    rank0 = next(unlabelled_batches(photos, 64, 2, seed=4, rank=0, world_size=2))[0]
    rank1 = next(unlabelled_batches(photos, 64, 2, seed=4, rank=1, world_size=2))[0]
    assert rank0.shape == rank1.shape == (2, 3, 64, 64) and not torch.equal(rank0, rank1)


def test_a_photograph_smaller_than_the_window_is_padded_with_the_mean_colour(tmp_path):
    write_image(tmp_path / "tiny" / "a.jpg", 20, 20, seed=0)
    images, _ = next(unlabelled_batches(tmp_path / "tiny", 64, batch_size=6, seed=0))
    # Scaled by at most 1.4 the photograph covers at most 28x28 pixels at the top left; the rest is 0 (the mean).
    assert images[:, :, 28:, :].abs().max() == 0 and images[:, :, :, 28:].abs().max() == 0
    assert images[:, :, :10, :10].abs().amax(dim=(1, 2, 3)).min() > 0


def test_an_empty_folder_or_an_unreadable_image_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no image files"):
        unlabelled_batches(tmp_path / "empty", 64, 2, seed=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        unlabelled_batches(tmp_path / "bad", 64, 2, seed=0)


def test_training_on_batches_without_labels_needs_a_teacher():
    from compressor_plugins.retinaface_family import FAMILY

    batches = iter([(torch.zeros(2, 3, 64, 64), None)])
    with pytest.raises(UsageError, match="no labels and there is no teacher"):
        train(FAMILY.baseline(), FAMILY, TrainConfig(steps=1), batches, device=torch.device("cpu"))


def test_agreement_pads_photos_to_the_familys_multiple(photos, fake_agreement):
    from compressor_plugins.featherface_family import FAMILY as FEATHERFACE
    from compressor_plugins.retinaface_family import FAMILY as RETINAFACE

    metrics = RETINAFACE.agreement(RETINAFACE.baseline(), RETINAFACE.baseline(), photos)
    assert list(metrics) == ["agreement_ap", "images", "reference_faces"] and metrics["agreement_ap"] == 0.75
    FEATHERFACE.agreement(FEATHERFACE.baseline(), FEATHERFACE.baseline(), photos)
    # RetinaFace takes any size, FeatherFace multiples of 32.
    assert [call["size_multiple"] for call in fake_agreement] == [1, 32]
    assert len(fake_agreement[0]["files"]) == FILES


# ------------------------------------------------------------------ compress run


def test_run_finetunes_from_images_without_labels_and_measures_agreement(tmp_path, photos, fake_agreement,
                                                                        retinaface_checkpoint):
    path = recipe(tmp_path, f"model: {{family: retinaface, checkpoint: {retinaface_checkpoint}}}\n"
                            "data: {images: photos, eval_images: photos}\n"
                            "finetune: {steps: 2, batch_size: 2, lr: 0.001}\n"
                            "stages:\n  - pass: identity\n"
                            "budget: {max_accuracy_drop: 0.3}\n")
    out = tmp_path / "run"
    result = invoke("run", str(path), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "agreement_ap"
    assert report["baseline"]["metrics"] == {"agreement_ap": 1.0, "images": float(FILES), "reference_faces": 7.0}
    stage = report["stages"][0]
    assert list(stage["metrics"])[0] == "agreement_ap" and stage["metrics"]["agreement_ap"] == 0.75
    assert stage["finetune"]["steps"] == 2 and stage["finetune"]["labels"] == "none"
    assert stage["finetune"]["teacher"] == "previous"
    assert report["data"]["images"] == {"path": str(photos), "files": FILES}
    assert report["budget_check"]["accuracy_drop"] == 0.25 and report["budget_check"]["ok"] is True
    # The starting model against itself, then each stage against the starting model; the family's size multiple.
    assert [call["same"] for call in fake_agreement] == [True, False]
    assert {call["size_multiple"] for call in fake_agreement} == {1} and len(fake_agreement[0]["files"]) == FILES
    before, after = load_model(retinaface_checkpoint).state_dict(), load_model(out).state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    markdown = (out / "report.md").read_text()
    assert f"- finetuning data: unlabelled images: {photos} ({FILES} files), distillation only" in markdown
    assert f"- metric: agreement_ap, agreement with the starting model on unlabelled images: {photos}" in markdown
    assert "2 steps from the previous model, distillation only (labels: none)" in markdown
    assert "| agreement_ap |" in markdown and "accuracy drop (agreement_ap)" in markdown


def test_a_teacher_of_another_family_teaches_a_featherface(tmp_path, photos, fake_agreement, retinaface_checkpoint):
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "retina.pt").write_bytes(retinaface_checkpoint.read_bytes())
    path = recipe(tmp_path, "model: {family: featherface}\ndata: {images: photos, eval_images: photos}\n"
                            "finetune: {steps: 2, batch_size: 2, lr: 0.001, teacher: teachers/retina.pt}\n"
                            "stages:\n  - pass: identity\n")
    out = tmp_path / "run"
    result = invoke("run", str(path), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    finetune = report["stages"][0]["finetune"]
    assert finetune["teacher"] == "retina.pt" and finetune["labels"] == "none" and finetune["steps"] == 2
    assert report["recipe"]["finetune"]["teacher"] == str(tmp_path / "teachers" / "retina.pt")
    assert {call["size_multiple"] for call in fake_agreement} == {32}
    assert "2 steps from teacher `retina.pt`, distillation only (labels: none)" in (out / "report.md").read_text()
    # --resume compares the new fields too.
    (tmp_path / "others").mkdir()
    write_image(tmp_path / "others" / "x.png", 40, 40, seed=9)
    resumed = invoke("run", str(path), "--out", str(out), "--resume", "--set", "data.images=others")
    assert "the recipe differs" in one_line_error(resumed) and "data.images" in resumed.output


def test_a_teacher_with_other_outputs_is_refused_naming_both_contracts(tmp_path, photos):
    from compressor_plugins.retinaface_family import FAMILY
    from retinaface.model import retinaface_mnet025

    save_checkpoint(tmp_path / "three_anchors.pt", retinaface_mnet025(num_anchors=3).eval(), FAMILY)
    path = recipe(tmp_path, "model: {family: featherface}\ndata: {images: photos}\n"
                            "finetune: {steps: 1, batch_size: 2}\n"
                            "stages:\n  - pass: identity\n    finetune: {teacher: three_anchors.pt}\n")
    line = one_line_error(invoke("run", str(path), "--out", str(tmp_path / "run")))
    assert "stages[0].finetune.teacher" in line and "three_anchors.pt (retinaface)" in line
    # 64x64: 168 priors at two anchors a cell, 252 at three.
    assert "teacher output[0] (2, 252, 4) float32" in line and "student output[0] (2, 168, 4) float32" in line


# ------------------------------------------------------------------ refused when the recipe opens


@pytest.mark.parametrize(("body", "expected"), [
    ("data: {images: photos}\nfinetune: {steps: 1, teacher: none}\nstages:\n  - pass: identity\n",
     "finetune.teacher: none, but data.images has no labels: nothing to learn from"),
    ("data: {images: photos}\nstages:\n  - pass: identity\n    finetune: {steps: 1, teacher: none}\n",
     "stages[0].finetune.teacher: none, but data.images has no labels"),
    ("data: {images: photos}\nfinetune: {steps: 1, distill_weight: 0}\nstages:\n  - pass: identity\n",
     "finetune.distill_weight: 0, but data.images has no labels"),
    ("data: {images: missing}\nstages:\n  - pass: identity\n", "data.images: no such folder: "),
    ("data: {images: empty}\nstages:\n  - pass: identity\n", "data.images: "),
    ("data: {eval_images: empty}\nstages:\n  - pass: identity\n", "data.eval_images: "),
    ("finetune: {teacher: nowhere.pt}\nstages:\n  - pass: identity\n", "finetune.teacher: no such file or run folder"),
    ("finetune: {teacher: ''}\nstages:\n  - pass: identity\n",
     "finetune.teacher (line 5): expected previous, baseline, none or a checkpoint path"),
])
def test_label_free_mistakes_are_one_line_naming_the_field(tmp_path, photos, body, expected):
    (tmp_path / "empty").mkdir()
    line = one_line_error(invoke("validate", str(recipe(tmp_path, "model: {family: retinaface}\n" + body))))
    assert expected in line
    if "empty" in body:
        assert "no image files" in line and str(tmp_path / "empty") in line


# ------------------------------------------------------------------ compress train


def test_train_learns_from_a_teacher_on_images_without_labels(tmp_path, photos, fake_agreement,
                                                              retinaface_checkpoint):
    body = (f"model: {{family: featherface}}\ndata: {{images: photos, eval_images: photos}}\n"
            f"train: {{steps: 2, batch_size: 2, teacher: {retinaface_checkpoint}, checkpoint_every: 1}}\n")
    out = tmp_path / "train"
    result = invoke("train", str(recipe(tmp_path, body)), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["labels"] == "none" and report["teacher"] == "retina.pt" and report["steps"] == 2
    assert report["metrics"]["agreement_ap"] == 0.75 and fake_agreement[0]["same"] is False
    assert report["data"]["images"]["files"] == FILES
    # Without a teacher checkpoint there is nothing to learn from.
    body = "model: {family: featherface}\ndata: {images: photos}\ntrain: {steps: 2}\n"
    line = one_line_error(invoke("train", str(recipe(tmp_path, body, "words.yaml")), "--out", str(tmp_path / "x")))
    assert "train.teacher: previous, but data.images has no labels" in line


def test_the_real_agreement_of_the_starting_model_with_itself_is_one(tmp_path, photos):
    path = recipe(tmp_path, "model: {family: retinaface}\ndata: {eval_images: photos}\n"
                            "finetune: {steps: 0}\nstages:\n  - pass: identity\n")
    result = invoke("run", str(path), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metric"] == "agreement_ap" and report["baseline"]["metrics"]["agreement_ap"] == 1.0
