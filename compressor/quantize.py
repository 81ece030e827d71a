"""int8 post-training quantization of an exported ONNX model, with ONNX Runtime's static quantizer.

Why this tool and these settings:

- ONNX Runtime's quantizer works on the file that is deployed, so what is measured
  (``compress eval FILE.int8.onnx``) is exactly what ships; PyTorch's PT2E flow would
  quantize a PyTorch graph that still has to be exported and checked again.
- QDQ format (QuantizeLinear/DequantizeLinear pairs around float operators): the runtime
  fuses each ``DQ -> op -> Q`` into its integer kernel, and the file stays a standard ONNX
  graph that other runtimes (TensorRT, OpenVINO, XNNPACK, QNN) read as well.
- Activations uint8 with a zero point, weights int8 symmetric per output channel: the
  combination whose x86 kernels (AVX2/AVX-512 VNNI) and ARM kernels are the fast ones;
  per-channel weights matter for depthwise convs, whose channels differ widely in range.
- Calibration by MinMax over a few dozen real images of the model's own data.
- Only convolutions and the activations that follow them are quantized (:data:`INT8_OPS`);
  attention gates, fusion weights, additions, concatenations and resampling stay float.
  ONNX Runtime's integer versions of those elementwise operators are slower than its float
  ones on this kind of model (a profile of the V2 model at 640x640: QLinearMul 2.7 ms where
  the float Mul took 1.1 ms), and each needs a quantize/dequantize pair around it; the
  convolutions are where int8 pays.
- Convolutions with fewer than :data:`FLOAT_BELOW_CHANNELS` input or output channels stay
  float, with the activation that follows them.  In a thin detector these are the first,
  full-resolution layers and the spatial attention gates (2 -> 1 channel): ONNX Runtime's
  integer kernels vectorise over channels, so with a handful of channels they run slower
  than the float kernels (measured: a 5-channel depthwise conv at 320x320 takes 4x as long
  in int8), and these layers are also where quantization costs the most accuracy (one
  rounding step is large against the few values that carry all the information).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydantic
from pydantic import Field
from torch import Tensor

from .atomic import atomic_write_json
from .checkpoint import LoadedModel
from .errors import OutputError, UsageError
from .export import ExportRecord, export_onnx, record_path, set_metadata_props
from .onnx_model import OnnxModel

#: Convolutions with fewer input or output channels than this stay in float (see the module docstring).
FLOAT_BELOW_CHANNELS = 16
#: Operators that follow a convolution elementwise and stay in the same precision as it.
_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Clip", "HardSigmoid", "HardSwish"})
#: The operators that are quantized (see the module docstring); everything else stays float.
INT8_OPS = ("Conv", "Relu", "LeakyRelu", "Clip")
#: Default number of calibration images.
DEFAULT_CALIBRATION_COUNT = 32


class QuantizeRecord(pydantic.BaseModel):
    """What the quantizer did, written beside the int8 model and into the run report."""

    model_config = pydantic.ConfigDict(extra="forbid")

    path: str
    source: str = Field(description="The float ONNX model it quantized.")
    bytes: int
    method: str = ("static QDQ of convolutions and their activations; activations uint8 (asymmetric, per tensor), "
                   "weights int8 (symmetric, per channel)")
    calibration: str = Field(description="Where the calibration images came from.")
    calibration_images: int
    calibration_method: str = "MinMax"
    float_below_channels: int = Field(description="Convolutions with fewer input or output channels stay float.")
    float_nodes: list[str] = Field(description="The nodes left in float (convolutions and their activations).")
    quantized_convs: int
    float_convs: int


def quantize_onnx(source: Path, out: Path, calibration: Sequence[Tensor], *, calibration_from: str,
                  float_below_channels: int = FLOAT_BELOW_CHANNELS) -> QuantizeRecord:
    """Quantize the float model ``source`` into ``out`` (atomically), calibrated on ``calibration``.

    ``calibration`` holds network inputs (each 1 x C x H x W, preprocessed as the model
    expects).  The metadata of ``source`` is carried over, with the precision and the
    quantization settings added.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise UsageError("int8 quantization needs at least one calibration image")
    out = Path(out)
    with _temporary_folder(out) as work:
        prepared = work / "prepared.onnx"
        # Shape inference and the runtime's basic graph fusions first, as the quantizer asks;
        # its symbolic shape inference cannot follow every dynamic-shape graph, and is not needed.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        keep_float, float_convs, convs = float_nodes(graph, float_below_channels)
        input_name = graph.graph.input[0].name
        quantized = work / "quantized.onnx"
        with _quiet_quantizer():
            quantize_static(
                str(prepared), str(quantized), _Reader(input_name, calibration),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=True, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
                op_types_to_quantize=list(INT8_OPS),
            )
        model = onnx.load(str(quantized))
        record = QuantizeRecord(
            path=str(out), source=str(source), bytes=0, calibration=calibration_from,
            calibration_images=len(calibration), float_below_channels=float_below_channels,
            float_nodes=keep_float, quantized_convs=convs - float_convs, float_convs=float_convs,
        )
        metadata = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
        metadata["compressor.precision"] = "int8"
        metadata["compressor.quantization"] = json.dumps(record.model_dump(exclude={"path", "bytes", "source"}))
        set_metadata_props(model, metadata)
        final = work / "final.onnx"
        onnx.save(model, str(final))
        _check_runs(final, out, calibration[0])
        try:
            os.replace(final, out)
        except OSError as err:
            raise OutputError(f"{out}: cannot write ({err.strerror or err})") from err
    record.bytes = out.stat().st_size
    return record


def float_nodes(graph: object, float_below_channels: int) -> tuple[list[str], int, int]:
    """The names of the nodes to keep in float, how many of them are convolutions, and all of ``graph``'s.

    A convolution stays float when its input or output has fewer than
    ``float_below_channels`` channels; so do the activations that follow it one by one,
    because the runtime would otherwise quantize the convolution back (a float conv
    between a DequantizeLinear and a QuantizeLinear is folded into an integer one).
    """
    weights = {tensor.name: list(tensor.dims) for tensor in graph.graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    keep: list[str] = []
    convs = float_convs = 0
    for node in graph.graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights:
            continue
        convs += 1
        groups = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
        out_channels, in_per_group = weights[node.input[1]][:2]
        if min(out_channels, in_per_group * groups) >= float_below_channels:
            continue
        keep.append(node.name)
        float_convs += 1
        following = consumers.get(node.output[0], [])
        while len(following) == 1 and following[0].op_type in _ACTIVATIONS:
            keep.append(following[0].name)
            following = consumers.get(following[0].output[0], [])
    return keep, float_convs, convs


class _Reader:
    """The quantizer's calibration reader: one preprocessed image per call."""

    def __init__(self, input_name: str, images: Sequence[Tensor]) -> None:
        self._feeds: Iterator[dict] = iter([{input_name: image.detach().cpu().float().contiguous().numpy()}
                                            for image in images])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # the quantizer's interface; one pass is all MinMax needs
        pass


def _check_runs(path: Path, out: Path, image: Tensor) -> None:
    """The int8 model at ``path`` (to be written to ``out``) loads and gives finite outputs on ``image``."""
    if not all(output.isfinite().all() for output in OnnxModel(path)(image)):
        raise UsageError(f"{out}: the int8 model gives non-finite outputs on a calibration image; nothing written")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs through the root logger, e.g. that a BatchNormalization left beside a
    DeformConv has no channel axis 1 to quantize per channel; its notes are not the user's to act on."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _temporary_folder(out: Path) -> Iterator[Path]:
    """A scratch folder beside ``out`` (so the final rename stays on one file system), always removed."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent)
    except OSError as err:
        raise OutputError(f"{out}: cannot write ({err.strerror or err})") from None
    with folder as name:
        yield Path(name)


class Int8Export(pydantic.BaseModel):
    """An int8 export: the float model's export and check, then its quantization; saved as ``<file>.json``."""

    model_config = pydantic.ConfigDict(extra="forbid")

    float_model: ExportRecord = Field(description="The float ONNX model the int8 one was quantized from.")
    quantization: QuantizeRecord


def export_int8(loaded: LoadedModel, out: Path, *, input_size: tuple[int, int], dynamic: bool,
                calibration: Sequence[Tensor], calibration_from: str, float_out: Path | None = None,
                float_below_channels: int = FLOAT_BELOW_CHANNELS) -> Int8Export:
    """Export ``loaded`` to float ONNX (checked against PyTorch), quantize it to int8 at ``out``.

    The float model is kept at ``float_out`` (with its own record beside it), or
    made in a scratch folder and removed.  The record lands beside ``out``.
    """
    out = Path(out)
    keep_float = float_out is not None
    with contextlib.ExitStack() as stack:
        if float_out is None:
            float_out = stack.enter_context(_temporary_folder(out)) / "float.onnx"
        exported = export_onnx(loaded, float_out, input_size=input_size, dynamic=dynamic)
        quantized = quantize_onnx(float_out, out, calibration, calibration_from=calibration_from,
                                  float_below_channels=float_below_channels)
    if not keep_float:
        exported.path = quantized.source = "(a float export made for the quantization, not kept)"
    record = Int8Export(float_model=exported, quantization=quantized)
    try:
        atomic_write_json(record_path(out), record.model_dump(mode="json"))
    except BaseException:
        out.unlink(missing_ok=True)  # an int8 model without its record would pass for a complete export
        raise
    return record
