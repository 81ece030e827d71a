"""Reading checkpoints written by the original face-detector implementations.

The original code names its modules differently from ours (``body.stage1.0.0``,
``ssh1.conv5X5_1.0``, ``ClassHead.0.conv1x1`` ...).  The body, SSH and head names
are common to the RetinaFace-style detectors; each family adds rules for its own
parts and hands them to :func:`translate_state_dict`, which reports by name a key
no rule knows, a weight the model expects but the file lacks, and a shape that
does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model it is meant for."""


#: A translation rule: (pattern matched against the whole original key, our name from the match).
Rule = tuple[re.Pattern, Callable[[re.Match], str]]

_DW_LAYER = {"0": "depthwise", "1": "depthwise_bn", "3": "pointwise", "4": "pointwise_bn"}
_HEAD = {"ClassHead": "class_convs", "BboxHead": "box_convs", "LandmarkHead": "landmark_convs"}


def _body(m: re.Match) -> str:
    stage, layer, part, rest = m.groups()
    if stage == "1" and layer == "0":
        name = {"0": "conv", "1": "bn"}[part]
    else:
        name = _DW_LAYER[part]
    return f"backbone.stage{stage}.{layer}.{name}.{rest}"


def _ssh(m: re.Match) -> str:
    level, conv, part, rest = m.groups()
    return f"ssh.{int(level) - 1}.{conv.lower()}.{ {'0': 'conv', '1': 'bn'}[part] }.{rest}"


#: The MobileNetV1 body, the SSH modules (the original writes ``conv7x7_3`` in lower case) and the heads.
SHARED_RULES: list[Rule] = [
    (re.compile(r"body\.stage([123])\.(\d+)\.([0134])\.(\w+)"), _body),
    (re.compile(r"ssh([123])\.(conv3X3|conv5X5_1|conv5X5_2|conv7X7_2|conv7x7_3)\.([01])\.(.+)"), _ssh),
    (re.compile(r"(ClassHead|BboxHead|LandmarkHead)\.(\d)\.conv1x1\.(\w+)"),
     lambda m: f"heads.{_HEAD[m[1]]}.{m[2]}.{m[3]}"),
]


def translate_key(key: str, rules: Sequence[Rule]) -> str | None:
    """Our name for an original state_dict key, or None if no rule knows it."""
    for pattern, replace in rules:
        match = pattern.fullmatch(key)
        if match:
            return replace(match)
    return None


def read_state_dict(content: object) -> dict[str, Tensor]:
    """A bare state_dict from a checkpoint's content: unwraps ``{"state_dict": ...}``, strips ``module.``.

    Files are read by the engine (``compressor.load_model`` recognises these
    checkpoints); this package only interprets what was read.
    """
    state = content
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError("does not hold a state_dict (a mapping of names to tensors)")
    return {_strip_prefix(k): v for k, v in state.items()}


def _strip_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def translate_state_dict(state: Mapping[str, Tensor], model: nn.Module, rules: Sequence[Rule],
                         what: str) -> dict[str, Tensor]:
    """Rename original keys to ours with ``rules`` and check names and shapes against ``model``.

    ``what`` names the expected checkpoint in the message ("not a {what} checkpoint: ...").
    """
    expected = model.state_dict()
    translated: dict[str, Tensor] = {}
    unknown, mismatched = [], []
    for key, value in state.items():
        ours = translate_key(key, rules)
        if ours is None or ours not in expected:
            unknown.append(key)
            continue
        if value.shape != expected[ours].shape:
            mismatched.append(f"{key} {tuple(value.shape)} (expected {tuple(expected[ours].shape)})")
        translated[ours] = value
    missing = [k for k in expected if k not in translated]
    problems = []
    if unknown:
        problems.append(f"unexpected keys: {short_list(unknown)}")
    if missing:
        problems.append(f"missing weights for: {short_list(missing)}")
    if mismatched:
        problems.append(f"shape mismatch: {short_list(mismatched)}")
    if problems:
        raise CheckpointError(f"not a {what} checkpoint: " + "; ".join(problems))
    return translated


def short_list(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def load_pretrained_backbone(backbone: nn.Module, content: Mapping[str, Tensor]) -> nn.Module:
    """Initialise a MobileNetV1-0.25 body from the ImageNet checkpoint the original training uses.

    That file holds ``{"state_dict": {"module.stage1.0.0.weight": ...}}`` plus a
    classifier (``fc``) the detector has no use for; it is dropped.
    """
    state = read_state_dict(content)
    weights: dict[str, Tensor] = {}
    for key, value in state.items():
        ours = translate_key(f"body.{key}", SHARED_RULES)
        if ours is not None:
            weights[ours[len("backbone."):]] = value
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in weights]
    mismatched = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
                  for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if missing or mismatched:
        detail = "; ".join(filter(None, [
            f"missing: {short_list(missing)}" if missing else "",
            f"shape mismatch: {short_list(mismatched)}" if mismatched else "",
        ]))
        raise CheckpointError(f"not a MobileNetV1 backbone of this width: {detail}")
    backbone.load_state_dict({k: v for k, v in weights.items() if k in expected})
    return backbone
