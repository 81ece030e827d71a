"""What the benchmark scripts (``compare.py``, ``frontier.py``) share, so each piece is written once.

Both scripts behave alike where they meet the user and the machine: a problem
is one line on stderr with the compress CLI's exit codes (2 bad input, 1
failure); every measurement runs in a fresh child process (the script again,
in a hidden mode that prints one JSON line) whose thread pools are sized
before it imports torch; and each report describes the machine it was
measured on.  Those parts live here.

The scripts run as ``python benchmarks/X.py``, so this folder is on
``sys.path`` and they import this module by its name; loaded by path (as the
tests do), they put the folder there themselves first.

Nothing here imports torch: the parent process only orchestrates, and its
small footprint must stay small (see ``compare.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, NoReturn

#: The hidden child mode that measures one model and prints its result as one JSON line.
MEASURE_ONE = "--measure-one"


class ScriptError(Exception):
    """A problem reported as one line; ``exit_code`` follows the compress CLI (2 bad input, 1 failure)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_on_error(work: Callable[[], int]) -> int:
    """``work()``'s exit code; a :class:`ScriptError` or Ctrl-C becomes one ``error:`` line (and 130 for Ctrl-C).

    The scripts' ``main``: a failure the script foresaw is reported like the compress CLI's, not as a traceback.
    """
    try:
        return work()
    except ScriptError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like the compress CLI's), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def non_negative(text: str) -> int:
    """An argparse type: an integer of at least 0 (a count that may be none, e.g. warm-up forwards)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 0")
    return value


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1 (sizes, thread counts, rounds)."""
    value = non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def child_parser(prog: str, measure: bool = True) -> OneLineParser:
    """The hidden child mode's parser: ``--source``, and with ``measure`` what one timing needs.

    The parent alone builds these command lines (see :func:`run_child`), so every argument is required.
    """
    parser = OneLineParser(prog=prog)
    parser.add_argument("--source", required=True)
    if measure:
        parser.add_argument("--size", type=positive, required=True)
        parser.add_argument("--threads", type=positive, required=True)
        parser.add_argument("--runs", type=positive, required=True)
        parser.add_argument("--warmup", type=non_negative, required=True)
    return parser


# ------------------------------------------------------------ child processes


def print_result(measure: Callable[[], dict[str, Any]]) -> int:
    """The child's end: ``measure()``'s result as one JSON line on stdout (what :func:`run_child` reads), exit 0.

    A :class:`~compressor.errors.CompressorError` becomes its one line on stderr and its exit code, which
    the parent passes on.
    """
    from compressor.errors import CompressorError

    try:
        result = measure()
    except CompressorError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(result))
    return 0


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of a child: OpenMP/MKL pools sized before the child imports torch."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def last_line(done: subprocess.CompletedProcess) -> str:
    """A failed command's reason: its last line on stderr, without the ``error:`` prefix."""
    lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
    return lines[-1].removeprefix("error: ").removeprefix("Error: ")


def run_child(script: Path, args: list[str], threads: int | None, what: str) -> dict[str, Any]:
    """Run ``script`` (a hidden child mode and its arguments in ``args``) and return the JSON it printed.

    ``subprocess.run`` blocks: the parent sleeps while the child measures.  A
    failure is a :class:`ScriptError` named by ``what``: exit code 2 where the
    child's was (bad input), else 1.
    """
    command = [sys.executable, str(script.resolve()), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(threads))
    if done.returncode != 0:
        raise ScriptError(f"{what}: {last_line(done)}", 2 if done.returncode == 2 else 1)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ScriptError(f"{what}: the measuring process printed no result", 1)
    return json.loads(lines[-1])


# ------------------------------------------------------------------ the machine


def cpu_model() -> str:
    """The processor's name (Linux /proc/cpuinfo, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none): a busy machine slows every number."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def usable_cores() -> int | None:
    """The cores this process may run on (its affinity), which can be fewer than the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def command_line(script: Path, argv: list[str]) -> str:
    """The command that reproduces this run, with the script's path relative to where it was started."""
    return shlex.join(["python", os.path.relpath(script.resolve(), Path.cwd()), *argv])


def environment(versions: dict[str, str | None], script: Path, argv: list[str], started: datetime,
                load: list[float] | None) -> dict[str, Any]:
    """The report's ``environment``: ``versions`` (the runtimes the children measured with) and the machine."""
    return {
        **versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        # A busy machine slows every number; the load before the run says whether it was quiet.
        "load_average_at_start": load,
        "load_average_at_end": load_average(),
        "date": started.isoformat(timespec="seconds"),
        "command": command_line(script, argv),
    }


# ------------------------------------------------------------------ markdown


def format_load(load: list[float] | None) -> str:
    """A load average for the markdown: ``0.12, 0.30, 0.25``, or ``n/a``."""
    return "n/a" if not load else ", ".join(f"{v:.2f}" for v in load)


def threads_label(count: int) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{count} thread" if count == 1 else f"{count} threads"
