"""What the face-detector families share in the engine's family interface.

A face detector here is MobileNetV1 body -> neck -> heads with the RetinaFace
output contract: ``(boxes N x P x 4, class logits N x P x 2, landmarks N x P x 10)``
over the priors of :mod:`facedet.priors`.  Everything that follows from that
contract (specs, counting by top-level attribute, the protected head convs,
image-like example inputs, training batches with and without labels, the
multibox and distillation losses, AP, agreement AP) is written once here; a
family subclass names its model type, its components and how it reads its
original checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from compressor.errors import UsageError
from compressor.family import Calibration, ModelFamily, PairedMetrics
from facedet import training
from facedet.agreement import KEEP_TOP_K, NMS_THRESHOLD, REFERENCE_THRESHOLD, agreement_ap
from facedet.boxes import VARIANCES
from facedet.data import DataError, image_files, unlabelled_batches
from facedet.data.calibration import folder_calibration, labelled_calibration
from facedet.modules import UnifiedHeads
from facedet.original import CheckpointError, load_pretrained_backbone
from facedet.preprocess import MEAN_BGR, to_network_input
from facedet.priors import PriorConfig
from facedet.spec import SpecError, from_spec, to_spec


class FaceDetectorFamily(ModelFamily):
    """A family of face detectors with the RetinaFace output contract (see the module docstring)."""

    metric = "ap"
    agreement_metric = "agreement_ap"
    default_data = "the embedded face dataset (generated on first use; nothing is downloaded)"
    supports_training = True
    output_names = ("boxes", "class_logits", "landmarks")

    #: The family's model class (the spec root).
    model_type: ClassVar[type[nn.Module]]
    #: Top-level attribute of the model -> accounting component.
    component_map: ClassVar[dict[str, str]]
    #: Input sides must be multiples of this (1: any size).
    size_multiple: ClassVar[int] = 1

    def recognises(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_type)

    def build(self, spec: dict[str, Any]) -> nn.Module:
        try:
            model = from_spec(spec)
        except SpecError as err:
            raise UsageError(f"architecture spec: {err}") from err
        if not isinstance(model, self.model_type):
            raise UsageError(f"architecture spec: describes a {type(model).__name__}, "
                             f"not a {self.model_type.__name__} (family {self.name})")
        return model

    def spec_of(self, model: nn.Module) -> dict[str, Any]:
        return to_spec(model)

    def component_of(self, parameter_name: str) -> str:
        return self.component_map.get(parameter_name.split(".", 1)[0], "other")

    def output_layers(self, model: nn.Module) -> list[nn.Module]:
        heads = model.heads
        if isinstance(heads, UnifiedHeads):
            return list(heads.convs)
        return [*heads.class_convs, *heads.box_convs, *heads.landmark_convs]

    def load_original(self, state: Mapping[str, Tensor]) -> nn.Module | None:
        """The model from an original implementation's (unwrapped) state_dict; None when it is not one."""
        return None

    def load_native(self, content: object, source: str) -> nn.Module | None:
        from facedet.original import read_state_dict

        if not isinstance(content, Mapping):
            return None
        try:
            state = read_state_dict(content)
        except CheckpointError:
            return None  # not a state_dict at all: some other family's format
        try:
            return self.load_original(state)
        except CheckpointError as err:
            raise UsageError(f"{source}: {err}") from err

    def deployment_metadata(self, model: nn.Module) -> dict[str, str]:
        """The input convention, the priors and variances, each output's meaning and the postprocessing.

        Enough to write the decoder in another language: the outputs are raw head
        outputs over the priors, not faces.
        """
        priors = PriorConfig()
        sides = f"sides multiple of {self.size_multiple}" if self.size_multiple > 1 else "any height and width"
        boxes, logits, landmarks = self.output_names
        return {
            "input": f"NCHW float32, BGR, mean {'/'.join(f'{v:g}' for v in MEAN_BGR)} subtracted, not scaled; {sides}",
            "priors": json.dumps({
                "min_sizes": priors.min_sizes, "steps": priors.steps, "clip": False,
                "format": "cx, cy, w, h, normalised by the input's width and height",
                "order": "level by level, then row, column, anchor size (P = sum over levels of "
                         "ceil(H/step) * ceil(W/step) * len(min_sizes))",
            }),
            "variances": json.dumps(VARIANCES),
            f"output.{boxes}": "N x P x 4 box deltas (dcx, dcy, dw, dh) to decode with the priors: "
                               "centre = prior_c + d_c * variances[0] * prior_wh, "
                               "size = prior_wh * exp(d_wh * variances[1]); times (W, H) for pixels",
            f"output.{logits}": "N x P x 2 logits: softmax, index 1 is the face score",
            f"output.{landmarks}": "N x P x 10 deltas of 5 landmarks (x, y): point = prior_c + d * variances[0] "
                                   "* prior_wh; times (W, H) for pixels",
            "postprocess": json.dumps({"score_threshold": REFERENCE_THRESHOLD, "nms_iou": NMS_THRESHOLD,
                                       "keep_top_k": KEEP_TOP_K,
                                       "steps": "scores above the threshold, decode, clip boxes to the image, "
                                                "NMS, keep the best keep_top_k"}),
        }

    def check_input_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            what = f"positive multiples of {m}" if m > 1 else "positive"
            raise UsageError(f"input size {height}x{width}: both sides must be {what} for family {self.name}")

    def example_input(self, height: int, width: int, batch_size: int = 2, seed: int = 0) -> Tensor:
        # Smooth, image-like content (upsampled noise in 0..255) rather than white
        # noise, so attention and BN statistics see something like real pixels.
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(batch_size, 3, max(height // 8, 1), max(width // 8, 1), generator=generator) * 255
        image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        return to_network_input(image)

    def load_pretrained(self, model: nn.Module, content: object, source: str) -> None:
        try:
            load_pretrained_backbone(model.backbone, content)
        except CheckpointError as err:
            raise UsageError(f"{source}: {err}") from err

    def training_batches(self, data_root: Path | None, input_size: tuple[int, int], batch_size: int, seed: int,
                         rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> Iterator:
        """The data is opened and checked here, eagerly; bad data is a UsageError, now or at any ``next()``."""
        try:
            batches = training.training_batches(data_root, _square(input_size), batch_size, seed, rank, world_size,
                                                device or "cpu")
        except DataError as err:  # the root, a label file, the images, a batch larger than the data
            raise UsageError(str(err)) from err
        return _data_errors_as_usage(batches)

    def list_images(self, images: Path) -> list[Path]:
        try:
            return image_files(images)
        except DataError as err:  # missing, or no jpg/png in it
            raise UsageError(str(err)) from err

    def unlabelled_batches(self, images: Path, input_size: tuple[int, int], batch_size: int, seed: int,
                           rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> Iterator:
        """Every image is decoded here, eagerly; bad data is a UsageError, now or at any ``next()``."""
        try:
            batches = unlabelled_batches(images, _square(input_size), batch_size, seed, rank, world_size,
                                         device or "cpu")
        except DataError as err:  # the folder, an unreadable image
            raise UsageError(str(err)) from err
        return _data_errors_as_usage(batches)

    def task_loss(self, outputs: Any, targets: Any, input_size: tuple[int, int]) -> dict[str, Tensor]:
        return training.task_loss(outputs, targets, input_size)

    def distillation_loss(self, student_outputs: Any, teacher_outputs: Any, temperature: float,
                          without_labels: bool = False) -> dict[str, Tensor]:
        return training.distillation_loss(student_outputs, teacher_outputs, temperature, without_labels)

    def evaluate(self, model: nn.Module, data_root: Path | None, input_size: tuple[int, int],
                 device: torch.device | None = None, split: str = "val") -> dict[str, float]:
        """AP on ``split`` with its 95% bootstrap interval over images (``ap_low``, ``ap_high``)."""
        try:
            metrics = training.evaluate_ap(model, data_root, _square(input_size), device or "cpu", split=split)
        except DataError as err:  # the root, a label file, the images, a split without faces
            raise UsageError(str(err)) from err
        return {key: metrics[key] for key in ("ap", "ap_low", "ap_high")}

    def evaluate_pair(self, reference: nn.Module, model: nn.Module, data_root: Path | None,
                      input_size: tuple[int, int], device: torch.device | None = None,
                      split: str = "test") -> PairedMetrics:
        """Both APs with their intervals, and the AP drop with its paired bootstrap interval over the same images."""
        try:
            first, second, drop = training.evaluate_ap_drop(reference, model, data_root, _square(input_size),
                                                            device or "cpu", split=split)
        except DataError as err:
            raise UsageError(str(err)) from err
        return PairedMetrics(first, second, drop)

    def has_test_split(self, data_root: Path | None) -> bool:
        try:
            return training.has_split(data_root, "test")
        except DataError as err:
            raise UsageError(str(err)) from err

    def calibration_inputs(self, data_root: Path | None, images: Path | None, input_size: tuple[int, int],
                           count: int) -> Calibration:
        """Images padded to squares and resized as evaluation does: a folder's photos, else the training split."""
        side = _square(input_size)
        try:
            if images is not None:
                return Calibration(folder_calibration(images, side, count), f"the images in {images}")
            root = training.resolve_root(data_root)
            return Calibration(labelled_calibration(root, side, count), f"the training split of {root}")
        except DataError as err:  # a missing folder, no image in it, no usable image at all
            raise UsageError(str(err)) from err

    def agreement(self, model: nn.Module, reference: nn.Module, images: Path,
                  device: torch.device | None = None) -> dict[str, float]:
        """AP of ``model``'s detections against ``reference``'s as ground truth, each image at its own size.

        ``reference`` is a model of this family (the engine passes the starting
        model); `compress eval --against` pads for two families itself.
        """
        # DataError: the folder, an unreadable image, a reference that finds no face (agreement undefined).
        try:
            result = agreement_ap(model, reference, image_files(images), size_multiple=self.size_multiple,
                                  device=device or "cpu")
        except DataError as err:
            raise UsageError(str(err)) from err
        return {self.agreement_metric: result.ap, "images": float(result.images),
                "reference_faces": float(result.reference_faces)}


def _data_errors_as_usage(batches: Iterator) -> Iterator:
    # An image that breaks later (deleted, rewritten) must not become a traceback mid-run either.
    try:
        yield from batches
    except DataError as err:
        raise UsageError(str(err)) from err


def _square(input_size: tuple[int, int]) -> int:
    """Training and evaluation resize to squares; a non-square recipe size uses its longer side."""
    return max(input_size)
