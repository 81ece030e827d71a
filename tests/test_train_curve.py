"""`compress train` with ``train.eval_every``: the validation curve, its plateau check and its plot.

Every ``eval_every`` steps a BatchNorm-recalibrated copy of the model is evaluated; the point is
stored in that step's checkpoint (so ``eval_every`` must be a multiple of ``checkpoint_every``), the
last step's point is the final evaluation, and a resumed training ends with the same curve.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import compressor.train_run as train_run
from compressor.cli import cli
from compressor.train import CurvePoint
from compressor.train_run import PLATEAU_GAIN, plateau

STEPS = 4
EVAL_EVERY = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_recipe(folder: Path, data: Path, checkpoint_every: int = 1, eval_every: int = EVAL_EVERY) -> Path:
    path = folder / "train.yaml"
    path.write_text(f"model: {{family: featherface}}\ninput_size: 64\nseed: 2\ndata: {{root: {data}}}\n"
                    f"train: {{steps: {STEPS}, batch_size: 2, lr: 0.002, warmup_steps: 1, "
                    f"checkpoint_every: {checkpoint_every}, eval_every: {eval_every}}}\n")
    return path


@pytest.fixture(scope="module")
def recipe(small_embedded, tmp_path_factory) -> Path:
    return train_recipe(tmp_path_factory.mktemp("recipe"), small_embedded)


def invoke(*args: object):
    return CliRunner().invoke(cli, [*map(str, args), "--quiet"], catch_exceptions=False)


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
    return out


def report_of(run: Path) -> dict:
    return json.loads((run / train_run.REPORT_NAME).read_text())


def saved_curve(path: Path) -> list[dict]:
    return torch.load(path, map_location="cpu", weights_only=True)["train_state"]["curve"]


# ------------------------------------------------------------ the curve


def test_report_holds_the_curve_at_every_eval_step(straight):
    """val_curve has a point at steps 2 and 4, each AP inside its bootstrap interval; the last is the final metrics."""
    report = report_of(straight)
    curve = report["val_curve"]
    assert [point["step"] for point in curve] == [2, 4]
    for point in curve:
        metrics = point["metrics"]
        assert {"ap", "ap_low", "ap_high"} <= metrics.keys()
        assert 0.0 <= metrics["ap_low"] <= metrics["ap"] <= metrics["ap_high"] <= 1.0
    assert curve[-1]["metrics"] == report["metrics"]


def test_report_holds_the_plateau_check(straight):
    """plateau compares the last point with the one at or before 3/4 of the steps (step 2 of 4)."""
    report = report_of(straight)
    first, last = (point["metrics"]["ap"] for point in report["val_curve"])
    check = report["plateau"]
    assert check["metric"] == "ap" and check["from_step"] == 2 and check["to_step"] == 4
    assert check["gain"] == pytest.approx(last - first, abs=1e-12)
    assert check["plateaued"] is (check["gain"] < PLATEAU_GAIN)


def test_curve_plot_is_a_png(straight):
    """val_curve.png is written next to the report, and is a PNG."""
    png = (straight / train_run.CURVE_PLOT_NAME).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_each_point_is_stored_in_its_steps_checkpoint(straight):
    """last.pt's train_state holds the points measured so far; the last step's point is only in the report."""
    snapshots = straight.parent / "snapshots"
    point_2 = report_of(straight)["val_curve"][0]
    assert saved_curve(snapshots / "last-1.pt") == []
    for step in (2, 3, 4):
        assert saved_curve(snapshots / f"last-{step}.pt") == [point_2]


def test_evaluation_during_training_does_not_change_the_training(straight, small_embedded, tmp_path):
    """The curve is measured on copies: the final weights equal those of the same training with no eval_every."""
    plain = train_recipe(tmp_path, small_embedded)
    plain.write_text(plain.read_text().replace(f", eval_every: {EVAL_EVERY}", ""))
    out = tmp_path / "plain"
    result = invoke("train", plain, "--out", out, "--no-eval")
    assert result.exit_code == 0, result.output
    a = torch.load(out / "final.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(straight / "final.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_no_eval_measures_no_curve(recipe, tmp_path):
    """With --no-eval nothing is measured: no val_curve, no plateau, no plot, no points in the checkpoint."""
    out = tmp_path / "run"
    result = invoke("train", recipe, "--out", out, "--no-eval")
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert "val_curve" not in report and "plateau" not in report
    assert not (out / train_run.CURVE_PLOT_NAME).exists()
    assert saved_curve(out / train_run.LAST_NAME) == []


# ------------------------------------------------------------ resumed


def test_resumed_after_step_2_ends_with_the_same_curve(recipe, straight, tmp_path, monkeypatch):
    """Interrupted in step 3 (last.pt at step 2, holding point 2), then resumed: the curve is the straight run's."""
    from compressor_plugins.featherface_family import FAMILY

    out = tmp_path / "run"
    real = FAMILY.task_loss
    calls = {"n": 0}

    def dies_in_step_3(outputs, targets, size):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real(outputs, targets, size)

    with monkeypatch.context() as patch:
        patch.setattr(FAMILY, "task_loss", dies_in_step_3)
        with pytest.raises(Killed):
            invoke("train", recipe, "--out", out)
    saved = torch.load(out / train_run.LAST_NAME, map_location="cpu", weights_only=True)["train_state"]
    assert saved["step"] == 2 and [p["step"] for p in saved["curve"]] == [2]
    assert not (out / "final.pt").exists()

    resumed = invoke("train", recipe, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert report_of(out)["val_curve"] == report_of(straight)["val_curve"]
    assert report_of(out)["plateau"] == report_of(straight)["plateau"]


def test_killed_in_the_step_2_evaluation_ends_with_the_same_curve(recipe, straight, tmp_path, monkeypatch):
    """Killed while measuring point 2 (before its checkpoint): the resume redoes step 2 and its point."""
    from compressor_plugins.featherface_family import FAMILY

    out = tmp_path / "run"

    def dies(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(FAMILY, "evaluate", dies)
        with pytest.raises(Killed):
            invoke("train", recipe, "--out", out)
    saved = torch.load(out / train_run.LAST_NAME, map_location="cpu", weights_only=True)["train_state"]
    assert saved["step"] == 1 and saved["curve"] == []

    resumed = invoke("train", recipe, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert report_of(out)["val_curve"] == report_of(straight)["val_curve"]


# ------------------------------------------------------------ the recipe check


def test_eval_every_not_a_multiple_of_checkpoint_every_is_refused(small_embedded, tmp_path):
    """eval_every 3 with checkpoint_every 2: exit 2, one line naming train's eval_every, nothing written."""
    path = train_recipe(tmp_path, small_embedded, checkpoint_every=2, eval_every=3)
    out = tmp_path / "run"
    result = invoke("train", path, "--out", out)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: train (line 5): ")
    assert lines[0].endswith("eval_every (3) is not a multiple of checkpoint_every (2)")
    assert not out.exists()


def test_eval_every_set_on_the_command_line_is_checked_too(recipe, tmp_path):
    """--set train.eval_every=3 with --set train.checkpoint_every=2 is refused the same way, nothing written."""
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(recipe), "--out", str(out), "--quiet", "--set",
                                      "train.checkpoint_every=2", "--set", "train.eval_every=3"],
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {recipe}: train: eval_every (3) is not a multiple of "
                                     "checkpoint_every (2)")
    assert not out.exists()


# ------------------------------------------------------------ plateau()


def curve(steps_and_values: list[tuple[int, float]], metric: str = "ap") -> list[CurvePoint]:
    return [CurvePoint(step, {metric: value}) for step, value in steps_and_values]


def test_plateau_starts_at_three_quarters_of_the_steps():
    """With a point exactly at 3/4 of the steps, the gain is measured from it to the last point."""
    check = plateau(curve([(25, 0.40), (50, 0.60), (75, 0.70), (100, 0.72)]), "ap", 100)
    assert check == {"metric": "ap", "from_step": 75, "to_step": 100, "gain": pytest.approx(0.02),
                     "plateaued": False}


def test_plateau_starts_at_the_last_point_before_three_quarters():
    """Without a point at 3/4 of the steps, it starts from the last point before (60 of 100, not 80)."""
    check = plateau(curve([(20, 0.1), (40, 0.5), (60, 0.700), (80, 0.702), (100, 0.703)]), "ap", 100)
    assert check["from_step"] == 60 and check["to_step"] == 100
    assert check["gain"] == pytest.approx(0.003)
    assert check["plateaued"] is True


@pytest.mark.parametrize("gain,plateaued", [(0.004, True), (0.006, False), (-0.05, True), (0.0, True)])
def test_plateaued_means_a_gain_below_half_a_point(gain, plateaued):
    """plateaued when the last quarter gained less than PLATEAU_GAIN (0.005), a fall included."""
    assert PLATEAU_GAIN == 0.005
    check = plateau(curve([(3, 0.5), (4, 0.5 + gain)]), "ap", 4)
    assert check["gain"] == pytest.approx(gain)
    assert check["plateaued"] is plateaued


@pytest.mark.parametrize("points", [[], [(100, 0.7)], [(80, 0.6), (100, 0.7)], [(25, 0.6), (50, 0.7)]],
                         ids=["empty", "final-only", "none-before-three-quarters", "ends-before-three-quarters"])
def test_plateau_is_undecided_without_two_points_to_compare(points):
    """No point at or before 3/4 of the steps, or none after it: gain and plateaued are None."""
    check = plateau(curve(points), "ap", 100)
    assert check["metric"] == "ap"
    assert check["from_step"] is None and check["gain"] is None and check["plateaued"] is None


def test_plateau_ignores_points_without_the_metric():
    """Points that lack the metric (e.g. another family's) are skipped, not read as zero."""
    points = [CurvePoint(50, {"ap": 0.5}), CurvePoint(75, {"other": 0.9}), CurvePoint(100, {"ap": 0.8})]
    check = plateau(points, "ap", 100)
    assert check["from_step"] == 50 and check["to_step"] == 100
    assert math.isclose(check["gain"], 0.3)
