"""Loading checkpoints written by the original FeatherFace implementation.

Besides the names it shares with RetinaFace-style detectors (body, SSH, heads:
:data:`facedet.original.SHARED_RULES`), the original names its CBAMs
``bacbkbone_0_cbam.ChannelGate.mlp.1``, its BiFPN cells ``bifpn.0.conv4_up`` and
its channel-shuffle blocks ``ssh1_cs.3``; the rules below translate those.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from facedet.original import SHARED_RULES, Rule, read_state_dict, translate_key, translate_state_dict

from .model import FeatherFace, featherface_baseline

_SHUFFLE_LAYER = {"1": "reduce", "2": "reduce_bn", "3": "depthwise", "4": "depthwise_bn", "5": "expand", "6": "expand_bn"}
_CBAM_PART = {"ChannelGate.mlp.1": "channel_gate.fc1", "ChannelGate.mlp.3": "channel_gate.fc2",
              "SpatialGate.spatial.conv": "spatial_gate.conv", "SpatialGate.spatial.bn": "spatial_gate.bn"}
_PROJECTION_PART = {"0.conv": "conv", "1": "bn"}
_SEPARABLE_PART = {"depthwise_conv.conv": "depthwise", "pointwise_conv.conv": "pointwise", "bn": "bn"}

# (pattern, replacement); the first that matches and whose lookups succeed wins.
_OWN_RULES: list[Rule] = [
    (re.compile(r"bacbkbone_(\d)_cbam\.(ChannelGate\.mlp\.[13]|SpatialGate\.spatial\.(?:conv|bn))\.(\w+)"),
     lambda m: f"backbone_cbam.{m[1]}.{_CBAM_PART[m[2]]}.{m[3]}"),
    (re.compile(r"bif_cbam_(\d)\.(ChannelGate\.mlp\.[13]|SpatialGate\.spatial\.(?:conv|bn))\.(\w+)"),
     lambda m: f"bifpn_cbam.{m[1]}.{_CBAM_PART[m[2]]}.{m[3]}"),
    (re.compile(r"bifpn\.(\d)\.(p[345]_w[12])"), lambda m: f"bifpn.{m[1]}.{m[2]}.weight"),
    (re.compile(r"bifpn\.(\d)\.(conv[345]_(?:up|down))\.(depthwise_conv\.conv|pointwise_conv\.conv|bn)\.(\w+)"),
     lambda m: f"bifpn.{m[1]}.{m[2]}.{_SEPARABLE_PART[m[3]]}.{m[4]}"),
    (re.compile(r"bifpn\.(\d)\.(p[345]_down_channel(?:_2)?)\.(0\.conv|1)\.(\w+)"),
     lambda m: f"bifpn.{m[1]}.{m[2]}.{_PROJECTION_PART[m[3]]}.{m[4]}"),
    (re.compile(r"ssh([123])_cs\.([1-6])\.(\w+)"),
     lambda m: f"shuffle.{int(m[1]) - 1}.{_SHUFFLE_LAYER[m[2]]}.{m[3]}"),
]
RULES: list[Rule] = [*SHARED_RULES, *_OWN_RULES]

#: Key prefixes only FeatherFace's original checkpoints have (the rest is shared with RetinaFace).
DISTINCTIVE_PREFIXES = ("bifpn.", "bacbkbone_", "bif_cbam_")


def looks_original(state: Mapping[str, Tensor]) -> bool:
    """True when some key of the (unwrapped, unprefixed) state_dict is one of the original FeatherFace's own."""
    return any(k.startswith(DISTINCTIVE_PREFIXES) and translate_key(k, RULES) is not None for k in state)


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
    model.load_state_dict(translate_state_dict(state, model, RULES, "FeatherFace"))
    return model.eval()
