"""The model-family interface: everything the engine needs to know about a model.

The engine never imports a family's code.  A family (FeatherFace is the first)
is an object implementing this interface, registered through the
``compressor_models`` hook.  The engine builds, describes, counts and checks
models only through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UsageError


@dataclass
class PruningHints:
    """What a family tells structured pruning about its own layers (all optional).

    Generic pruning (torch-pruning's dependency graph) handles standard layers;
    a family with layers the graph cannot see through says so here.  The layers
    whose output channels are the model's outputs are not a hint: they come from
    :meth:`ModelFamily.output_layers`, which every pass may ask.
    """

    #: torch-pruning pruning functions (``BasePruningFunc`` instances) by module type, for
    #: layers that apply their weights functionally or hold weights with no channel axis.
    #: A pruner whose ``get_out_channels`` gives a number roots channel groups of its own;
    #: one with an ``importance_layer(layer) -> nn.Module`` method has ``layer`` scored
    #: for importance as that standard layer (e.g. the conv whose weight it applies).
    custom_pruners: dict[type[nn.Module], Any] = field(default_factory=dict)
    #: Modules to leave out of tracing: their ops have no channel index (e.g. a reduction
    #: over channels), so the graph must not couple them to the features' channels.
    untraced: list[nn.Module] = field(default_factory=list)
    #: Sets of modules whose layers share one width: every group that prunes output channels
    #: of a layer inside a set removes the same number of channels (the smallest any of them
    #: would); a group that reaches into several sets ties those sets together.
    tied: list[list[nn.Module]] = field(default_factory=list)
    #: Channel-group sizes a module's input width must stay divisible by (module, divisor):
    #: a group that prunes the module's input channels removes a multiple of the divisor.
    divisors: list[tuple[nn.Module, int]] = field(default_factory=list)
    #: Entered around building the graph and pruning, e.g. to fold a fixed channel
    #: permutation into the next layer's weights and back out afterwards.
    context: Callable[[nn.Module], AbstractContextManager] = lambda model: nullcontext()


@dataclass
class Calibration:
    """Inputs to calibrate a quantization on, and where they came from (for records)."""

    images: list[Tensor]
    source: str


@dataclass(frozen=True)
class PairedMetrics:
    """Two models measured on the same data (:meth:`ModelFamily.evaluate_pair`)."""

    reference: dict[str, float]
    model: dict[str, float]
    #: ``m_drop`` = reference minus model for each metric ``m``; ``m_drop_low``/``m_drop_high`` where paired.
    drop: dict[str, float]


class ModelFamily(ABC):
    """A family of architectures that can be described by a serialisable spec."""

    #: The name recipes and the CLI use (``model.family``, ``compress inspect NAME``).
    name: str
    #: One line for ``compress families`` and help texts.
    description: str = ""
    #: The accounting components, in display order; ``other`` is added by the engine.
    components: tuple[str, ...] = ()
    #: (height, width) used when neither the command nor the model's recipe gives one.
    default_input_size: tuple[int, int] = (640, 640)
    #: The headline accuracy metric (a key of :meth:`evaluate`'s result): budgets'
    #: ``max_accuracy_drop``, plots and summaries use it.
    metric: str = ""
    #: What ``data.root`` means when a recipe leaves it empty, for help texts and reports.
    default_data: str = ""
    #: The metric of :meth:`agreement` (its first key): with ``data.eval_images`` it replaces
    #: :attr:`metric` in budgets, plots and summaries.  Empty: the family has no agreement measure.
    agreement_metric: str = ""
    #: How the costs in ``MacCount.extra`` are counted, by kind, for people reading them.
    counting_notes: dict[str, str] = {}
    #: The names of the model's outputs in exported files (``compress export``), in the order
    #: the model returns them; empty: ``output0``, ``output1``, ...
    output_names: tuple[str, ...] = ()

    @abstractmethod
    def recognises(self, model: nn.Module) -> bool:
        """True when ``model`` is one this family built (and can describe and count)."""

    @abstractmethod
    def baseline(self) -> nn.Module:
        """The family's reference architecture with freshly initialised weights."""

    @abstractmethod
    def build(self, spec: dict[str, Any]) -> nn.Module:
        """A model with random weights whose architecture ``spec`` describes."""

    @abstractmethod
    def spec_of(self, model: nn.Module) -> dict[str, Any]:
        """The spec of ``model`` as it is now (after any pass), JSON-able."""

    @abstractmethod
    def component_of(self, parameter_name: str) -> str:
        """The accounting component a parameter (by its state_dict name) belongs to."""

    def load_native(self, content: object, source: str) -> nn.Module | None:
        """Load checkpoint ``content`` (already read with weights_only) in a format native to this family.

        For instance the original implementation's state_dicts.  Returns None when
        ``content`` is not in such a format, so the engine can try the next family;
        raises :class:`compressor.errors.UsageError` when it is but cannot be loaded.
        """
        return None

    def output_layers(self, model: nn.Module) -> list[nn.Module]:
        """The layers whose output channels are the model's outputs: passes must keep their widths."""
        return []

    def pruning_hints(self, model: nn.Module) -> PruningHints:
        """What structured pruning must know about this family's special layers in ``model``."""
        return PruningHints()

    def deployment_metadata(self, model: nn.Module) -> dict[str, str]:
        """What a runtime needs to use ``model``'s exported file without this code, as key -> text.

        Written into the exported file's metadata (ONNX ``metadata_props``): the input's
        layout and preprocessing, the meaning of each output, the postprocessing.
        """
        return {}

    def check_input_size(self, height: int, width: int) -> None:
        """Raise :class:`compressor.errors.UsageError` for input sizes the family cannot take."""

    def example_input(self, height: int, width: int, batch_size: int = 2, seed: int = 0) -> Tensor:
        """A fixed, image-like batch for validation and drift measurement."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size, 3, height, width, generator=generator)

    # ------------------------------------------------------------ training and measuring
    # Optional: a family without them can still be compressed with --no-finetune,
    # and its runs record finetuning and evaluation as unavailable.  Without the
    # images-without-labels methods (list_images, unlabelled_batches, agreement),
    # recipes naming data.images or data.eval_images are refused when they open.

    supports_training: bool = False

    def load_pretrained(self, model: nn.Module, content: object, source: str) -> None:
        """Initialise part of ``model`` from a pretrained checkpoint's ``content`` (e.g. an ImageNet backbone).

        The engine reads the file (``source``, for messages) with ``weights_only=True``.
        """
        raise NotImplementedError(f"model family {self.name} has no pretrained initialisation")

    def training_batches(self, data_root: Path | None, input_size: tuple[int, int], batch_size: int, seed: int,
                         rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> Iterator:
        """Endless ``(inputs, targets)`` batches of augmented training data for this process."""
        raise NotImplementedError

    def list_images(self, images: Path) -> list[Path]:
        """The files of a folder of images without labels that :meth:`unlabelled_batches` and :meth:`agreement` read.

        Raises :class:`compressor.errors.UsageError` naming the folder when it is
        missing or holds no image; cheap (nothing is decoded), so recipes are checked with it.
        """
        raise NotImplementedError

    def unlabelled_batches(self, images: Path, input_size: tuple[int, int], batch_size: int, seed: int,
                           rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> Iterator:
        """Endless ``(inputs, None)`` batches of augmented views of the images under ``images``, for this process.

        No targets: the loss is the distillation loss alone, teacher and student given the same inputs.
        """
        raise NotImplementedError

    def task_loss(self, outputs: Any, targets: Any, input_size: tuple[int, int]) -> dict[str, Tensor]:
        """The supervised loss; ``"loss"`` is the total to minimise."""
        raise NotImplementedError

    def distillation_loss(self, student_outputs: Any, teacher_outputs: Any, temperature: float,
                          without_labels: bool = False) -> dict[str, Tensor]:
        """The loss that pulls a student's outputs towards a teacher's; ``"loss"`` is the total.

        ``without_labels``: no task loss accompanies it (finetuning on images without labels), so the
        teacher is the only signal and the family may weigh the loss's terms for that.
        """
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data_root: Path | None, input_size: tuple[int, int],
                 device: torch.device | None = None, split: str = "val") -> dict[str, float]:
        """Accuracy metrics on a split of the labelled data; the first is the one budgets and plots use.

        ``split`` is ``"val"`` (what stages are measured and recipes tuned on) or ``"test"``
        (held out: the engine measures only the starting and the final model on it).
        """
        raise NotImplementedError

    def evaluate_pair(self, reference: nn.Module, model: nn.Module, data_root: Path | None,
                      input_size: tuple[int, int], device: torch.device | None = None,
                      split: str = "test") -> PairedMetrics:
        """Both models' :meth:`evaluate` metrics on ``split``, and how much ``model`` lost against ``reference``.

        The drop of each metric ``m`` is ``m_drop`` (reference minus model).  This default
        measures each model alone and subtracts; a family that can pair the two per image
        adds the paired interval (``m_drop_low``, ``m_drop_high``), which says whether a drop is real.
        """
        first = self.evaluate(reference, data_root, input_size, device, split=split)
        second = self.evaluate(model, data_root, input_size, device, split=split)
        drop = {f"{key}_drop": first[key] - second[key] for key in first
                if key in second and not key.endswith(("_low", "_high"))}
        return PairedMetrics(first, second, drop)

    def has_test_split(self, data_root: Path | None) -> bool:
        """Whether the labelled data at ``data_root`` (the family's default when None) holds a held-out test split."""
        return False

    def agreement(self, model: nn.Module, reference: nn.Module, images: Path,
                  device: torch.device | None = None) -> dict[str, float]:
        """How closely ``model``'s results follow ``reference``'s on the images under ``images`` (no labels needed).

        The first key is :attr:`agreement_metric`, 1.0 for a model against itself.
        """
        raise NotImplementedError

    def calibration_inputs(self, data_root: Path | None, images: Path | None, input_size: tuple[int, int],
                           count: int) -> Calibration:
        """``count`` network inputs (1 x ... each, preprocessed) to calibrate int8 quantization on.

        From the folder ``images`` when given, else from the labelled data at ``data_root``
        (the family's default data when None).  Bad data is a :class:`compressor.errors.UsageError`.
        """
        raise UsageError(f"model family {self.name} provides no calibration data for int8 quantization")
