"""RetinaFace's own building blocks; the body, SSH and heads are :mod:`facedet.modules`."""

from .fpn import FPN

__all__ = ["FPN"]
