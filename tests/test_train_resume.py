"""`compress train --resume` ends bit-identical to an uninterrupted training, wherever the first one died.

Kill points and what they leave on disk (checkpoints are atomic, final.pt is written last):

- before the first checkpoint: nothing to resume; ``--resume`` says so, a new start is the same training;
- right after step 1's checkpoint (a real SIGKILL) and mid-step 3 (an interrupt): last.pt at step 1 / 2;
- after the last step's checkpoint, before or during the BatchNorm recalibration: last.pt at the last step;
- after the recalibration and the report, before final.pt (an interrupt in its write);
- after final.pt: the training is complete, ``--resume`` changes nothing.

The uninterrupted run keeps a copy of every checkpoint it writes, so disk states can also be rebuilt
exactly without re-running the steps before them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import compressor.train as train_module
import compressor.train_run as train_run
from compressor.cli import cli

STEPS = 4
# `compress train` held after a given step's checkpoint, so a SIGKILL lands there for sure.
HELD_TRAIN = Path(__file__).parent / "fixtures" / "held_train.py"


@pytest.fixture(scope="module")
def recipe(small_embedded, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "train.yaml"
    path.write_text(f"model: {{family: featherface}}\ninput_size: 64\nseed: 2\ndata: {{root: {small_embedded}}}\n"
                    f"train: {{steps: {STEPS}, batch_size: 2, lr: 0.002, warmup_steps: 1, checkpoint_every: 1}}\n")
    return path


def invoke(*args: object):
    return CliRunner().invoke(cli, [*map(str, args), "--quiet", "--no-eval"], catch_exceptions=False)


class Killed(BaseException):
    """Raised at a kill point: like SIGKILL, nothing in the command catches it."""


@pytest.fixture(scope="module")
def straight(recipe, tmp_path_factory) -> Path:
    """An uninterrupted training, with a copy of last.pt after each of its checkpoints in snapshots/."""
    out = tmp_path_factory.mktemp("straight") / "run"
    snapshots = out.parent / "snapshots"
    snapshots.mkdir()
    real = train_run.save_checkpoint

    def copying(path, model, family, **kwargs):
        real(path, model, family, **kwargs)
        if Path(path).name == train_run.LAST_NAME:
            shutil.copy(path, snapshots / f"last-{kwargs['extra']['train_state']['step']}.pt")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_run, "save_checkpoint", copying)
        result = invoke("train", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in snapshots.iterdir()) == [f"last-{k}.pt" for k in range(1, STEPS + 1)]
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_identical(run: Path, straight: Path) -> None:
    a, b = weights(run / "final.pt"), weights(straight / "final.pt")
    assert a.keys() == b.keys()
    differing = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ, e.g. {differing[:3]}"


def folder_with(tmp_path: Path, straight: Path, last_step: int, *extra: str) -> Path:
    """The folder a kill right after checkpoint ``last_step`` leaves, plus ``extra`` files of the straight run."""
    out = tmp_path / "killed"
    out.mkdir()
    shutil.copy(straight.parent / "snapshots" / f"last-{last_step}.pt", out / train_run.LAST_NAME)
    for name in extra:
        shutil.copy(straight / name, out / name)
    return out


def test_the_last_checkpoint_holds_the_weights_before_recalibration(straight):
    # Else the cases below would not tell a resume that skips the recalibration from one that does not.
    before, after = weights(straight.parent / "snapshots" / f"last-{STEPS}.pt"), weights(straight / "final.pt")
    assert [k for k in before if not torch.equal(before[k], after[k])], "recalibration changed nothing"
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(("running_mean", "running_var",
                                                                                  "num_batches_tracked")))


def test_resume_without_a_training_is_refused(tmp_path, recipe):
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        result = invoke("train", recipe, "--out", out, "--resume")
        assert result.exit_code == 2
        assert result.output.strip() == f"error: {out}: no training to resume (no last.pt); start it without --resume"
        assert not (out / "last.pt").exists() and not (out / "final.pt").exists()
    assert not (tmp_path / "missing").exists()  # refused before anything is created


def test_killed_before_the_first_checkpoint_then_after_the_report_before_final(tmp_path, recipe, straight, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    from compressor_plugins.featherface_family import FAMILY

    real = FAMILY.task_loss

    def dies_in_step_1(outputs, targets, size):
        calls["n"] += 1
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(FAMILY, "task_loss", dies_in_step_1)
        with pytest.raises(Killed):
            invoke("train", recipe, "--out", out)
    assert calls["n"] == 1 and not (out / "last.pt").exists()
    refused = invoke("train", recipe, "--out", out, "--resume")
    assert refused.exit_code == 2 and "no training to resume" in refused.output
    assert FAMILY.task_loss == real

    # Start again (no --resume), and die writing final.pt: the report is written, final.pt is not.
    real_save = train_run.save_checkpoint

    def dies_writing_final(path, *args, **kwargs):
        if Path(path).name == "final.pt":
            raise Killed
        real_save(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_run, "save_checkpoint", dies_writing_final)
        with pytest.raises(Killed):
            invoke("train", recipe, "--out", out)
    assert (out / "train_report.json").exists() and not (out / "final.pt").exists()
    resumed = invoke("train", recipe, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_identical(out, straight)


def test_sigkill_after_the_first_checkpoint(tmp_path, recipe, straight):
    out = tmp_path / "run"
    command = [sys.executable, str(HELD_TRAIN), "train", str(recipe), "--out", str(out), "--quiet", "--no-eval"]
    process = subprocess.Popen(command, env={**os.environ, "HOLD_AFTER_STEP": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None and not (out / "last.pt").exists():
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()  # still running: held after its checkpoint
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["train_state"]["step"] == 1
    assert not (out / "final.pt").exists()
    resumed = invoke("train", recipe, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_identical(out, straight)


def test_killed_between_checkpoints_in_a_write(tmp_path, recipe, straight):
    """Killed in step 3, after checkpoint 2, while writing checkpoint 3 (a torn temporary file is left)."""
    out = folder_with(tmp_path, straight, 2)
    torn = out / ".last.pt.k1ll3d.tmp"  # what atomic_write_bytes leaves when killed mid-write
    torn.write_bytes(b"torn")
    resumed = invoke("train", recipe, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_identical(out, straight)
    assert not torn.exists()


@pytest.mark.parametrize("extra", [(), ("train_report.json",)], ids=["before-recalibration", "before-final"])
def test_killed_after_the_last_checkpoint(tmp_path, recipe, straight, extra):
    """Killed before or in the recalibration (last.pt only), or after the report but before final.pt."""
    out = folder_with(tmp_path, straight, STEPS, *extra)
    resumed = invoke("train", recipe, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_identical(out, straight)
    assert torch.load(out / "final.pt", map_location="cpu", weights_only=True)["steps"] == STEPS


def test_interrupted_in_the_recalibration(tmp_path, recipe, straight, monkeypatch):
    out = folder_with(tmp_path, straight, STEPS - 1)
    real = train_module.recalibrate_batchnorm

    def dies_halfway(model, batches, count):
        real(model, batches, count // 2)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "recalibrate_batchnorm", dies_halfway)
        with pytest.raises(Killed):
            invoke("train", recipe, "--out", out, "--resume")
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["train_state"]["step"] == STEPS
    assert not (out / "final.pt").exists()
    resumed = invoke("train", recipe, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_identical(out, straight)


def test_a_finished_training_is_complete_and_unchanged(tmp_path, recipe, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    files = ("final.pt", "last.pt", "train_report.json")
    before = {name: (out / name).read_bytes() for name in files}
    result = CliRunner().invoke(cli, ["train", str(recipe), "--out", str(out), "--resume", "--no-eval"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"{out}: training already complete ({STEPS}/{STEPS} steps, final.pt written); "
                                     "nothing to do")
    assert {name: (out / name).read_bytes() for name in files} == before
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(files)


def test_resume_with_another_recipe_names_the_field(tmp_path, recipe, straight):
    out = folder_with(tmp_path, straight, 2)
    result = CliRunner().invoke(cli, ["train", str(recipe), "--out", str(out), "--resume", "--quiet",
                                      "--set", "train.lr=0.003"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "the recipe differs" in result.output and "train.lr: 0.002 -> 0.003" in result.output
