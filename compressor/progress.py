"""Progress on stderr: where a run is, and how long the rest will take.

On a terminal the training steps drive a live ``tqdm`` bar (rate, ETA, loss and lr);
anywhere else (CI, a log file, a pipe) they are plain lines that survive logs and grep::

        step 10/80  loss 1.234  lr 0.001  eta 1m05s
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType

import click
from tqdm import tqdm

#: Without a terminal: a line every this many steps, and for the last one ...
LINE_EVERY_STEPS = 10
#: ... and, when steps are slow, at least one every this many seconds (at the end of a step).
LINE_EVERY_SECONDS = 30.0


class Progress:
    """Stage headers, messages and training steps on stderr; ``quiet`` silences everything.

    ``step(total, total)`` finishes (and closes) the bar by itself; ``close()``, or using
    the object as a context manager, ends one left open by training that stopped early.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._step_started = time.monotonic()
        self._wall_started: float | None = None  # start_steps() in tqdm's wall-clock time, for the next bar
        self._last_line = self._step_started    # when the last plain step line was printed
        self._last_line_step: int | None = None
        self._bar: tqdm | None = None

    # ------------------------------------------------------------------ messages

    def echo(self, message: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)   # above the bar, which is redrawn below it
        else:
            click.echo(message, err=True)

    def stage(self, index: int, count: int, label: str, pass_name: str) -> None:
        self.close()
        self.echo(f"[{index}/{count}] {label} ({pass_name})")

    # ------------------------------------------------------------------ training steps

    def start_steps(self) -> None:
        self.close()
        self._step_started = time.monotonic()
        self._wall_started = time.time()
        self._last_line = self._step_started
        self._last_line_step = None

    def step(self, step: int, total: int, **values: float) -> None:
        """One training step: step i/N, the values given (loss, lr), and the ETA."""
        if self.quiet:
            return
        if self._bar is not None or _interactive():
            self._bar_step(step, total, values)
        else:
            self._line_step(step, total, values)

    def close(self) -> None:
        """End the bar, if one is open (it stays on screen as it last was)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ the two displays

    def _bar_step(self, step: int, total: int, values: dict[str, float]) -> None:
        bar = self._bar
        if bar is None or bar.total != total or step < bar.n:
            self.close()
            # a terminal of size 0 (a pty nobody sized) would get an empty, hidden bar: give it one
            unsized = 0 in _terminal_size()
            bar = self._bar = tqdm(total=total, desc="    step", unit="step", file=sys.stderr, leave=True,
                                   dynamic_ncols=not unsized, ncols=100 if unsized else None,
                                   nrows=24 if unsized else None)
            if self._wall_started is not None:
                # the first step's time counts, as it does for the plain lines' ETA
                bar.start_t = bar.last_print_t = self._wall_started
                self._wall_started = None
        bar.set_postfix({name: f"{value:.4g}" for name, value in values.items()}, refresh=False)
        bar.update(step - bar.n)
        if step >= total:
            self.close()

    def _line_step(self, step: int, total: int, values: dict[str, float]) -> None:
        now = time.monotonic()
        due = step % LINE_EVERY_STEPS == 0 or step == total or now - self._last_line >= LINE_EVERY_SECONDS
        if not due or step == self._last_line_step:
            return
        self._last_line, self._last_line_step = now, step
        elapsed = now - self._step_started
        eta = elapsed / step * (total - step) if step > 0 else 0.0
        parts = [f"step {step}/{total}", *(f"{name} {value:.4g}" for name, value in values.items()),
                 f"eta {_duration(eta)}"]
        click.echo("    " + "  ".join(parts), err=True)


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # no stderr, or a closed one
        return False


def _terminal_size() -> tuple[int, int]:
    """(columns, lines) of the terminal on stderr; (-1, -1) where it cannot be asked."""
    try:
        return tuple(os.get_terminal_size(sys.stderr.fileno()))
    except (AttributeError, OSError, ValueError):
        return (-1, -1)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
