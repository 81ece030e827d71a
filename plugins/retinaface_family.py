"""Registers the RetinaFace model family with the engine."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from torch import Tensor, nn

from compressor import hookimpl
from compressor.family import ModelFamily
from compressor_plugins.face_family import FaceDetectorFamily
from retinaface.model import COMPONENTS, RetinaFace, retinaface_mnet025
from retinaface.original import load_original_checkpoint, looks_original


class RetinaFaceFamily(FaceDetectorFamily):
    name = "retinaface"
    components = ("backbone", "fpn", "ssh", "heads")
    model_type = RetinaFace
    component_map = COMPONENTS
    # Any input size: the FPN upsamples each coarser level to the finer level's exact size.
    size_multiple = 1

    @functools.cached_property
    def description(self) -> str:  # type: ignore[override]
        total = sum(p.numel() for p in self.baseline().parameters())
        return f"RetinaFace face detector (MobileNetV1-0.25, FPN, SSH); baseline {total:,} parameters"

    def baseline(self) -> nn.Module:
        return retinaface_mnet025()

    def load_original(self, state: Mapping[str, Tensor]) -> nn.Module | None:
        return load_original_checkpoint(state) if looks_original(state) else None


FAMILY = RetinaFaceFamily()


@hookimpl
def compressor_models() -> list[ModelFamily]:
    return [FAMILY]
