"""benchmarks/frontier.py on three real tiny runs: the points it reads, the plots and table it writes, its errors.

The runs are real ``compress run`` folders (64x64 FeatherFace on a 4/2/2-image
embedded dataset, no finetuning), so their records carry a held-out ``test_ap``
with its interval, as the real ones do; latency is one forward per model at
64x64, each in a fresh process, as in the real measurement.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli import cli
from facedet.data import generate_embedded_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = {
    "prune@0.3": "  - pass: prune\n    params: {ratio: 0.3}\n",
    "prune@0.5": "  - pass: prune\n    params: {ratio: 0.5}\n",
    "ssh": "  - pass: ssh_slim\n    params: {conv: plain}\n",
}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint) -> dict[str, Path]:
    """label -> run folder: three compress runs from one teacher checkpoint."""
    tmp = tmp_path_factory.mktemp("frontier")
    data = generate_embedded_dataset(tmp / "data", num_train=4, num_val=2, num_test=2, size=64)
    folders = {}
    for index, (label, stages) in enumerate(STAGES.items()):
        recipe = tmp / f"recipe{index}.yaml"
        recipe.write_text(f"model: {{family: featherface, checkpoint: {checkpoint}}}\ninput_size: 64\nseed: 0\n"
                          f"data: {{root: {data}}}\nfinetune: {{steps: 0}}\nstages:\n{stages}")
        folders[label] = tmp / f"run{index}"
        result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(folders[label]), "--quiet"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return folders


@pytest.fixture(scope="module")
def measured(runs, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("frontier-out") / "frontier"
    argv = [arg for label, folder in runs.items() for arg in ("--run", f"{label}={folder}")]
    argv += ["--latency-runs", "1", "--warmup", "0", "--rounds", "1", "--input-size", "64", "--out", str(out)]
    assert load_script().main(argv) == 0  # the parent here; every model is timed in its own child process
    return out, argv


def test_points_are_the_records(runs, measured):
    out, _ = measured
    result = json.loads((out / "frontier.json").read_text())
    points = {p["label"]: p for p in result["points"]}
    assert list(points) == ["teacher", *STAGES]
    teacher = points["teacher"]
    first = report(runs["prune@0.3"])
    assert teacher["params"] == first["baseline"]["params"]["total"] == 592_371
    assert teacher["test_ap"] == first["baseline"]["metrics"]["test_ap"] and teacher["series"] is None
    for label, folder in runs.items():
        final = report(folder)["final"]
        point = points[label]
        assert point["params"] == final["params"]["total"]
        assert (point["test_ap"], point["low"], point["high"]) == tuple(
            final["metrics"][key] for key in ("test_ap", "test_ap_low", "test_ap_high"))
        assert point["split"] == "test" and point["source"] == str(folder.resolve())
    assert points["prune@0.3"]["params"] > points["prune@0.5"]["params"]
    assert points["prune@0.3"]["series"] == points["prune@0.5"]["series"] == "prune"
    assert points["ssh"]["series"] is None
    for point in points.values():
        assert point["low"] <= point["ap"] <= point["high"]
        assert point["latency_ms"] > 0 and len(point["latency_per_round_ms"]) == 1
    assert result["settings"]["input_size"] == [64, 64] and result["notes"] == []


def test_plots_and_table(measured):
    out, argv = measured
    for name in ("frontier_params.png", "frontier_latency.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    document = (out / "frontier.md").read_text()
    assert "frontier.py --run prune@0.3=" in document and "--latency-runs 1" in document  # the command
    assert "| teacher | — | 592,371 |" in document and "64×64, 1 thread" in document
    assert all(f"| {label} |" in document for label in STAGES)
    assert "validation ¹" not in document


def edited_run(runs, folder: Path, edit) -> tuple[Path, dict]:
    """A copy of the ``ssh`` run in ``folder`` whose record ``edit`` (a function of the record) changed."""
    folder.mkdir()
    shutil.copy(runs["ssh"] / "final.pt", folder / "final.pt")
    record = report(runs["ssh"])
    edit(record)
    (folder / "report.json").write_text(json.dumps(record))
    return folder, record


def test_val_fallback_series_option_and_no_latency(runs, tmp_path, capsys):
    """A run without test AP is shown with its validation AP and marked; --series moves a run into a series."""
    def without_test(record: dict) -> None:
        record["final"]["metrics"] = {k: v for k, v in record["final"]["metrics"].items() if not k.startswith("test_")}

    old, record = edited_run(runs, tmp_path / "old", without_test)
    out = tmp_path / "out"
    code = load_script().main(["--run", f"a={runs['prune@0.3']}", "--run", f"old={old}", "--series", "old=prune",
                               "--series", "a=prune", "--latency-runs", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    points = {p["label"]: p for p in json.loads((out / "frontier.json").read_text())["points"]}
    assert points["old"]["split"] == "validation" and points["old"]["test_ap"] is None
    assert points["old"]["ap"] == record["final"]["metrics"]["ap"] and points["old"]["series"] == "prune"
    assert points["a"]["latency_ms"] is None
    document = (out / "frontier.md").read_text()
    assert "(validation ¹)" in document and "no held-out test AP" in document and "not measured" in document
    assert (out / "frontier_params.png").is_file() and not (out / "frontier_latency.png").exists()


def test_runs_with_different_teachers_are_one_line(runs, tmp_path, capsys):
    other, _ = edited_run(runs, tmp_path / "other", lambda record: record["baseline"]["params"].update(total=500_000))
    code = load_script().main(["--run", f"a={runs['prune@0.3']}", "--run", f"b={other}", "--latency-runs", "0",
                               "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "do not share a teacher" in lines[0] and "500,000" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_run_continuing_another_keeps_the_teacher(runs, tmp_path, capsys):
    # `compress auto --from RUN/checkpoints/...`: its baseline is that run's model; the teacher stays the others'.
    def continuing(record: dict) -> None:
        record["baseline"]["params"]["total"] = 300_000
        record["recipe"]["model"]["checkpoint"] = str(runs["prune@0.3"] / "final.pt")

    cont, record = edited_run(runs, tmp_path / "continued", continuing)
    out = tmp_path / "out"
    code = load_script().main(["--run", f"a={runs['prune@0.3']}", "--run", f"c={cont}", "--latency-runs", "0",
                               "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "frontier.json").read_text())
    teacher = report(runs["prune@0.3"])["baseline"]
    points = {p["label"]: p for p in result["points"]}
    assert points["teacher"]["params"] == teacher["params"]["total"]
    assert points["c"]["params"] == record["final"]["params"]["total"]
    assert any("c: started from a's checkpoint final.pt" in note for note in result["notes"])

    # From a run folder that is not a --run (a --no-finetune run kept for its stage checkpoints): the same.
    def from_elsewhere(record: dict) -> None:
        continuing(record)
        record["recipe"]["model"]["checkpoint"] = str(runs["prune@0.5"] / "final.pt")

    other, _ = edited_run(runs, tmp_path / "elsewhere", from_elsewhere)
    code = load_script().main(["--run", f"a={runs['prune@0.3']}", "--run", f"e={other}", "--latency-runs", "0",
                               "--out", str(tmp_path / "out2")])
    assert code == 0, capsys.readouterr().err
    notes = json.loads((tmp_path / "out2" / "frontier.json").read_text())["notes"]
    assert f"e: started from {runs['prune@0.5'].resolve()}'s checkpoint final.pt" in " ".join(notes)


def test_a_run_whose_weights_were_not_kept_is_placed_but_not_timed(runs, tmp_path, capsys):
    kept = tmp_path / "record_only"
    kept.mkdir()
    shutil.copy(runs["ssh"] / "report.json", kept / "report.json")
    out = tmp_path / "out"
    code = load_script().main(["--run", f"a={runs['prune@0.3']}", "--run", f"old={kept}", "--latency-runs", "1",
                               "--warmup", "0", "--rounds", "1", "--input-size", "64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "frontier.json").read_text())
    points = {p["label"]: p for p in result["points"]}
    assert points["old"]["params"] == report(runs["ssh"])["final"]["params"]["total"]
    assert points["old"]["latency_ms"] is None and points["old"]["latency_per_round_ms"] == []
    assert points["a"]["latency_ms"] > 0 and points["teacher"]["latency_ms"] > 0
    assert result["notes"] == ["old: no final.pt in its folder (the record only, its weights not kept): not timed"]
    assert "| not timed |" in (out / "frontier.md").read_text()
    assert (out / "frontier_latency.png").read_bytes()[:8] == PNG_MAGIC


def test_a_record_without_weights_is_timed_on_a_checkpoint_of_its_architecture(runs, tmp_path, capsys):
    """--timed-on: the record's accuracy, the checkpoint's latency; the parameter counts must agree."""
    kept = tmp_path / "record_only"
    kept.mkdir()
    shutil.copy(runs["ssh"] / "report.json", kept / "report.json")
    out = tmp_path / "out"
    timing = ["--latency-runs", "1", "--warmup", "0", "--rounds", "1", "--input-size", "64"]
    code = load_script().main(["--run", f"old={kept}", "--timed-on", f"old={runs['ssh'] / 'final.pt'}", *timing,
                               "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "frontier.json").read_text())
    points = {p["label"]: p for p in result["points"]}
    assert points["old"]["latency_ms"] > 0 and points["old"]["test_ap"] == report(runs["ssh"])["final"]["metrics"][
        "test_ap"]
    assert result["notes"] == [f"old: timed on {runs['ssh'] / 'final.pt'} (the same architecture; its weights not kept)"]
    # A checkpoint of another architecture is refused: its count is not the record's.
    code = load_script().main(["--run", f"old={kept}", "--timed-on", f"old={runs['prune@0.5'] / 'final.pt'}",
                               *timing, "--out", str(tmp_path / "out2")])
    assert code == 2 and "but its run record says" in capsys.readouterr().err


def test_bad_input_size_fails_before_measuring(runs, tmp_path, capsys):
    code = load_script().main(["--run", f"a={runs['ssh']}", "--input-size", "65", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--input-size 65" in lines[0] and "multiples of 32" in lines[0]
    assert "round" not in captured.err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "malformed", "no_label", "no_folder", "unknown_series",
                                  "twice", "timed_on_label", "timed_on_file"])
def test_bad_input_is_one_line(case, runs, tmp_path):
    run = f"a={runs['ssh']}"
    args, expected = {
        "missing": (["--run", f"a={tmp_path / 'nope'}"], "no such run folder"),
        "malformed": (["--run", str(runs["ssh"])], "LABEL=VALUE"),
        "no_label": (["--run", f"={runs['ssh']}"], "LABEL=VALUE"),
        "no_folder": (["--run", "a="], "run folder is missing"),
        "unknown_series": (["--run", run, "--series", "b=x"], "no --run is labelled 'b'"),
        "twice": (["--run", run, "--run", run], "given twice"),
        "timed_on_label": (["--run", run, "--timed-on", f"b={runs['ssh'] / 'final.pt'}"], "no --run is labelled 'b'"),
        "timed_on_file": (["--run", run, "--timed-on", f"a={tmp_path / 'nope.pt'}"], "no such checkpoint"),
    }[case]
    result = run_script(*args, "--latency-runs", "0", "--out", str(tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()
