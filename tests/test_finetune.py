"""Finetuning with distillation inside runs, `compress train`, the NaN guard, and torchrun/DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compressor.cli import cli

TOY = Path(__file__).parent / "fixtures" / "toy_passes.py"
# `compress train` held after a given step's checkpoint, so a SIGKILL lands there for sure.
HELD_TRAIN = Path(__file__).parent / "fixtures" / "held_train.py"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_recipe(tmp_path: Path, data: Path, stages: str, finetune: str = "{steps: 2, batch_size: 2, lr: 0.0001}") -> Path:
    return write(tmp_path / "recipe.yaml",
                 f"model: {{family: featherface}}\nplugins: [{TOY}]\ninput_size: 64\nseed: 1\ndata: {{root: {data}}}\n"
                 f"finetune: {finetune}\nstages:\n{stages}")


def invoke(*args: str):
    return CliRunner().invoke(cli, [*args, "--quiet"], catch_exceptions=False)


def test_run_finetunes_with_distillation_and_measures_ap(tmp_path, small_embedded):
    path = run_recipe(tmp_path, small_embedded, "  - pass: plain_ssh\n  - pass: identity\n    finetune: {teacher: baseline, steps: 1}\n")
    result = invoke("run", str(path), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0.0 <= report["baseline"]["metrics"]["ap"] <= 1.0
    first, second = report["stages"]
    assert first["finetune"]["steps"] == 2 and first["finetune"]["teacher"] == "previous"
    assert second["finetune"]["steps"] == 1 and second["finetune"]["teacher"] == "baseline"
    assert "ap" in first["metrics"]
    # The final model's validation metrics are its last stage's; it is also measured on the held-out test split.
    final = report["final"]["metrics"]
    assert {k: v for k, v in final.items() if not k.startswith("test_")} == second["metrics"]
    assert {"test_ap", "test_ap_low", "test_ap_high"} <= final.keys()
    assert "accuracy_drop" in report["budget_check"]


def test_diverging_finetune_fails_its_stage_and_keeps_the_last_checkpoint(tmp_path, small_embedded, monkeypatch):
    from compressor_plugins.featherface_family import FAMILY

    real = FAMILY.task_loss

    def poisoned(outputs, targets, size):
        losses = real(outputs, targets, size)
        return {**losses, "loss": losses["loss"] * float("nan")}

    path = run_recipe(tmp_path, small_embedded, "  - pass: identity\n    finetune: {steps: 0}\n  - pass: plain_ssh\n")
    monkeypatch.setattr(FAMILY, "task_loss", poisoned)
    result = invoke("run", str(path), "--out", str(tmp_path / "run"))
    assert result.exit_code == 1
    assert "stage 2 (plain_ssh): finetune: loss is nan at step 1/2" in result.output
    assert (tmp_path / "run" / "checkpoints" / "stage-01-identity.pt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "stage-02-plain_ssh.pt").exists()


def train_recipe(tmp_path: Path, data: Path, steps: int) -> Path:
    return write(tmp_path / "train.yaml",
                 f"model: {{family: featherface}}\ninput_size: 64\nseed: 2\ndata: {{root: {data}}}\n"
                 f"train: {{steps: {steps}, batch_size: 2, lr: 0.001, warmup_steps: 2, checkpoint_every: 1}}\n")


def test_train_is_resumable_after_sigkill_and_deterministic(tmp_path, small_embedded):
    path = train_recipe(tmp_path, small_embedded, steps=6)
    out = tmp_path / "killed"
    command = [sys.executable, str(HELD_TRAIN), "train", str(path), "--out", str(out), "--quiet", "--no-eval"]
    process = subprocess.Popen(command, env={**os.environ, "HOLD_AFTER_STEP": "2"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = out / "last.pt"
    deadline = time.monotonic() + 180
    step = 0
    while time.monotonic() < deadline and process.poll() is None and step < 2:
        if last.exists():
            step = torch.load(last, map_location="cpu", weights_only=True)["train_state"]["step"]
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()  # still running: held after its checkpoint
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert step == 2 and not (out / "final.pt").exists()

    resumed = invoke("train", str(path), "--out", str(out), "--resume", "--no-eval")
    assert resumed.exit_code == 0, resumed.output
    straight = invoke("train", str(path), "--out", str(tmp_path / "straight"), "--no-eval")
    assert straight.exit_code == 0, straight.output
    a = torch.load(out / "final.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "straight" / "final.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 6

    again = invoke("train", str(path), "--out", str(out))
    assert again.exit_code == 2 and "--resume" in again.output


def test_torchrun_two_processes_gloo(tmp_path, small_embedded):
    path = run_recipe(tmp_path, small_embedded, "  - pass: plain_ssh\n", finetune="{steps: 2, batch_size: 2}")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "compressor", "run", str(path), "--out", str(out), "--quiet"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["status"] == "ok" and report["stages"][0]["finetune"]["steps"] == 2
    assert (out / "final.pt").is_file()
