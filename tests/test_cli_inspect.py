"""`compress inspect`: numbers, JSON shape and one-line errors with exit code 2."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from compressor.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_inspect_baseline_json():
    result = run("inspect", "featherface", "--input-size", "320", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params"]["total"] == 592_371
    assert data["params"]["components"] == {
        "backbone": 213_072, "cbam": 13_568, "bifpn": 112_606, "ssh": 232_965,
        "channel_shuffle": 13_920, "heads": 6_240, "other": 0,
    }
    assert data["input_size"] == [320, 320]
    assert isinstance(data["macs"], int) and data["macs"] > 0
    assert data["extra_macs"]["deform_sampling_macs"] > 0


def test_inspect_table_and_non_square_size():
    result = run("inspect", "featherface", "--input-size", "256x192")
    assert result.exit_code == 0
    assert "592,371" in result.output and "256x192" in result.output
    assert "deform_sampling_macs" in result.output


def test_inspect_original_checkpoint(reference_dir):
    result = run("inspect", str(reference_dir / "featherface_baseline_seed0.pt"), "--json", "--input-size", "64")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["params"]["total"] == 592_371


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_input_size():
    _assert_one_line_error(run("inspect", "featherface", "--input-size", "100"), "100x100", "multiples of 32")
    _assert_one_line_error(run("inspect", "featherface", "--input-size", "big"), "big")


def test_missing_file(tmp_path):
    _assert_one_line_error(run("inspect", str(tmp_path / "nope.pt")), "nope.pt")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    _assert_one_line_error(run("inspect", str(path)), "notes.txt", "not a readable PyTorch checkpoint")


def test_truncated_checkpoint(tmp_path, reference_dir):
    data = (reference_dir / "featherface_baseline_seed0.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(run("inspect", str(path)), "truncated.pt")


def test_other_architecture(tmp_path):
    # A state_dict of some other network: no family's original names, not one of our checkpoints.
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
    _assert_one_line_error(run("inspect", str(path)), "resnet.pth", "not a checkpoint of any registered model family")


def test_featherface_checkpoint_with_wrong_shapes(tmp_path, reference_dir):
    state = torch.load(reference_dir / "featherface_baseline_seed0.pt", map_location="cpu", weights_only=True)["state_dict"]
    state["BboxHead.0.conv1x1.weight"] = torch.zeros(12, 64, 1, 1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    _assert_one_line_error(run("inspect", str(path)), "wrong.pth", "BboxHead.0.conv1x1.weight", "(12, 64, 1, 1)")
