"""Building blocks shared by the face-detector families, each registered for architecture specs."""

from .backbone import MobileNetV1
from .deform import DeformableConv2d
from .heads import SeparateHeads, UnifiedHeads
from .ssh import SSH

__all__ = ["SSH", "DeformableConv2d", "MobileNetV1", "SeparateHeads", "UnifiedHeads"]
