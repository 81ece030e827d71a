"""Registers the FeatherFace model family with the engine."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import featherface
from compressor import hookimpl
from compressor.errors import UsageError
from compressor.family import ModelFamily, PruningHints
from compressor_plugins import featherface_pruning
from featherface.model import COMPONENTS
from featherface.modules.heads import UnifiedHeads
from featherface import training
from featherface.original import CheckpointError, load_pretrained_backbone, read_state_dict, translate_key
from featherface.preprocess import to_network_input
from featherface.spec import SpecError

STRIDE = 32


class FeatherFaceFamily(ModelFamily):
    name = "featherface"
    components = ("backbone", "cbam", "bifpn", "ssh", "channel_shuffle", "heads")
    metric = "ap"
    default_data = "the embedded face dataset (generated on first use; nothing is downloaded)"
    counting_notes = {
        "deform_sampling_macs": "bilinear sampling of the deformable convs: 4 MACs per sampled value + 1 for "
                                "the modulation; not in the MACs above",
    }

    @functools.cached_property
    def description(self) -> str:  # type: ignore[override]
        total = sum(p.numel() for p in self.baseline().parameters())
        return f"FeatherFace face detector (MobileNetV1-0.25, CBAM, BiFPN, DCN SSH); baseline {total:,} parameters"

    def output_layers(self, model: nn.Module) -> list[nn.Module]:
        heads = model.heads
        if isinstance(heads, UnifiedHeads):
            return list(heads.convs)
        return [*heads.class_convs, *heads.box_convs, *heads.landmark_convs]

    def pruning_hints(self, model: nn.Module) -> PruningHints:
        """DCN and fusion-weight pruners, untraced spatial gates, tied BiFPN cells, shuffle folding and divisors."""
        return featherface_pruning.pruning_hints(model)

    def recognises(self, model: nn.Module) -> bool:
        return isinstance(model, featherface.FeatherFace)

    def baseline(self) -> nn.Module:
        return featherface.featherface_baseline()

    def build(self, spec: dict[str, Any]) -> nn.Module:
        try:
            return featherface.from_spec(spec)
        except SpecError as err:
            raise UsageError(f"architecture spec: {err}") from err

    def spec_of(self, model: nn.Module) -> dict[str, Any]:
        return featherface.to_spec(model)

    def component_of(self, parameter_name: str) -> str:
        return COMPONENTS.get(parameter_name.split(".", 1)[0], "other")

    def load_native(self, content: object, source: str) -> nn.Module | None:
        if not isinstance(content, Mapping):
            return None
        try:
            state = read_state_dict(content)
        except CheckpointError:
            return None  # not a state_dict at all: some other family's format
        if not _looks_original(state):
            return None
        try:
            return featherface.load_original_checkpoint(state)
        except CheckpointError as err:
            raise UsageError(f"{source}: {err}") from err

    def check_input_size(self, height: int, width: int) -> None:
        if height <= 0 or width <= 0 or height % STRIDE or width % STRIDE:
            raise UsageError(f"input size {height}x{width}: both sides must be positive multiples of {STRIDE}")

    def example_input(self, height: int, width: int, batch_size: int = 2, seed: int = 0) -> Tensor:
        # Smooth, image-like content (upsampled noise in 0..255) rather than white
        # noise, so attention and BN statistics see something like real pixels.
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(batch_size, 3, max(height // 8, 1), max(width // 8, 1), generator=generator) * 255
        image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        return to_network_input(image)

    supports_training = True

    def load_pretrained(self, model: nn.Module, content: object, source: str) -> None:
        try:
            load_pretrained_backbone(model.backbone, content)
        except CheckpointError as err:
            raise UsageError(f"{source}: {err}") from err

    def training_batches(self, data_root: Path | None, input_size: tuple[int, int], batch_size: int, seed: int,
                         rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> Iterator:
        """The data is opened and checked here, eagerly; bad data is a UsageError, now or at any ``next()``."""
        from featherface.data import DataError

        try:
            batches = training.training_batches(data_root, _square(input_size), batch_size, seed, rank, world_size,
                                                device or "cpu")
        except DataError as err:  # the root, a label file, the images, a batch larger than the data
            raise UsageError(str(err)) from err

        def checked() -> Iterator:
            # An image that breaks later (deleted, rewritten) must not become a traceback mid-run either.
            try:
                yield from batches
            except DataError as err:
                raise UsageError(str(err)) from err

        return checked()

    def task_loss(self, outputs: Any, targets: Any, input_size: tuple[int, int]) -> dict[str, Tensor]:
        return training.task_loss(outputs, targets, input_size)

    def distillation_loss(self, student_outputs: Any, teacher_outputs: Any, temperature: float) -> dict[str, Tensor]:
        return training.distillation_loss(student_outputs, teacher_outputs, temperature)

    def evaluate(self, model: nn.Module, data_root: Path | None, input_size: tuple[int, int],
                 device: torch.device | None = None) -> dict[str, float]:
        from featherface.data import DataError

        try:
            metrics = training.evaluate_ap(model, data_root, _square(input_size), device or "cpu")
        except DataError as err:  # the root, a label file, the images, a split without faces
            raise UsageError(str(err)) from err
        return {"ap": metrics["ap"]}


def _square(input_size: tuple[int, int]) -> int:
    """Training and evaluation resize to squares; a non-square recipe size uses its longer side."""
    return max(input_size)


def _looks_original(state: Mapping[str, Tensor]) -> bool:
    """True when some key of the (unwrapped, unprefixed) state_dict is one of the original's names."""
    # Body, SSH and head names are shared with RetinaFace-style detectors; the
    # CBAM and BiFPN names are FeatherFace's own.
    return any(k.startswith(_DISTINCTIVE) and translate_key(k) is not None for k in state)


_DISTINCTIVE = ("bifpn.", "bacbkbone_", "bif_cbam_")


FAMILY = FeatherFaceFamily()


@hookimpl
def compressor_models() -> list[ModelFamily]:
    return [FAMILY]
