"""Saving and loading checkpoints: atomic writes, weights plus an architecture spec.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` reads:
``{"format", "family", "spec", "state_dict", "recipe", "passes", "stage", ...}``.
The model is rebuilt from the spec by its family and the weights loaded into
it; no code is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .atomic import atomic_write_bytes
from .errors import UsageError
from .family import ModelFamily
from .plugins import Registry, load_registry

if TYPE_CHECKING:
    from .record import PassEntry

FORMAT = "compressor.checkpoint/1"
FINAL_NAME = "final.pt"
ONNX_SUFFIX = ".onnx"


def save_checkpoint(
    path: Path,
    model: nn.Module,
    family: ModelFamily,
    *,
    recipe: dict | None = None,
    passes: list[PassEntry] | None = None,
    extra: dict | None = None,
) -> None:
    """Save ``model`` as weights plus its family's spec, atomically; ``passes`` are those applied so far."""
    content = {
        "format": FORMAT,
        "family": family.name,
        "spec": family.spec_of(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "recipe": recipe,
        "passes": [p.model_dump(mode="json", by_alias=True) for p in passes or []],
    }
    content.update(extra or {})
    atomic_write_bytes(path, lambda handle: torch.save(content, handle))


def read_file(path: Path) -> object:
    """``torch.load`` with weights_only=True, on the CPU, with errors a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many unrelated types for a bad file
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
        raise UsageError(f"{path}: not a readable PyTorch checkpoint ({reason})") from err


@dataclass
class LoadedModel:
    family: ModelFamily
    model: nn.Module
    source: str
    checkpoint: dict = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int]:
        """The size the model was made for: its recipe's input size, else its family's default."""
        recipe = self.checkpoint.get("recipe")
        size = recipe.get("input_size") if isinstance(recipe, dict) else None
        if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return (size[0], size[1])
        return self.family.default_input_size


def resolve_checkpoint_path(path: Path) -> Path:
    """A run folder means its final model, or the last completed stage's checkpoint."""
    if not path.is_dir():
        return path
    final = path / FINAL_NAME
    if final.is_file():
        return final
    stages = sorted((path / "checkpoints").glob("stage-*.pt")) if (path / "checkpoints").is_dir() else []
    if not stages:
        raise UsageError(f"{path}: a folder with neither {FINAL_NAME} nor stage checkpoints (not a run folder)")
    return stages[-1]


def _is_run_folder(path: Path) -> bool:
    return (path / FINAL_NAME).is_file() or (path / "checkpoints").is_dir()


def open_model(source: str | Path, registry: Registry | None = None, *, allow_onnx: bool = False) -> LoadedModel:
    """A model from a family name (its baseline), a run folder or a checkpoint file.

    With ``allow_onnx``, also a ``.onnx`` file ``compress export`` wrote, as an
    :class:`compressor.onnx_model.OnnxModel`: for commands that only run a model.
    Without it such a file is refused in one line, since it has no weights to change or count.
    """
    registry = registry or load_registry()
    text = str(source)
    if text in registry.families and not (Path(text).is_file() or _is_run_folder(Path(text))):
        family = registry.families[text]
        return LoadedModel(family, family.baseline().eval(), text)
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{source}: neither a file, a run folder nor a model family (families: {', '.join(registry.families)})")
    path = resolve_checkpoint_path(path)
    if path.suffix.lower() == ONNX_SUFFIX:
        if not allow_onnx:
            raise UsageError(f"{path}: an exported ONNX model only runs (compress eval, detect, inspect); "
                             "this needs the PyTorch checkpoint it was exported from")
        from .onnx_model import open_onnx  # onnx and onnxruntime are slow to import: only when needed

        return open_onnx(path, registry)
    content = read_file(path)
    if isinstance(content, dict) and content.get("format") == FORMAT:
        return _from_own_format(content, path, registry)
    for family in registry.families.values():
        model = family.load_native(content, str(path))
        if model is not None:
            return LoadedModel(family, model.eval(), str(path))
    raise UsageError(
        f"{path}: not a checkpoint of any registered model family ({', '.join(registry.families)}){_key_hint(content)}"
    )


def _key_hint(content: object) -> str:
    """The first few keys of an unrecognised checkpoint, so the user sees what it is."""
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content:
        return ""
    keys = [str(k) for k in list(content)[:4]]
    more = f", ... ({len(content)} keys)" if len(content) > 4 else ""
    return f"; its keys begin: {', '.join(keys)}{more}"


def _from_own_format(content: dict, path: Path, registry: Registry) -> LoadedModel:
    """Rebuild a model from our checkpoint format, checking every part before trusting it."""
    family = registry.get_family(str(content.get("family")), where=f"{path}: ")
    spec, state = content.get("spec"), content.get("state_dict")
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: damaged checkpoint: no architecture spec")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UsageError(f"{path}: damaged checkpoint: no state_dict of named tensors")
    try:
        model = family.build(spec)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from err
    except Exception as err:  # a spec written by hand or damaged: wrong types, negative widths, ...
        raise UsageError(f"{path}: damaged checkpoint: its architecture spec does not build a {family.name} "
                         f"model ({type(err).__name__}: {_first_line(err)})") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise UsageError(f"{path}: weights do not fit the stored architecture ({' '.join(first[:2])})") from err
    return LoadedModel(family, model.eval(), str(path), content)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else "no detail"


def load_model(source: str | Path) -> nn.Module:
    """The model of a run folder (its final model), a checkpoint, or a family's baseline, in eval mode."""
    return open_model(source).model
