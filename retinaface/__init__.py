"""RetinaFace: the model family's own modules, model and original-checkpoint loader.

What it shares with other face detectors (body, SSH, heads, priors, box coding,
detection, data, evaluation) lives in :mod:`facedet`.
"""

from .model import RetinaFace, retinaface_mnet025
from .original import load_original_checkpoint

__all__ = ["RetinaFace", "load_original_checkpoint", "retinaface_mnet025"]
