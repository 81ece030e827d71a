"""A folder of images without labels: the photographs of a user's own deployment domain."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError

#: File suffixes read as images (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: str | Path) -> list[Path]:
    """Every jpg/jpeg/png file under ``folder`` (recursively, hidden entries skipped), in a stable order.

    Raises :class:`DataError` naming the folder when it is missing or holds no such file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of images")
    found = sorted(
        path for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    if not found:
        raise DataError(f"{root}: no image files (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    return found
