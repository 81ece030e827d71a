"""The folder a run (or a training) owns: created, locked for one process, cleaned, and never left.

``compress run`` and ``compress train`` hold a :class:`RunFolder` for as long as
they work: a second process pointed at the same ``--out`` is refused in one line
instead of interleaving its writes, temporaries left by an interrupted write
are removed once the lock is held, and every path the run writes is checked to
stay inside the folder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from .atomic import remove_stale_temporaries
from .errors import OutputError, UsageError

LOCK_NAME = ".lock"


class RunFolder:
    """``with RunFolder(path): ...`` owns ``path`` for the block (exclusively, across processes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle: int | None = None
        self._created = False

    def __enter__(self) -> RunFolder:
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"{self.path}: cannot use as output folder ({err.strerror or err})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode(errors="replace").strip() or "?"
            os.close(handle)
            raise UsageError(f"{self.path}: another process (pid {holder}) is running in this folder; "
                             "wait for it to finish or use another --out") from None
        os.ftruncate(handle, 0)
        os.write(handle, str(os.getpid()).encode())
        self._handle = handle
        remove_stale_temporaries(self.path)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._handle is not None:
            # Unlink before unlocking: a process that opens the name afterwards gets a fresh lock file.
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None
            if self._created and not any(self.path.iterdir()):
                self.path.rmdir()  # a command that failed before writing anything leaves nothing behind

    def inside(self, *parts: str) -> Path:
        """``path / parts``, refused if it would resolve outside the folder."""
        target = self.path.joinpath(*parts)
        if not target.resolve().is_relative_to(self.path.resolve()):
            raise UsageError(f"{target}: outside the run folder {self.path}")
        return target
