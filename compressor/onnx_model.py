"""Exported ONNX models behind the ``nn.Module`` interface, so the commands that only run a model take them too.

``compress eval`` and ``compress detect`` call a model on a batch and read its
outputs; :class:`OnnxModel` does that with ONNX Runtime on the CPU.  It has no
parameters: whatever changes or counts weights (passes, training, accounting)
refuses it when the file is opened (:func:`compressor.checkpoint.open_model`).
The family and the model's own input size come from the metadata
``compress export`` writes (:mod:`compressor.export`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import LoadedModel
from .errors import UsageError
from .inputs import parse_input_size
from .plugins import Registry

#: The metadata keys ``compress export`` writes and reading an ONNX model needs.
FAMILY_KEY = "compressor.family"
INPUT_SIZE_KEY = "compressor.input_size"
PROVIDERS = ["CPUExecutionProvider"]


def onnx_modules() -> tuple[ModuleType, ModuleType]:
    """``onnx`` and ``onnxruntime``, imported when first needed (slow), or one line saying what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise UsageError(f"ONNX support needs the packages onnx, onnxruntime and onnxscript "
                         f"({err.name} is not installed)") from err
    return onnx, onnxruntime


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


class OnnxModel(nn.Module):
    """An ONNX model run by ONNX Runtime (CPUExecutionProvider); ``forward`` returns its outputs in order.

    ``source`` is a file or the serialised model (``compress export`` checks a model
    before writing it).  A model exported with a fixed batch of 1 still takes any
    batch, image by image; a fixed height and width are the only size it takes.
    """

    def __init__(self, source: Path | bytes, threads: int | None = None) -> None:
        super().__init__()
        onnx, onnxruntime = onnx_modules()
        self.name = "the exported model" if isinstance(source, bytes) else str(source)
        try:
            proto = (onnx.load_model_from_string(source) if isinstance(source, bytes)
                     else onnx.load(str(source), load_external_data=False))
        except Exception as err:  # protobuf's DecodeError, a missing file, ...
            raise UsageError(f"{self.name}: not a readable ONNX model ({_first_line(err)})") from err
        #: The file's ``metadata_props``.
        self.metadata: dict[str, str] = {prop.key: prop.value for prop in proto.metadata_props}
        self.opset: int | None = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 4  # fatal only: its failures come back as exceptions, reported in one line
        try:
            self.session = onnxruntime.InferenceSession(source if isinstance(source, bytes) else str(source),
                                                        options, providers=PROVIDERS)
        except Exception as err:  # ONNX Runtime's own types: InvalidGraph, NotImplemented (an operator), ...
            raise UsageError(f"{self.name}: ONNX Runtime cannot load it ({_first_line(err)})") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise UsageError(f"{self.name}: takes {len(inputs)} input(s) of shape "
                             f"{[i.shape for i in inputs]}; expected one N x C x H x W image batch")
        self.input_name: str = inputs[0].name
        #: The input's shape, None for each axis exported as dynamic.
        self.input_shape: tuple[int | None, ...] = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        self.output_names: tuple[str, ...] = tuple(o.name for o in self.session.get_outputs())

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(height, width) when the model was exported for one input size, else None."""
        height, width = self.input_shape[2:]
        return (height, width) if height is not None and width is not None else None

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        self._check_shape(tuple(x.shape))
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        # A batch axis fixed at 1 takes the images one at a time.
        chunks = [array[i:i + 1] for i in range(len(array))] if self.input_shape[0] == 1 else [array]
        try:
            results = [self.session.run(None, {self.input_name: chunk}) for chunk in chunks]
        except Exception as err:  # ONNX Runtime's own types: a shape its graph does not take, ...
            raise UsageError(f"{self.name}: ONNX Runtime failed on a {' x '.join(map(str, x.shape))} input "
                             f"({_first_line(err, 300)})") from err
        return tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*results))

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) == 4 and self.input_shape[0] in (None, 1, shape[0]) and all(
                fixed is None or fixed == given for fixed, given in zip(self.input_shape[1:], shape[1:])):
            return
        if len(shape) == 4 and self.fixed_size is not None and self.fixed_size != shape[2:]:
            height, width = self.fixed_size
            raise UsageError(f"{self.name}: exported at a fixed {height}x{width} input; got {shape[2]}x{shape[3]}: "
                             "export with --dynamic for other sizes")
        expected = " x ".join("?" if d is None else str(d) for d in self.input_shape)
        raise UsageError(f"{self.name}: takes input of shape {expected}; got {' x '.join(map(str, shape))}")

    def to(self, *args, **kwargs) -> OnnxModel:
        """Stays as it is on the CPU in float32; another device or dtype is refused in one line."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "cpu":
            raise UsageError(f"{self.name}: an ONNX model runs on the CPU here (ONNX Runtime's "
                             "CPUExecutionProvider): use --device cpu")
        if dtype is not None and dtype != torch.float32:
            raise UsageError(f"{self.name}: an ONNX model computes in the precision it was exported in, "
                             f"not {dtype}")
        return self


def open_onnx(path: Path, registry: Registry) -> LoadedModel:
    """An ONNX model ``compress export`` wrote, with its family and its own input size from its metadata.

    The input size is the one the model was exported for when that is fixed (it
    takes no other), else its recipe's, as the metadata records it.
    """
    path = Path(path)
    model = OnnxModel(path)
    family_name = model.metadata.get(FAMILY_KEY)
    if family_name is None:
        raise UsageError(f"{path}: an ONNX model without the metadata compress export writes ({FAMILY_KEY}); "
                         "only models exported by compress export can be opened")
    family = registry.get_family(family_name, where=f"{path}: {FAMILY_KEY}: ")
    size = model.fixed_size
    if size is None:
        try:
            size = parse_input_size(model.metadata.get(INPUT_SIZE_KEY, ""))
        except UsageError as err:
            raise UsageError(f"{path}: metadata {INPUT_SIZE_KEY}: {err}") from err
    return LoadedModel(family, model, str(path), {"recipe": {"input_size": list(size)}})
