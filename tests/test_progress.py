"""Progress: a tqdm bar on a terminal, plain periodic lines elsewhere, nothing when quiet."""

from __future__ import annotations

import re
import sys

import pytest

from compressor import progress as progress_mod
from compressor.progress import Progress


class FakeTime:
    """The module's clock: each ``tick`` seconds of 'work' pass when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(progress_mod, "time", fake)
    return fake


@pytest.fixture
def stderr_tty(monkeypatch):
    """``stderr_tty(True)``: stderr (pytest's capture) claims to be a terminal; ``False``: a log, a pipe, CI.

    Called from the test itself: pytest swaps in a new ``sys.stderr`` between setup and the call.
    """
    def force(tty: bool) -> None:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    return force


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line]


def test_plain_lines_every_tenth_step_and_the_last(stderr_tty, clock, capsys):
    stderr_tty(False)
    progress = Progress()
    progress.start_steps()
    for step in range(1, 26):
        clock.now += 1.0
        progress.step(step, 25, loss=1.23456, lr=0.001)
    out, err = capsys.readouterr()
    assert out == ""
    assert _lines(err) == [
        "    step 10/25  loss 1.235  lr 0.001  eta 15s",
        "    step 20/25  loss 1.235  lr 0.001  eta 5s",
        "    step 25/25  loss 1.235  lr 0.001  eta 0s",
    ]
    assert "\r" not in err


def test_plain_lines_show_life_when_steps_are_slow(stderr_tty, clock, capsys):
    stderr_tty(False)
    progress = Progress()
    progress.start_steps()
    for step in range(1, 8):
        clock.now += 12.0                       # a line once 30 s have passed since the last one
        progress.step(step, 80, loss=0.5)
        progress.step(step, 80, loss=0.5)       # never two lines for one step
    lines = _lines(capsys.readouterr().err)
    assert [re.match(r"    step (\d+)/80 ", line).group(1) for line in lines] == ["3", "6"]
    assert lines[0] == "    step 3/80  loss 0.5  eta 15m24s"

    progress.start_steps()
    for step in range(1, 4):
        clock.now += 45.0                       # every step slower than 30 s: a line for each
        progress.step(step, 3)
    assert _lines(capsys.readouterr().err) == ["    step 1/3  eta 1m30s", "    step 2/3  eta 45s",
                                               "    step 3/3  eta 0s"]


def test_echo_and_stage_without_a_terminal(stderr_tty, capsys):
    stderr_tty(False)
    progress = Progress()
    progress.stage(2, 7, "2 unify_heads", "unify_heads")
    progress.echo("    evaluating on the validation split ...")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "[2/7] 2 unify_heads (unify_heads)\n    evaluating on the validation split ...\n"


@pytest.mark.parametrize("tty", [True, False])
def test_quiet_prints_nothing(tty, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    with Progress(quiet=True) as progress:
        progress.stage(1, 2, "1 ssh", "ssh_slim")
        progress.echo("hello")
        progress.start_steps()
        for step in range(1, 21):
            progress.step(step, 20, loss=1.0, lr=0.1)
        progress.close()
    assert capsys.readouterr() == ("", "")


def test_terminal_gets_a_tqdm_bar_that_closes_itself(stderr_tty, capsys):
    stderr_tty(True)
    progress = Progress()
    progress.start_steps()
    for step in range(1, 6):
        progress.step(step, 5, loss=1.23456, lr=0.001)
    assert progress._bar is None                    # the last step closed it
    out, err = capsys.readouterr()
    assert out == ""
    assert "\r" in err and err.endswith("\n")
    final = err.rstrip("\n").split("\r")[-1]        # what stays on screen
    assert final.startswith("    step: 100%") and "5/5" in final
    assert "loss=1.235" in final and "lr=0.001" in final
    assert "step/s" in final or "s/step" in final   # the rate
    progress.echo("after the bar")
    assert capsys.readouterr().err == "after the bar\n"


def test_echo_during_a_bar_gets_its_own_line(stderr_tty, capsys):
    stderr_tty(True)
    progress = Progress()
    progress.start_steps()
    progress.step(1, 10, loss=2.0)
    progress.step(2, 10, loss=1.5)
    progress.echo("    checkpoint written")
    progress.step(3, 10, loss=1.25)
    assert progress._bar is not None
    progress.close()                                # training stopped early: close() ends the bar
    assert progress._bar is None
    err = capsys.readouterr().err
    assert "    checkpoint written" in re.split(r"[\r\n]", err)   # a whole line, not mixed into the bar
    assert err.endswith("\n")
    assert "3/10" in err.rstrip("\n").split("\r")[-1]


def test_a_new_run_of_steps_starts_a_new_bar(stderr_tty, capsys):
    stderr_tty(True)
    progress = Progress()
    progress.start_steps()
    progress.step(1, 4, loss=1.0)
    first = progress._bar
    progress.start_steps()                          # the next stage's finetune
    assert first.disable and progress._bar is None  # the old bar was closed
    progress.step(1, 3, loss=0.5)
    assert progress._bar is not first and progress._bar.total == 3
    for step in (2, 3):
        progress.step(step, 3, loss=0.5)
    assert progress._bar is None
    assert "3/3" in capsys.readouterr().err
