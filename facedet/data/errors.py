"""The data layer's one error type.

``featherface`` cannot import the engine, so bad data is reported with these
ValueError subclasses; their message is one line naming the place (root,
file, line) and what is wrong, and the family plugin turns them into the
engine's ``UsageError`` as they are.
"""

from __future__ import annotations

__all__ = ["DataError", "NoUsableImagesError"]


class DataError(ValueError):
    """Bad input data: a label file, an image, a dataset root, a setting for them."""


class NoUsableImagesError(DataError, RuntimeError):
    """A split where not a single listed image can be decoded.

    Also a RuntimeError, which is what this case raised before DataError existed.
    """
