"""Atomic file writes: a crash or SIGKILL leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import OutputError

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write through ``write(file)`` into a temporary file, fsync, then rename over ``path``.

    A crash or SIGKILL at any moment leaves either the old file or the new one,
    never a torn one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({_reason(err)})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException as err:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        if isinstance(err, OSError):
            raise OutputError(f"{path}: cannot write ({_reason(err)})") from err
        if isinstance(err, RuntimeError) and ("write" in str(err).lower() or "unexpected pos" in str(err)):
            # torch.save reports a failed write (a full disk) as RuntimeError("... unexpected pos ...")
            raise OutputError(f"{path}: cannot write (the write failed: is the disk full?)") from err
        raise
    _fsync_directory(path.parent)


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files interrupted atomic writes left under ``folder``; returns them.

    Only call it while no process writes there (a run holds its folder's lock).
    """
    removed = []
    for path in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
