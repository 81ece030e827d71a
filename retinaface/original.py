"""Loading checkpoints written by the original RetinaFace implementation (biubug6/Pytorch_Retinaface).

Its body, SSH and head names are the shared ones
(:data:`facedet.original.SHARED_RULES`); its pyramid is
``fpn.output{1,2,3}`` (laterals) and ``fpn.merge{1,2}``, each a
``Sequential(conv, bn, leaky)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from facedet.original import SHARED_RULES, Rule, read_state_dict, translate_state_dict

from .model import RetinaFace, retinaface_mnet025

_PART = {"0": "conv", "1": "bn"}

RULES: list[Rule] = [
    *SHARED_RULES,
    (re.compile(r"fpn\.output([123])\.([01])\.(\w+)"), lambda m: f"fpn.lateral.{int(m[1]) - 1}.{_PART[m[2]]}.{m[3]}"),
    (re.compile(r"fpn\.merge([12])\.([01])\.(\w+)"), lambda m: f"fpn.merge.{int(m[1]) - 1}.{_PART[m[2]]}.{m[3]}"),
]


def looks_original(state: Mapping[str, Tensor]) -> bool:
    """True when the (unwrapped, unprefixed) state_dict has the original RetinaFace's pyramid keys."""
    return any(k.startswith(("fpn.output", "fpn.merge")) for k in state)


def load_original_checkpoint(content: Mapping[str, Tensor]) -> RetinaFace:
    """Build RetinaFace-MobileNet0.25 and load an original implementation's state_dict into it.

    Takes the state_dict as read (``torch.load(path, weights_only=True)``), bare,
    wrapped under ``"state_dict"``, and/or with the ``module.`` prefix; every key
    that does not fit is named.  Returns the model in eval mode; its forward
    returns raw class logits (apply softmax for scores).
    """
    state = read_state_dict(content)
    model = retinaface_mnet025()
    model.load_state_dict(translate_state_dict(state, model, RULES, "RetinaFace-MobileNet0.25"))
    return model.eval()
