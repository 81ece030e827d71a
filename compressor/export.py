"""Exporting a model to ONNX, checked against PyTorch in ONNX Runtime before the file is written.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) is the one used:
the legacy TorchScript exporter cannot export torchvision's ``deform_conv2d``,
which becomes ONNX ``DeformConv`` (opset 19) here.  The file carries what is
needed to use it without this code: the family, the architecture spec, the
model's input size and the family's deployment notes (input layout, output
meanings, postprocessing) as ``metadata_props``; :func:`compressor.onnx_model.open_onnx`
reads it back.  A JSON record of the export lies beside it (``<file>.json``).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pydantic
import torch
from pydantic import Field

from .atomic import atomic_write_bytes, atomic_write_json
from .checkpoint import LoadedModel
from .errors import CheckFailed, OutputError, UsageError
from .onnx_model import FAMILY_KEY, INPUT_SIZE_KEY, OnnxModel, onnx_modules

if TYPE_CHECKING:
    from onnx import ModelProto

OPSET = 20
#: Largest |ONNX Runtime - PyTorch| allowed on any output value, in float32.
TOLERANCE = 1e-4
INPUT_NAME = "input"
SPEC_KEY = "compressor.spec"
VERSION_KEY = "compressor.version"
RECORD_SUFFIX = ".json"
DYNAMIC_HINT = ("; a dynamic export is also checked on a batch of 2 at twice --input-size, where a graph that "
                "depends on the size it was traced at fails: export at a larger size")


class ExportRecord(pydantic.BaseModel):
    """What an export wrote and how closely the file follows the PyTorch model; saved as ``<file>.json``."""

    model_config = pydantic.ConfigDict(extra="forbid")

    path: str
    format: Literal["onnx"] = "onnx"
    opset: int
    input_size: tuple[int, int] = Field(description="(height, width) of the input the file was checked on.")
    dynamic: bool = Field(description="Batch, height and width are dynamic axes; else fixed at input_size, batch 1.")
    max_abs_diff: dict[str, float] = Field(description="Output name -> largest |ONNX Runtime - PyTorch|.")
    tolerance: float
    bytes: int
    metadata: dict[str, str] = Field(description="The file's metadata_props.")


def record_path(out: Path) -> Path:
    """Where the record of the export to ``out`` is written: beside it, ``<name>.json``."""
    return out.with_name(out.name + RECORD_SUFFIX)


def export_onnx(loaded: LoadedModel, out: Path, *, input_size: tuple[int, int], dynamic: bool = False,
                tolerance: float = TOLERANCE, metadata: dict[str, str] | None = None) -> ExportRecord:
    """Export ``loaded.model`` to ONNX at ``out``, checked in ONNX Runtime first; returns the record it also writes.

    The check runs the family's example input (batch 1, seed 0, at ``input_size``)
    through the file and the model and compares every output; a dynamic export is
    also checked on a batch of 2 at twice the size, where a graph that still
    depends on the traced size fails.  Above ``tolerance`` (or failing) it is a
    :class:`CheckFailed` and nothing is written.  The model is moved to the CPU in
    float32 and eval mode.  ``metadata`` adds to the file's metadata (the
    engine's own ``compressor.*`` keys excepted).
    """
    out = Path(out)
    family, source = loaded.family, loaded.source
    if isinstance(loaded.model, OnnxModel):
        raise UsageError(f"{source}: an ONNX model already; export the PyTorch checkpoint it was exported from")
    _check_writable(out)
    props = _metadata(loaded, metadata or {})
    model = loaded.model.cpu().float().eval()
    height, width = input_size
    checks = [(family.example_input(height, width, batch_size=1, seed=0), "")]
    if dynamic:
        checks.append((family.example_input(2 * height, 2 * width, batch_size=2, seed=0), DYNAMIC_HINT))
    with torch.no_grad():
        expected = [_outputs(model(x), source) for x, _ in checks]
    names = family.output_names or tuple(f"output{i}" for i in range(len(expected[0])))
    if len(names) != len(expected[0]):
        raise UsageError(f"{source}: the model returns {len(expected[0])} outputs; family {family.name} "
                         f"names {len(names)} ({', '.join(names)})")
    # torch.export specialises an axis whose example size is 1, so a dynamic export is traced on a batch of 2.
    trace = family.example_input(height, width, batch_size=2, seed=0) if dynamic else checks[0][0]
    proto = _run_exporter(model, trace, names, dynamic, source).model_proto
    _set_metadata(proto, props, f"{family.name} model from {source}, exported at opset {OPSET} by torch.onnx "
                                f"(torch {torch.__version__}); metadata_props describe its input and outputs")
    data = proto.SerializeToString()
    exported = OnnxModel(data)
    diffs = dict.fromkeys(names, 0.0)
    for (x, hint), reference in zip(checks, expected):
        for name, diff in _differences(exported, x, reference, names, out, hint).items():
            if not diff <= tolerance:  # NaN fails too
                raise CheckFailed(f"{out}: ONNX Runtime's {name} differs from PyTorch's by {diff:.3g} on a "
                                  f"{_shape(x)} input (tolerance {tolerance:g}); nothing written{hint}")
            diffs[name] = max(diffs[name], diff)
    record = ExportRecord(path=str(out), opset=OPSET, input_size=(height, width), dynamic=dynamic,
                          max_abs_diff=diffs, tolerance=tolerance, bytes=len(data), metadata=props)
    atomic_write_bytes(out, lambda handle: handle.write(data))
    try:
        atomic_write_json(record_path(out), record.model_dump(mode="json"))
    except BaseException:
        out.unlink(missing_ok=True)  # a model without its record would pass for a complete export
        raise
    return record


def _differences(exported: OnnxModel, x: torch.Tensor, reference: tuple[torch.Tensor, ...], names: tuple[str, ...],
                 out: Path, hint: str) -> dict[str, float]:
    """Output name -> largest |ONNX Runtime - PyTorch| on ``x``; a failure or another shape is a CheckFailed."""
    try:
        got = exported(x)
    except UsageError as err:
        raise CheckFailed(f"{out}: nothing written: {err}{hint}") from err
    diffs = {}
    for name, value, wanted in zip(names, got, reference):
        if value.shape != wanted.shape:
            raise CheckFailed(f"{out}: ONNX Runtime's {name} has shape {tuple(value.shape)}, PyTorch's "
                              f"{tuple(wanted.shape)}, on a {_shape(x)} input; nothing written{hint}")
        diffs[name] = float((value - wanted).abs().max()) if wanted.numel() else 0.0
    return diffs


def _shape(x: torch.Tensor) -> str:
    return " x ".join(map(str, x.shape))


def _check_writable(out: Path) -> None:
    """Refuse an output the system will not take before the (slow) export, not after it."""
    if out.is_dir():
        raise OutputError(f"{out}: a folder; give the file to write, e.g. {out / 'model.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        raise OutputError(f"{out}: cannot write ({err.strerror or err})") from None


def _outputs(outputs: object, source: str) -> tuple[torch.Tensor, ...]:
    if isinstance(outputs, torch.Tensor):
        return (outputs,)
    if isinstance(outputs, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in outputs):
        return tuple(outputs)
    raise UsageError(f"{source}: returns a {type(outputs).__name__}; ONNX export needs a tensor or a tuple of tensors")


def _run_exporter(model: torch.nn.Module, example: torch.Tensor, names: tuple[str, ...], dynamic: bool,
                  source: str) -> torch.onnx.ONNXProgram:
    """The program of torch.export (non-strict) translated to ONNX; a failure is one line naming the operator.

    torch.export runs first on its own: given the model, torch.onnx falls back to
    a draft export that accepts a graph specialised to the example's sizes.
    """
    onnx_modules()  # the exporter needs onnx and onnxscript: say so in one line rather than mid-export
    axis = torch.export.Dim.DYNAMIC
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: axis, 2: axis, 3: axis},) if dynamic
                                      else None, strict=False)
        return torch.onnx.export(program, (example,), input_names=[INPUT_NAME], output_names=list(names),
                                 opset_version=OPSET, dynamo=True, verbose=False)
    except Exception as err:  # torch.export's and the ONNX translation's many error types
        raise UsageError(f"{source}: the ONNX exporter failed: {_exporter_reason(err)}") from err


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OPERATOR = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


def _exporter_reason(err: Exception) -> str:
    """The operator the exporter has no translation for, else the first line of its summary of the cause."""
    text = _ANSI.sub("", str(err))
    operator = _OPERATOR.search(text)
    if operator:
        return f"no ONNX translation for the operator {operator[1]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class ")), lines[0] if lines else type(err).__name__)
    return summary[:300]


def _metadata(loaded: LoadedModel, given: dict[str, str]) -> dict[str, str]:
    """The engine's keys, the family's deployment notes, then the caller's additions."""
    from .cli import _version  # the one place the distribution's version is found

    height, width = loaded.input_size
    own = {FAMILY_KEY: loaded.family.name, SPEC_KEY: json.dumps(loaded.family.spec_of(loaded.model)),
           INPUT_SIZE_KEY: f"{height}x{width}", VERSION_KEY: _version()}
    taken = sorted(own.keys() & given.keys())
    if taken:
        raise UsageError(f"metadata {', '.join(taken)}: the exporter's own key(s); choose other names")
    return {**own, **loaded.family.deployment_metadata(loaded.model), **given}


def set_metadata_props(proto: ModelProto, props: dict[str, str]) -> None:
    """Replace the file's ``metadata_props`` with ``props``."""
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)


def _set_metadata(proto: ModelProto, props: dict[str, str], doc: str) -> None:
    set_metadata_props(proto, props)
    proto.producer_name = "compress"
    proto.producer_version = props[VERSION_KEY]
    proto.doc_string = doc

