"""int8 post-training quantization of exported models: the float-layer rule, the artifact, calibration, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.checkpoint import LoadedModel, open_model
from compressor.errors import UsageError
from compressor.plugins import load_registry
from compressor.quantize import FLOAT_BELOW_CHANNELS, export_int8, float_nodes, quantize_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

onnx = pytest.importorskip("onnx")
SIZE = (64, 64)


def _conv(name: str, inputs: str, output: str, weight: str, groups: int = 1):
    return onnx.helper.make_node("Conv", [inputs, weight], [output], name=name, group=groups, pads=[1, 1, 1, 1])


def _graph_with_convs() -> object:
    """input(3) -> conv 3->8 -> LeakyRelu -> conv 8->32 -> Relu -> depthwise 32 -> conv 32->32 -> output."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper

    def weight(name: str, *shape: int):
        return numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)

    nodes = [
        _conv("stem", "input", "a", "w_stem"),
        helper.make_node("LeakyRelu", ["a"], ["b"], name="stem_act", alpha=0.1),
        _conv("thin_to_wide", "b", "c", "w_wide"),
        helper.make_node("Relu", ["c"], ["d"], name="wide_act"),
        _conv("depthwise", "d", "e", "w_dw", groups=32),
        _conv("pointwise", "e", "output", "w_pw"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)],
        [weight("w_stem", 8, 3, 3, 3), weight("w_wide", 32, 8, 3, 3), weight("w_dw", 32, 1, 3, 3),
         weight("w_pw", 32, 32, 3, 3)])
    return helper.make_model(graph)


def test_float_rule_keeps_thin_convs_and_their_activations_float():
    keep, float_convs, convs = float_nodes(_graph_with_convs(), FLOAT_BELOW_CHANNELS)
    # 3 -> 8 and 8 -> 32 have fewer than 16 channels on one side; the depthwise and pointwise 32s do not.
    assert keep == ["stem", "stem_act", "thin_to_wide", "wide_act"]
    assert (float_convs, convs) == (2, 4)
    assert float_nodes(_graph_with_convs(), 3) == ([], 0, 4)


@pytest.fixture(scope="module")
def retinaface() -> LoadedModel:
    """RetinaFace-MobileNet0.25 with seeded random weights and BN statistics that are not the identity."""
    registry = load_registry()
    family = registry.families["retinaface"]
    torch.manual_seed(0)
    model = family.baseline().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return LoadedModel(family, model, "retinaface (random weights)")


@pytest.fixture(scope="module")
def calibration(retinaface: LoadedModel) -> list[torch.Tensor]:
    return [retinaface.family.example_input(*SIZE, batch_size=1, seed=seed) for seed in range(4)]


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, retinaface: LoadedModel, calibration) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("int8")
    out = folder / "model.int8.onnx"
    record = export_int8(retinaface, out, input_size=SIZE, dynamic=False, calibration=calibration,
                         calibration_from="four example inputs", float_out=folder / "model.onnx")
    return out, record


def test_int8_export_writes_a_model_its_record_and_the_float_model(int8_export):
    out, record = int8_export
    assert out.is_file() and (out.parent / "model.onnx").is_file()
    saved = json.loads((out.parent / "model.int8.onnx.json").read_text())
    assert saved["quantization"]["calibration_images"] == 4
    assert saved["float_model"]["max_abs_diff"]["boxes"] < 1e-4
    assert record.quantization.bytes == out.stat().st_size
    assert record.quantization.quantized_convs > 0 and record.quantization.float_convs > 0
    # Only the scratch folder's leftovers would show here.
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.int8.onnx", "model.int8.onnx.json",
                                                             "model.onnx", "model.onnx.json"]


def test_int8_model_opens_with_its_family_and_follows_the_float_model(int8_export, retinaface, calibration):
    out, _ = int8_export
    loaded = open_model(out, allow_onnx=True)
    assert loaded.family.name == "retinaface"
    assert loaded.model.metadata["compressor.precision"] == "int8"
    assert json.loads(loaded.model.metadata["compressor.quantization"])["calibration_images"] == 4
    float_model = open_model(out.parent / "model.onnx", allow_onnx=True)
    with torch.no_grad():
        int8_scores = loaded.model(calibration[0])[1].softmax(-1)[..., 1]
        float_scores = float_model.model(calibration[0])[1].softmax(-1)[..., 1]
    assert torch.isfinite(int8_scores).all()
    # Quantized, not identical: but it must follow the float model closely on the data it was calibrated on.
    assert not torch.equal(int8_scores, float_scores)
    assert (int8_scores - float_scores).abs().mean() < 0.05


def test_quantize_needs_calibration_images(int8_export, tmp_path):
    out, _ = int8_export
    with pytest.raises(UsageError, match="at least one calibration image"):
        quantize_onnx(out.parent / "model.onnx", tmp_path / "x.onnx", [], calibration_from="nothing")
    assert not (tmp_path / "x.onnx").exists()


def test_quantize_into_an_unwritable_place_leaves_nothing(int8_export, tmp_path, calibration):
    out, _ = int8_export
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="cannot write"):
        quantize_onnx(out.parent / "model.onnx", blocker / "x.onnx", calibration, calibration_from="four")


# ------------------------------------------------------------------ calibration data


def test_folder_calibration_skips_unreadable_images_and_refuses_a_folder_without_any(tmp_path):
    from torchvision.io import write_png

    family = load_registry().families["featherface"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    write_png(torch.full((3, 40, 60), 128, dtype=torch.uint8), str(tmp_path / "grey.png"))
    calibration = family.calibration_inputs(None, tmp_path, (64, 64), 5)
    assert len(calibration.images) == 1 and calibration.images[0].shape == (1, 3, 64, 64)
    assert str(tmp_path) in calibration.source
    (tmp_path / "grey.png").unlink()
    with pytest.raises(UsageError, match="no usable image to calibrate on"):
        family.calibration_inputs(None, tmp_path, (64, 64), 5)


def test_labelled_calibration_is_evenly_spaced_and_deterministic():
    family = load_registry().families["featherface"]
    first = family.calibration_inputs(None, None, (64, 64), 3)
    second = family.calibration_inputs(None, None, (64, 64), 3)
    assert len(first.images) == 3 and "training split" in first.source
    assert all(torch.equal(a, b) for a, b in zip(first.images, second.images))
    assert not torch.equal(first.images[0], first.images[1])


# ------------------------------------------------------------------ a recipe's export


def _recipe(tmp_path: Path, export: str, data: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{family: featherface}}\ninput_size: 64\nfinetune: {{steps: 0}}\n{data}"
                    f"stages:\n  - {{pass: unify_heads}}\nexport: {export}\n")
    return path


def test_a_recipe_ends_with_measured_onnx_and_int8_artifacts(tmp_path, tiny_embedded):
    from click.testing import CliRunner

    from compressor.cli import cli
    from compressor.record import read_record

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--quiet", str(_recipe(tmp_path, "{int8: true, calibration_images: 3}",
                                                                     data=f"data: {{root: {tiny_embedded}}}\n")),
                                      "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {"final.pt", "final.onnx", "final.onnx.json", "final.int8.onnx", "final.int8.onnx.json"} <= {
        p.name for p in out.iterdir()}
    record = read_record((out / "report.json").read_text(), "report.json")
    deployed = record.deployed
    assert deployed is not None and deployed.int8 is not None
    assert deployed.int8.calibration_images == 3 and "training split" in deployed.int8.calibration
    assert max(deployed.onnx.max_abs_diff.values()) < 1e-4
    # The float export is the PyTorch model: the same AP, measured the same way.
    assert deployed.metrics["onnx"]["ap"] == pytest.approx(record.final.metrics["ap"], abs=1e-4)
    assert 0.0 <= deployed.metrics["int8"]["ap"] <= 1.0
    report = (out / "report.md").read_text()
    assert "## Deployed" in report and "final.int8.onnx" in report


def test_a_static_export_cannot_be_measured_on_photos_at_their_own_sizes(tmp_path):
    from compressor.recipe import load_recipe

    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(UsageError, match="export.dynamic: false, but data.eval_images"):
        load_recipe(_recipe(tmp_path, "{int8: true}", data=f"data: {{eval_images: {photos}}}\n"))


# ------------------------------------------------------------------ compress export --int8


def _invoke(*args: str):
    from click.testing import CliRunner

    from compressor.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_export_int8_command_writes_the_int8_model_and_its_record(tmp_path, retinaface):
    from compressor.checkpoint import save_checkpoint

    checkpoint = tmp_path / "rf.pt"
    save_checkpoint(checkpoint, retinaface.model, retinaface.family)
    out = tmp_path / "deploy" / "rf.int8.onnx"
    result = _invoke("export", str(checkpoint), "--format", "onnx", "--int8", "--input-size", "64",
                     "--calibration-count", "2", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["quantization"]["calibration_images"] == 2
    assert "training split" in record["quantization"]["calibration"]  # the family's default data
    # Only the int8 model and its record: the float export it came from was a scratch file.
    assert sorted(p.name for p in out.parent.iterdir()) == ["rf.int8.onnx", "rf.int8.onnx.json"]
    evaluated = _invoke("eval", str(out), "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert set(json.loads(evaluated.output)) == {"ap", "ap_low", "ap_high", "val_images"}


@pytest.mark.parametrize("args, message", [
    (["--calibration-count", "3"], "--calibration-images and --calibration-count need --int8"),
    (["--int8", "--calibration-images", "/no/such/folder"], "--calibration-images: no such folder"),
])
def test_export_int8_options_are_checked_in_one_line(tmp_path, args, message):
    result = _invoke("export", "retinaface", "--format", "onnx", "--out", str(tmp_path / "x.onnx"), *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_export_int8_with_a_folder_of_unreadable_images_is_one_line(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not a jpeg")
    result = _invoke("export", "retinaface", "--format", "onnx", "--int8", "--input-size", "64",
                     "--calibration-images", str(photos), "--out", str(tmp_path / "x.onnx"))
    assert result.exit_code == 2
    assert "no usable image to calibrate on" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.onnx").exists()
