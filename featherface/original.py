"""Loading checkpoints written by the original FeatherFace implementation.

The original names its modules differently (``body.stage1.0.0``,
``bacbkbone_0_cbam.ChannelGate.mlp.1``, ``ssh1_cs.3`` ...).  Every original key
is translated by one of the rules below; a key no rule knows, a key the model
expects but the file lacks, or a shape that does not fit is reported by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from .model import FeatherFace, featherface_baseline


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model it is meant for."""


_DW_LAYER = {"0": "depthwise", "1": "depthwise_bn", "3": "pointwise", "4": "pointwise_bn"}
_SHUFFLE_LAYER = {"1": "reduce", "2": "reduce_bn", "3": "depthwise", "4": "depthwise_bn", "5": "expand", "6": "expand_bn"}
_HEAD = {"ClassHead": "class_convs", "BboxHead": "box_convs", "LandmarkHead": "landmark_convs"}
_CBAM_PART = {"ChannelGate.mlp.1": "channel_gate.fc1", "ChannelGate.mlp.3": "channel_gate.fc2",
              "SpatialGate.spatial.conv": "spatial_gate.conv", "SpatialGate.spatial.bn": "spatial_gate.bn"}
_PROJECTION_PART = {"0.conv": "conv", "1": "bn"}
_SEPARABLE_PART = {"depthwise_conv.conv": "depthwise", "pointwise_conv.conv": "pointwise", "bn": "bn"}


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


# (pattern, replacement); the first that matches and whose lookups succeed wins.
_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"body\.stage([123])\.(\d+)\.([0134])\.(\w+)"), _body),
    (re.compile(r"bacbkbone_(\d)_cbam\.(ChannelGate\.mlp\.[13]|SpatialGate\.spatial\.(?:conv|bn))\.(\w+)"),
     lambda m: f"backbone_cbam.{m[1]}.{_CBAM_PART[m[2]]}.{m[3]}"),
    (re.compile(r"bif_cbam_(\d)\.(ChannelGate\.mlp\.[13]|SpatialGate\.spatial\.(?:conv|bn))\.(\w+)"),
     lambda m: f"bifpn_cbam.{m[1]}.{_CBAM_PART[m[2]]}.{m[3]}"),
    (re.compile(r"bifpn\.(\d)\.(p[345]_w[12])"), lambda m: f"bifpn.{m[1]}.{m[2]}.weight"),
    (re.compile(r"bifpn\.(\d)\.(conv[345]_(?:up|down))\.(depthwise_conv\.conv|pointwise_conv\.conv|bn)\.(\w+)"),
     lambda m: f"bifpn.{m[1]}.{m[2]}.{_SEPARABLE_PART[m[3]]}.{m[4]}"),
    (re.compile(r"bifpn\.(\d)\.(p[345]_down_channel(?:_2)?)\.(0\.conv|1)\.(\w+)"),
     lambda m: f"bifpn.{m[1]}.{m[2]}.{_PROJECTION_PART[m[3]]}.{m[4]}"),
    (re.compile(r"ssh([123])\.(conv3X3|conv5X5_1|conv5X5_2|conv7X7_2|conv7x7_3)\.([01])\.(.+)"), _ssh),
    (re.compile(r"ssh([123])_cs\.([1-6])\.(\w+)"),
     lambda m: f"shuffle.{int(m[1]) - 1}.{_SHUFFLE_LAYER[m[2]]}.{m[3]}"),
    (re.compile(r"(ClassHead|BboxHead|LandmarkHead)\.(\d)\.conv1x1\.(\w+)"),
     lambda m: f"heads.{_HEAD[m[1]]}.{m[2]}.{m[3]}"),
]


def translate_key(key: str) -> str | None:
    """Our name for an original FeatherFace state_dict key, or None if it is not one."""
    for pattern, replace in _RULES:
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


def translate_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename original keys to ours and check names and shapes against ``model``."""
    expected = model.state_dict()
    translated: dict[str, Tensor] = {}
    unknown, mismatched = [], []
    for key, value in state.items():
        ours = translate_key(key)
        if ours is None or ours not in expected:
            unknown.append(key)
            continue
        if value.shape != expected[ours].shape:
            mismatched.append(f"{key} {tuple(value.shape)} (expected {tuple(expected[ours].shape)})")
        translated[ours] = value
    missing = [k for k in expected if k not in translated]
    problems = []
    if unknown:
        problems.append(f"unexpected keys: {_short_list(unknown)}")
    if missing:
        problems.append(f"missing weights for: {_short_list(missing)}")
    if mismatched:
        problems.append(f"shape mismatch: {_short_list(mismatched)}")
    if problems:
        raise CheckpointError("not a FeatherFace checkpoint: " + "; ".join(problems))
    return translated


def _short_list(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def load_original_checkpoint(content: Mapping[str, Tensor]) -> FeatherFace:
    """Build the baseline and load an original implementation's state_dict into it.

    Takes the state_dict as read (``torch.load(path, weights_only=True)``), bare,
    wrapped under ``"state_dict"``, and/or with the ``module.`` prefix
    DataParallel adds; from a file, ``compressor.load_model(path)`` does the
    reading and recognises it.  Returns the model in eval mode; its forward
    returns raw class logits (apply softmax for scores).
    """
    state = read_state_dict(content)
    model = featherface_baseline()
    model.load_state_dict(translate_state_dict(state, model))
    return model.eval()


def load_pretrained_backbone(backbone: nn.Module, content: Mapping[str, Tensor]) -> nn.Module:
    """Initialise a MobileNetV1-0.25 body from the ImageNet checkpoint the original training uses.

    That file holds ``{"state_dict": {"module.stage1.0.0.weight": ...}}`` plus a
    classifier (``fc``) the detector has no use for; it is dropped.
    """
    state = read_state_dict(content)
    weights: dict[str, Tensor] = {}
    for key, value in state.items():
        ours = translate_key(f"body.{key}")
        if ours is not None:
            weights[ours[len("backbone."):]] = value
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in weights]
    mismatched = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
                  for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if missing or mismatched:
        detail = "; ".join(filter(None, [
            f"missing: {_short_list(missing)}" if missing else "",
            f"shape mismatch: {_short_list(mismatched)}" if mismatched else "",
        ]))
        raise CheckpointError(f"not a MobileNetV1 backbone of this width: {detail}")
    backbone.load_state_dict({k: v for k, v in weights.items() if k in expected})
    return backbone
