"""Progress lines on stderr: where a run is, and how long the rest will take."""

from __future__ import annotations

import sys
import time

import click


class Progress:
    """Plain lines (they survive logs and CI); ``quiet`` silences everything."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._step_started = 0.0

    def echo(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def stage(self, index: int, count: int, label: str, pass_name: str) -> None:
        self.echo(f"[{index}/{count}] {label} ({pass_name})")

    def start_steps(self) -> None:
        self._step_started = time.monotonic()

    def step(self, step: int, total: int, **values: float) -> None:
        """One training step: step i/N, the values given (loss, lr), and the ETA."""
        interactive = sys.stderr.isatty()
        # In logs (not a terminal) every tenth step is enough.
        if self.quiet or (not interactive and step % 10 and step != total):
            return
        elapsed = time.monotonic() - self._step_started
        eta = elapsed / step * (total - step) if step else 0.0
        shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        end = "\n" if step == total or not interactive else "\r"
        click.echo(f"    step {step}/{total}  {shown}  eta {_duration(eta)}", err=True, nl=False)
        click.echo(end, err=True, nl=False)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
