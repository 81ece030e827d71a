"""Parsing input sizes given on the command line or in recipes."""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE = re.compile(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?")


def parse_input_size(text: str | int | list | tuple) -> tuple[int, int]:
    """``640`` -> (640, 640); ``"480x640"`` -> (480, 640) as (height, width)."""
    if isinstance(text, int):
        return (text, text)
    if isinstance(text, (list, tuple)) and len(text) == 2 and all(isinstance(v, int) for v in text):
        return (text[0], text[1])
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise UsageError(f"input size {text!r}: expected H or HxW, e.g. 640 or 480x640")
    height = int(match[1])
    width = int(match[2]) if match[2] else height
    return (height, width)
