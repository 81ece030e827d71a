"""Registers the FeatherFace model family with the engine."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from torch import Tensor, nn

from compressor import hookimpl
from compressor.family import ModelFamily, PruningHints
from compressor_plugins import featherface_pruning
from compressor_plugins.face_family import FaceDetectorFamily
from featherface.model import COMPONENTS, FeatherFace, featherface_baseline
from featherface.original import load_original_checkpoint, looks_original


class FeatherFaceFamily(FaceDetectorFamily):
    name = "featherface"
    components = ("backbone", "cbam", "bifpn", "ssh", "channel_shuffle", "heads")
    counting_notes = {
        "deform_sampling_macs": "bilinear sampling of the deformable convs: 4 MACs per sampled value + 1 for "
                                "the modulation; not in the MACs above",
    }
    model_type = FeatherFace
    component_map = COMPONENTS
    # The BiFPN adds levels resampled by exact factors of 2.
    size_multiple = 32

    @functools.cached_property
    def description(self) -> str:  # type: ignore[override]
        total = sum(p.numel() for p in self.baseline().parameters())
        return f"FeatherFace face detector (MobileNetV1-0.25, CBAM, BiFPN, DCN SSH); baseline {total:,} parameters"

    def pruning_hints(self, model: nn.Module) -> PruningHints:
        """DCN and fusion-weight pruners, untraced spatial gates, tied BiFPN cells, shuffle folding and divisors."""
        return featherface_pruning.pruning_hints(model)

    def baseline(self) -> nn.Module:
        return featherface_baseline()

    def load_original(self, state: Mapping[str, Tensor]) -> nn.Module | None:
        # Body, SSH and head names are shared with RetinaFace-style detectors; the
        # CBAM and BiFPN names are FeatherFace's own.
        return load_original_checkpoint(state) if looks_original(state) else None


FAMILY = FeatherFaceFamily()


@hookimpl
def compressor_models() -> list[ModelFamily]:
    return [FAMILY]
