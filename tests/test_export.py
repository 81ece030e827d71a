"""`compress export` to ONNX, checked in ONNX Runtime; .onnx files in `compress eval`, `detect` and `inspect`.

Exports are the slow part (about 20 s for a face detector on a shared 2-core
machine, twice that with dynamic axes), so there are few: the trained FeatherFace
baseline (deformable SSH) once through the CLI at a fixed size, the RetinaFace
original once with dynamic axes when ../shared has it; dynamic axes without it,
and failures, use a toy family of one conv registered by a plugin file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compressor.checkpoint import open_model
from compressor.cli import cli
from compressor.errors import UsageError
from compressor.export import export_onnx, record_path
from compressor.onnx_model import OnnxModel
from compressor.plugins import load_registry

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "recipes" / "checkpoints" / "featherface_embedded.pt"
OUTPUTS = ("boxes", "class_logits", "landmarks")
TOY_PLUGIN = '''
import torch
from torch import nn
from compressor import hookimpl
from compressor.family import ModelFamily


class Toy(ModelFamily):
    name = "toy"
    default_input_size = (8, 8)

    def recognises(self, model):
        return isinstance(model, nn.Conv2d)

    def baseline(self):
        conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():  # the same weights every time, so a test can compare with the exported file
            conv.weight.copy_(torch.linspace(-1, 1, conv.weight.numel()).view_as(conv.weight))
            conv.bias.fill_(0.1)
        return conv

    def build(self, spec):
        return self.baseline()

    def spec_of(self, model):
        return {}

    def component_of(self, parameter_name):
        return "other"


@hookimpl
def compressor_models():
    return [Toy()]
'''


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    """The trained FeatherFace baseline (deformable convs) exported by the CLI at a fixed 128x128, and its record."""
    out = tmp_path_factory.mktemp("export") / "ff.onnx"
    result = invoke("export", str(TRAINED), "--format", "onnx", "--input-size", "128", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.fixture
def toy(tmp_path) -> Path:
    plugin = tmp_path / "toy_family.py"
    plugin.write_text(TOY_PLUGIN)
    return plugin


def test_the_deformable_baseline_exports_and_agrees(exported):
    import onnx

    out, record = exported
    assert record == json.loads(record_path(out).read_text())
    assert (record["format"], record["opset"], record["input_size"], record["dynamic"]) == ("onnx", 20, [128, 128], False)
    assert set(record["max_abs_diff"]) == set(OUTPUTS) and max(record["max_abs_diff"].values()) < 1e-4
    assert record["bytes"] == out.stat().st_size
    assert sorted(p.name for p in out.parent.iterdir()) == ["ff.onnx", "ff.onnx.json"]  # no temporary left
    proto = onnx.load(str(out))
    assert any(node.op_type == "DeformConv" for node in proto.graph.node)
    assert proto.producer_name == "compress" and "featherface" in proto.doc_string
    assert {p.key: p.value for p in proto.metadata_props} == record["metadata"]


def test_the_metadata_rebuilds_the_architecture_and_describes_deployment(exported):
    from facedet.boxes import VARIANCES

    out, _ = exported
    registry = load_registry()
    loaded = open_model(out, registry, allow_onnx=True)
    original = open_model(TRAINED, registry)
    metadata = loaded.model.metadata
    assert loaded.family is original.family and loaded.input_size == (128, 128)  # the only size a fixed export takes
    assert metadata["compressor.input_size"] == "320x320"  # the recipe's
    rebuilt = loaded.family.build(json.loads(metadata["compressor.spec"]))
    assert loaded.family.spec_of(rebuilt) == loaded.family.spec_of(original.model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in original.model.state_dict().items()}
    assert "BGR" in metadata["input"] and "multiple of 32" in metadata["input"]
    assert json.loads(metadata["variances"]) == list(VARIANCES)
    assert json.loads(metadata["priors"])["steps"] == [8, 16, 32]
    assert json.loads(metadata["postprocess"])["nms_iou"] == 0.4
    assert {f"output.{name}" for name in OUTPUTS} <= metadata.keys()
    assert loaded.model.output_names == OUTPUTS and list(loaded.model.parameters()) == []


def test_eval_of_the_onnx_file_equals_eval_of_the_checkpoint(exported):
    out, _ = exported
    # At its own size, 128; the file takes batch 1 only: eval's batches of 8 go through image by image.
    from_onnx = invoke("eval", str(out), "--json")
    from_torch = invoke("eval", str(TRAINED), "--input-size", "128", "--json")
    assert from_onnx.exit_code == 0 and from_torch.exit_code == 0, from_onnx.output + from_torch.output
    onnx_metrics, torch_metrics = json.loads(from_onnx.stdout), json.loads(from_torch.stdout)
    assert onnx_metrics.keys() == torch_metrics.keys()
    assert torch_metrics["ap"] > 0.2 and round(onnx_metrics["ap"], 4) == round(torch_metrics["ap"], 4)


def test_detect_inspect_and_what_an_onnx_file_cannot_do(exported, tmp_path):
    from torchvision.io import write_png

    out, record = exported
    image = tmp_path / "face.png"
    write_png(torch.full((3, 128, 128), 200, dtype=torch.uint8), str(image))
    result = invoke("detect", str(out), str(image), "--out", str(tmp_path / "o.png"), "--json")
    assert result.exit_code == 0 and isinstance(json.loads(result.stdout), list), result.output
    write_png(torch.zeros(3, 90, 70, dtype=torch.uint8), str(image))  # padded to 96x96
    assert "fixed 128x128 input; got 96x96: export with --dynamic" in one_line_error(
        invoke("detect", str(out), str(image), "--out", str(tmp_path / "o.png")))

    inspected = json.loads(invoke("inspect", str(out), "--json").stdout)
    assert (inspected["opset"], inspected["bytes"], inspected["family"]) == (20, record["bytes"], "featherface")
    assert inspected["input"]["shape"] == [1, 3, 128, 128] and inspected["metadata"] == record["metadata"]
    assert "--latency-runs" in one_line_error(invoke("inspect", str(out), "--latency-runs", "2"))
    assert "PyTorch checkpoint" in one_line_error(invoke("export", str(out), "--format", "onnx"))
    with pytest.raises(UsageError, match="only runs"):
        open_model(out)  # passes, training, sensitivity: whatever needs weights
    model = open_model(out, allow_onnx=True).model
    with pytest.raises(UsageError, match="runs on the CPU"):
        model.to("cuda")
    assert model.to("cpu") is model


def _agrees_at(model: OnnxModel, reference: torch.nn.Module, shape: tuple[int, ...], family) -> None:
    x = family.example_input(shape[2], shape[3], batch_size=shape[0], seed=1)
    with torch.no_grad():
        expected = reference(x)
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    got = model(x)
    assert len(got) == len(expected)
    for value, wanted in zip(got, expected):
        assert value.shape == wanted.shape and (value - wanted).abs().max() < 1e-4


def test_the_retinaface_original_exports_with_dynamic_axes(reference_dir, tmp_path):
    loaded = open_model(reference_dir / "retinaface_mnet025_widerface.pth")
    out = tmp_path / "rf.onnx"
    record = export_onnx(loaded, out, input_size=(75, 101), dynamic=True, metadata={"note": "test"})
    assert record.dynamic and max(record.max_abs_diff.values()) < 1e-4
    assert record.metadata["compressor.family"] == "retinaface" and record.metadata["note"] == "test"
    model = OnnxModel(out)
    assert model.input_shape == (None, 3, None, None)
    for shape in ((1, 3, 33, 47), (3, 3, 96, 64)):
        _agrees_at(model, loaded.model, shape, loaded.family)


def test_a_dynamic_export_runs_at_other_sizes_and_batches(toy, tmp_path):
    loaded = open_model("toy", load_registry([str(toy)]))
    record = export_onnx(loaded, tmp_path / "toy.onnx", input_size=(8, 8), dynamic=True)
    model = OnnxModel(tmp_path / "toy.onnx")
    assert record.dynamic and model.input_shape == (None, 3, None, None)
    for shape in ((1, 3, 5, 7), (3, 3, 12, 10)):
        _agrees_at(model, loaded.model, shape, loaded.family)


def test_a_fixed_export_takes_its_size_at_any_batch(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("export", "-p", str(toy), "toy", "--format", "onnx")  # default: ./toy.onnx, at the family's 8x8
    assert result.exit_code == 0, result.output
    assert result.output.startswith("toy.onnx: ") and "opset 20" in result.output and "fixed 8x8" in result.output
    assert (tmp_path / "toy.onnx.json").is_file()
    loaded = open_model(tmp_path / "toy.onnx", load_registry([str(toy)]), allow_onnx=True)
    model = loaded.model
    assert loaded.input_size == (8, 8) and model.input_shape == (1, 3, 8, 8) and model.output_names == ("output0",)
    x = torch.randn(3, 3, 8, 8)
    (got,) = model(x)  # batch 3 through a batch-1 file, image by image
    with torch.no_grad():
        assert (got - loaded.family.baseline()(x)).abs().max() < 1e-5
    with pytest.raises(UsageError, match="exported at a fixed 8x8 input; got 8x16: export with --dynamic"):
        model(torch.randn(1, 3, 8, 16))


def test_a_run_folder_exports_beside_its_final_model(toy, tmp_path):
    from compressor.checkpoint import save_checkpoint

    family = load_registry([str(toy)]).families["toy"]
    save_checkpoint(tmp_path / "run" / "final.pt", family.baseline(), family, recipe={"input_size": [16, 12]})
    result = invoke("export", "-p", str(toy), str(tmp_path / "run"), "--format", "onnx", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["path"] == str(tmp_path / "run" / "final.onnx") and record["input_size"] == [16, 12]
    assert record["metadata"]["compressor.input_size"] == "16x12"


def test_a_tolerance_failure_writes_nothing(toy, tmp_path, monkeypatch):
    real = OnnxModel.forward
    monkeypatch.setattr(OnnxModel, "forward", lambda self, x: tuple(t + 1e-3 for t in real(self, x)))
    out = tmp_path / "out" / "toy.onnx"
    line = one_line_error(invoke("export", "-p", str(toy), "toy", "--format", "onnx", "--out", str(out)), code=1)
    assert "output0 differs from PyTorch's by 0.001" in line and "tolerance 0.0001" in line
    assert list(out.parent.iterdir()) == []


def test_an_operator_the_exporter_cannot_translate_is_named(toy, tmp_path):
    from compressor.checkpoint import LoadedModel

    @torch.library.custom_op("compressor_export_test::unknown", mutates_args=())
    def unknown(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    unknown.register_fake(lambda x: torch.empty_like(x))

    class Unknown(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return unknown(x)

    family = load_registry([str(toy)]).families["toy"]
    out = tmp_path / "out" / "u.onnx"
    with pytest.raises(UsageError, match="no ONNX translation for the operator compressor_export_test.unknown"):
        export_onnx(LoadedModel(family, Unknown(), "unknown.pt"), out, input_size=(8, 8))
    assert list(out.parent.iterdir()) == []


def test_bad_input_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    result = invoke("export", "retinaface", "--format", "tflite")
    assert result.exit_code == 2 and "tflite" in result.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "cannot write" in one_line_error(invoke("export", "retinaface", "--format", "onnx",
                                                   "--out", str(blocker / "sub" / "m.onnx")))
    assert blocker.read_text() == "x"

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00 not a protobuf \x13\x37" * 10)
    for command in ("eval", "inspect"):
        assert "garbage.onnx" in one_line_error(invoke(command, str(garbage)))
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "plain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 8, 8])])
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    plain.ir_version = 10
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    assert "compressor.family" in one_line_error(invoke("eval", str(tmp_path / "plain.onnx")))
    helper.set_model_props(plain, {"compressor.family": "nosuch"})
    onnx.save(plain, str(tmp_path / "other.onnx"))
    assert "unknown model family 'nosuch'" in one_line_error(invoke("inspect", str(tmp_path / "other.onnx")))
