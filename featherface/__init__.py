"""FeatherFace: the model family's own modules, model and original-checkpoint loader.

What it shares with other face detectors (body, SSH, heads, priors, box coding,
detection, data, evaluation) lives in :mod:`facedet`.
"""

from .model import FeatherFace, featherface_baseline
from .original import load_original_checkpoint

__all__ = ["FeatherFace", "featherface_baseline", "load_original_checkpoint"]
