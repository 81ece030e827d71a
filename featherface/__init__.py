"""FeatherFace: the model family (modules, specs, priors, box coding, detection, evaluation)."""

from .model import FeatherFace, featherface_baseline
from .original import CheckpointError, load_original_checkpoint, load_pretrained_backbone
from .spec import from_spec, to_spec

__all__ = [
    "CheckpointError",
    "FeatherFace",
    "featherface_baseline",
    "from_spec",
    "load_original_checkpoint",
    "load_pretrained_backbone",
    "to_spec",
]
