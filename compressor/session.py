"""Opening a recipe: the one path from a YAML file to everything a command needs to act on it.

``run``, ``train``, ``validate`` and ``sensitivity`` all go through
:func:`open_recipe`: load the YAML, apply ``--set`` overrides, validate it,
register the recipe's plugins on the command's :class:`App`, resolve the model
family, validate every stage's params against its pass, check the files it
names (folders of images without labels are listed by the family) and the input
size, pick the device and the output folder.  Nothing here loads a model;
:meth:`OpenedRecipe.starting_model` and :meth:`OpenedRecipe.teacher` do, when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import Tensor, nn

from .checkpoint import LoadedModel, open_model, read_file
from .errors import UsageError
from .family import ModelFamily
from .finite import describe_non_finite, non_finite_tensors
from .plugins import App
from .recipe import (
    Recipe,
    TrainRecipe,
    _RunSettings,
    check_against_registry,
    check_budget_components,
    check_sources,
    check_teachers,
    load_recipe,
)
from .record import DataRecord, ImageFolder
from .validate import OutputSpec, contract_violations, forward_eval, output_contract

DEVICES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The device a ``--device`` option names; an unavailable one is a usage error."""
    if name not in DEVICES:
        raise UsageError(f"--device {name}: expected one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine (use --device cpu)")
    return torch.device(name)


def default_out_dir(recipe_path: Path) -> Path:
    return Path("runs") / recipe_path.stem


@dataclass
class OpenedRecipe:
    """A validated recipe with its family, pass params, device and output folder resolved."""

    path: Path
    recipe: Any  # Recipe or TrainRecipe
    app: App
    family: ModelFamily
    device: torch.device
    out_dir: Path
    stage_params: list[pydantic.BaseModel] = field(default_factory=list)
    data: DataRecord = field(default_factory=DataRecord)
    _loaded: LoadedModel | None = None

    @property
    def metric(self) -> str:
        """The headline metric: the family's agreement metric with data.eval_images, else its accuracy metric."""
        return self.family.agreement_metric if self.recipe.data.eval_images is not None else self.family.metric

    def starting_model(self) -> nn.Module:
        """The model the recipe starts from: its checkpoint, or the family's baseline (optionally pretrained)."""
        source = self.recipe.model
        if source.checkpoint is None:
            model = self.family.baseline()
            if source.pretrained is not None:
                self.family.load_pretrained(model, read_file(source.pretrained), str(source.pretrained))
            return model.eval()
        loaded = self._loaded or open_model(source.checkpoint, self.app.registry)
        self._loaded = None  # hand it out once; a second call reloads rather than sharing weights
        if loaded.family is not self.family:
            raise UsageError(
                f"{self.path}: model.checkpoint: {source.checkpoint} is a {loaded.family.name} model, "
                f"but model.family is {self.family.name}"
            )
        if non_finite_tensors(loaded.model):
            raise UsageError(f"{self.path}: model.checkpoint: {source.checkpoint} holds non-finite weights: "
                             f"{describe_non_finite(loaded.model)}")
        return loaded.model

    def teacher(self, path: Path, where: str, example: Tensor, contract: list[OutputSpec]) -> nn.Module:
        """A teacher checkpoint of any family (``where``: its recipe field), on ``example``'s device.

        Refused unless its outputs on ``example`` have the student's ``contract``
        (the same structure, shapes and dtypes), which is what distillation compares.
        """
        try:
            loaded = open_model(path, self.app.registry)
        except UsageError as err:
            raise UsageError(f"{self.path}: {where}: {err}") from err
        if non_finite_tensors(loaded.model):
            raise UsageError(f"{self.path}: {where}: {path} holds non-finite weights: "
                             f"{describe_non_finite(loaded.model)}")
        model = loaded.model.to(example.device)
        what = f"{self.path}: {where}: {path} ({loaded.family.name})"
        try:
            outputs = forward_eval(model, example)
        except Exception as err:  # any layer of any family may refuse the input; the user chose the file
            first = (str(err).strip().splitlines() or [""])[0]
            raise UsageError(f"{what} fails on the example input {tuple(example.shape)}: "
                             f"{type(err).__name__}: {first}") from err
        if contract_violations(contract, outputs):
            raise UsageError(f"{what} gives outputs unlike the student's, which distillation compares: teacher "
                             f"{_described(output_contract(outputs))}; student {_described(contract)}")
        return model


def _described(contract: list[OutputSpec]) -> str:
    return ", ".join(spec.describe() for spec in contract)


def open_recipe(path: str | Path, app: App, *, overrides: list[str] | tuple[str, ...] = (),
                kind: type[_RunSettings] = Recipe, device: str = "cpu",
                out_dir: Path | None = None) -> OpenedRecipe:
    """Load, override and check a recipe without loading any model (unless the family must be read off it)."""
    path = Path(path)
    recipe, _ = load_recipe(path, overrides, kind)
    app.add_plugins(recipe.plugins, base_dir=path.parent)
    registry = app.registry
    stage_params = check_against_registry(recipe, registry, path) if isinstance(recipe, Recipe) else []
    check_sources(recipe, path)
    check_teachers(recipe, path)
    family, loaded = _family(recipe, app, path)
    if isinstance(recipe, Recipe):
        check_budget_components(recipe, family, path)
    try:
        family.check_input_size(*recipe.input_size)
    except UsageError as err:
        raise UsageError(f"{path}: input_size: {err}") from err
    if isinstance(recipe, TrainRecipe) and recipe.train.steps and not family.supports_training:
        raise UsageError(f"{path}: model family {family.name} has no training support")
    return OpenedRecipe(path=path, recipe=recipe, app=app, family=family, device=resolve_device(device),
                        out_dir=out_dir or default_out_dir(path), stage_params=stage_params,
                        data=_image_folders(recipe, family, path), _loaded=loaded)


def _image_folders(recipe: _RunSettings, family: ModelFamily, path: Path) -> DataRecord:
    """data.images and data.eval_images as the family lists them: refused now if empty or unreadable to it."""
    if recipe.data.eval_images is not None and not family.agreement_metric:
        raise UsageError(f"{path}: data.eval_images: model family {family.name} has no agreement metric")
    folders = {}
    for field_name in ("images", "eval_images"):
        folder = getattr(recipe.data, field_name)
        if folder is None:
            continue
        try:
            files = family.list_images(folder)
        except NotImplementedError:
            raise UsageError(f"{path}: data.{field_name}: model family {family.name} reads no images "
                             "without labels") from None
        except UsageError as err:
            raise UsageError(f"{path}: data.{field_name}: {err}") from err
        folders[field_name] = ImageFolder(path=str(folder), files=len(files))
    return DataRecord(**folders)


def _family(recipe: _RunSettings, app: App, path: Path) -> tuple[ModelFamily, LoadedModel | None]:
    """``model.family``; when left out, the checkpoint's family, or the only one registered."""
    registry = app.registry
    if recipe.model.family is not None:
        return registry.get_family(recipe.model.family, where=f"{path}: model.family: "), None
    if recipe.model.checkpoint is not None:
        loaded = open_model(recipe.model.checkpoint, registry)
        return loaded.family, loaded
    if len(registry.families) == 1:
        return next(iter(registry.families.values())), None
    raise UsageError(f"{path}: model.family: required without model.checkpoint "
                     f"(families: {', '.join(registry.families) or 'none registered'})")
