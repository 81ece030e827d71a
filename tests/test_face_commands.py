"""The face-detector commands (any family with the RetinaFace output contract): eval-widerface, eval, detect,
sensitivity."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from compressor.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_eval_widerface_reproduces_the_reference(reference_dir, tmp_path):
    with tarfile.open(reference_dir / "widerface_eval" / "predictions_seed0.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    expected = json.loads((reference_dir / "widerface_eval" / "expected_seed0.json").read_text())
    result = invoke("eval-widerface", "--pred", str(tmp_path / "pred0"),
                    "--gt", str(reference_dir / "widerface_eval" / "ground_truth"), "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    for setting in ("easy", "medium", "hard"):
        assert abs(got[setting] - expected[setting]) < 1e-6


def test_eval_widerface_bad_prediction_file(reference_dir, tmp_path):
    (tmp_path / "event").mkdir()
    (tmp_path / "event" / "img.txt").write_text("img\nthree\n")
    result = invoke("eval-widerface", "--pred", str(tmp_path), "--gt", str(reference_dir / "widerface_eval" / "ground_truth"))
    assert result.exit_code == 2 and "img.txt" in result.output and "line 2" in result.output


def test_eval_writes_predictions_and_reports_ap(small_embedded, checkpoint, tmp_path):
    pred = tmp_path / "pred"
    result = invoke("eval", str(checkpoint), "--data", str(small_embedded), "--input-size", "64", "--save-predictions", str(pred), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert 0.0 <= metrics["ap"] <= 1.0 and metrics["val_images"] == 4
    files = sorted(pred.rglob("*.txt"))
    assert len(files) == 4
    from facedet.evaluation import read_prediction_file

    name, boxes = read_prediction_file(files[0])
    assert name == files[0].stem and boxes.shape[1] == 5


def test_detect_draws_an_annotated_png(small_embedded, checkpoint, tmp_path):
    image = next((small_embedded / "val" / "images").rglob("*.jpg"))
    out = tmp_path / "annotated.png"
    result = invoke("detect", str(checkpoint), str(image), "--out", str(out), "--threshold", "0.0", "--json")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == Image.open(image).size
    assert isinstance(json.loads(result.output), list)


@pytest.mark.parametrize("family_model, network_size", [("retinaface", (70, 90)), ("featherface", (96, 96))])
def test_detect_runs_at_the_image_size_padding_only_when_the_family_needs_it(family_model, network_size, checkpoint,
                                                                             tmp_path, monkeypatch):
    import facedet.detect

    seen, real_detect = [], facedet.detect.detect

    def spy(model, images, **kwargs):
        seen.append((tuple(images.shape[-2:]), kwargs["image_sizes"]))
        return real_detect(model, images, **kwargs)

    monkeypatch.setattr(facedet.detect, "detect", spy)
    image = tmp_path / "photo.png"
    Image.new("RGB", (90, 70), (90, 120, 150)).save(image)
    out = tmp_path / "annotated.png"
    model = "retinaface" if family_model == "retinaface" else str(checkpoint)
    result = invoke("detect", model, str(image), "--out", str(out), "--threshold", "0.0", "--json")
    assert result.exit_code == 0, result.output
    assert seen == [(network_size, [(70, 90)])]
    assert Image.open(out).size == (90, 70)
    boxes = [face["box"] for face in json.loads(result.output)]
    assert boxes and all(0 <= x1 < x2 <= 90 and 0 <= y1 < y2 <= 70 for x1, y1, x2, y2 in boxes)


def test_detect_real_retinaface_on_a_real_photo(reference_dir, tmp_path):
    photo = reference_dir / "real_photos" / "annotated" / "val" / "images" / "2008_002470.jpg"
    out = tmp_path / "annotated.png"
    result = invoke("detect", str(reference_dir / "retinaface_mnet025_widerface.pth"), str(photo), "--out", str(out),
                    "--json")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == Image.open(photo).size
    faces = json.loads(result.output)
    assert faces and all(face["score"] >= 0.5 for face in faces)
    assert Image.open(out).tobytes() != Image.open(photo).convert("RGB").tobytes()  # boxes drawn


def test_detect_on_a_file_that_is_not_an_image(checkpoint, tmp_path):
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not an image")
    result = invoke("detect", str(checkpoint), str(bogus), "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "notes.jpg" in result.output and "Traceback" not in result.output


def test_sensitivity_table_and_files(checkpoint, tmp_path):
    result = invoke("sensitivity", str(checkpoint), "--input-size", "64", "--ratios", "0.25",
                    "--components", "ssh,channel_shuffle", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["component"], r["ratio"]) for r in rows] == [("ssh", 0.25), ("channel_shuffle", 0.25)]
    assert all(r["removed"] > 0 and r["params"] == 592_371 - r["removed"] for r in rows)
    assert (tmp_path / "sensitivity.png").is_file() and (tmp_path / "sensitivity.json").is_file()
    bad = invoke("sensitivity", str(checkpoint), "--components", "heads")
    assert bad.exit_code == 2 and "heads" in bad.output


def test_sensitivity_opens_a_recipe_like_run_does(tmp_path):
    """The recipe's plugins are loaded and its stages checked, through the same path as `compress run`."""
    toy = Path(__file__).parent / "fixtures" / "toy_passes.py"
    recipe = tmp_path / "r.yaml"
    # Two families are registered, so the recipe names its own.
    recipe.write_text(f"plugins: [{toy}]\nmodel: {{family: featherface}}\ninput_size: 64\n"
                      "stages:\n  - pass: scale_heads\n")
    result = invoke("sensitivity", str(recipe), "--ratios", "0.25", "--components", "cbam", "--json")
    assert result.exit_code == 0, result.output
    assert [r["component"] for r in json.loads(result.output)] == ["cbam"]
    recipe.write_text("model: {family: featherface}\ninput_size: 64\nstages:\n  - pass: scale_heads\n")  # no plugin
    result = invoke("sensitivity", str(recipe), "--ratios", "0.25", "--components", "cbam")
    assert result.exit_code == 2 and "stages[0].pass: unknown pass 'scale_heads'" in result.output
