"""Run report: report.json round-trips, report.md is readable, the plots are PNGs, writes are atomic."""

from __future__ import annotations

import io
import json
import os
import time

import pytest
from PIL import Image

from compressor import plots, report as report_mod
from compressor.record import RunRecord, read_record
from compressor.report import plot_params_vs_accuracy, render_markdown, write_report

BASELINE_COMPONENTS = {
    "backbone": 213_072, "cbam": 13_568, "bifpn": 112_606, "ssh": 232_965,
    "channel_shuffle": 13_920, "heads": 6_240, "other": 0,
}


def _params(**changes: int) -> dict:
    components = {**BASELINE_COMPONENTS, **changes}
    return {"total": sum(components.values()), "components": components}


def sample_data(metrics: bool = True) -> dict:
    def m(ap: float) -> dict:
        return {"ap": ap, "easy": ap + 0.03} if metrics else {}

    return {
        "recipe": {
            "model": {"family": "featherface", "checkpoint": None},
            "input_size": [640, 640],
            "stages": [
                {"pass": "reduce_attention", "name": "attention", "params": {"ratio": 16}},
                {"pass": "slim_ssh", "name": "ssh_slim", "params": {"width": 32}},
                {"pass": "prune", "name": "prune", "params": {}},
            ],
            "budget": {"total": 500_000, "components": {"ssh": 150_000, "cbam": 1_000}, "macs": None,
                       "max_accuracy_drop": 0.05},
        },
        "family": "featherface",
        "metric": "ap",
        "mode": {"finetune": metrics, "evaluate": metrics, "device": "cpu"},
        "baseline": {"params": _params(), "macs": 1_243_802_176, "extra_macs": {"deform": 66_528_000},
                     "metrics": m(0.871)},
        "stages": [
            {"name": "attention", "pass": "reduce_attention", "status": "ok", "params": _params(cbam=6_784),
             "macs": 1_243_000_000, "output_drift": 3.2e-3, "metrics": m(0.869), "seconds": 12.34,
             "finetune": {"skipped": "--no-finetune"}, "message": None, "repeats": 1},
            {"name": "ssh_slim", "pass": "slim_ssh", "status": "ok", "params": _params(cbam=6_784, ssh=120_000),
             "macs": 812_000_000, "output_drift": 0.041, "metrics": m(0.852), "seconds": 30.0,
             "finetune": {"steps": 500, "seconds": 20.0, "teacher": "previous", "first_loss": 3.0,
                          "last_loss": 1.234},
             "message": None, "repeats": 2, "pass_record": {"channels": [64, 32]}},
            {"name": "prune", "pass": "prune", "status": "pending"},
        ],
        "final": None,
    }


def sample_report(metrics: bool = True) -> RunRecord:
    return RunRecord.model_validate(sample_data(metrics))


def test_writes_four_files_and_json_round_trips(tmp_path):
    data = sample_report()
    write_report(tmp_path, data)
    for name in ("report.json", "report.md", "plots/params_by_component.png", "plots/params_vs_accuracy.png"):
        assert (tmp_path / name).is_file(), name
    assert read_record((tmp_path / "report.json").read_text(), "report.json") == data
    assert data == sample_report()  # the input is not modified
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["stages"][1]["pass_record"] == {"channels": [64, 32]}
    assert stored["budget_check"] is None  # the runner stores it; the report renders it from the record

    md = (tmp_path / "report.md").read_text()
    for needle in ("attention", "ssh_slim", "prune", "reduce_attention", "pending", "592,371",
                   "plots/params_by_component.png", "plots/params_vs_accuracy.png", "1.244 G", "812.0 M",
                   "3.20e-03", "0.8520", "slim_ssh ×2", "-6,784 (-1.1%)", "finetune skipped (--no-finetune)",
                   "500 steps from the previous model", "channels"):
        assert needle in md, needle
    # the budget: not finished, so checked against the latest stage; ssh and total pass, cbam fails
    assert "**Budget: FAIL so far**" in md and "(cbam)" in md
    assert "checked against 2 ssh_slim" in md

    for name in ("params_by_component.png", "params_vs_accuracy.png"):
        with Image.open(tmp_path / "plots" / name) as image:
            image.load()
            assert image.format == "PNG" and image.size == plots.SIZE

    first = {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()}
    write_report(tmp_path, sample_report())
    assert {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()} == first
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        ["report.json", "report.md", "params_by_component.png", "params_vs_accuracy.png"])


def test_markdown_tables_have_stage_metric_and_component_columns():
    md = render_markdown(sample_report())
    header = next(line for line in md.splitlines() if line.startswith("| # |"))
    assert "| ap | easy | seconds |" in header
    component_header = next(line for line in md.splitlines() if line.startswith("| component |"))
    assert "baseline" in component_header and "1 attention" in component_header and "2 ssh_slim" in component_header
    ssh_row = next(line for line in md.splitlines() if line.startswith("| ssh |"))
    assert "232,965" in ssh_row and "120,000" in ssh_row


def test_final_budget_pass_and_final_columns():
    data = sample_data()
    data["stages"][2].update(status="ok", params=_params(cbam=680, ssh=100_000, bifpn=60_000), macs=700_000_000,
                             output_drift=0.01, metrics={"ap": 0.85, "easy": 0.88}, seconds=5.0, repeats=1)
    data["final"] = {"params": data["stages"][2]["params"], "macs": 700_000_000, "metrics": {"ap": 0.86}}
    record = RunRecord.model_validate(data)
    verdict = record.budget_verdict()
    assert verdict.ok is True and verdict.against == "final" and abs(verdict.accuracy_drop - 0.011) < 1e-9
    md = render_markdown(record)
    assert "**Budget: PASS**" in md and "FAIL" not in md
    assert "| final |" in md.replace("**final**", "final")
    assert "run: finished, 3 of 3 stages done" in md
    component_header = next(line for line in md.splitlines() if line.startswith("| component |"))
    assert component_header.rstrip(" |").endswith("final")


def test_accuracy_drop_budget_fails():
    data = sample_data()
    data["final"] = {"params": data["stages"][1]["params"], "macs": 1, "metrics": {"ap": 0.70}}
    data["recipe"]["budget"] = {"total": None, "components": {}, "macs": None, "max_accuracy_drop": 0.05}
    record = RunRecord.model_validate(data)
    assert record.budget_verdict().ok is False
    md = render_markdown(record)
    assert "**Budget: FAIL**" in md and "accuracy drop (ap)" in md


def test_an_unmeasured_accuracy_is_not_checked_and_not_passed():
    data = sample_data(metrics=False)
    data["final"] = {"params": data["stages"][1]["params"], "macs": 1, "metrics": {}}
    data["recipe"]["budget"] = {"total": 600_000, "components": {}, "macs": None, "max_accuracy_drop": 0.02}
    verdict = RunRecord.model_validate(data).budget_verdict()
    assert verdict.ok is None and not verdict.failed
    assert [(v.what, v.status) for v in verdict.verdicts] == [("total", "pass"), ("accuracy drop (ap)", "not checked")]
    md = render_markdown(RunRecord.model_validate(data))
    assert "**Budget: NOT FULLY CHECKED**" in md and "PASS" not in md


def test_no_budget_no_section():
    data = sample_data()
    data["recipe"]["budget"] = {"total": None, "components": {}, "macs": None, "max_accuracy_drop": None}
    assert "## Budget" not in render_markdown(RunRecord.model_validate(data))
    del data["recipe"]["budget"]
    assert "## Budget" not in render_markdown(RunRecord.model_validate(data))


def test_no_metrics_falls_back_to_drift(tmp_path):
    data = sample_report(metrics=False)
    plot = plot_params_vs_accuracy(data)
    assert plot.is_drift and plot.metric is None
    assert "drift" in plot.title and "no accuracy metric" in plot.title
    assert Image.open(io.BytesIO(plot.png)).size == plots.SIZE

    with_metrics = plot_params_vs_accuracy(sample_report())
    assert not with_metrics.is_drift and with_metrics.metric == "ap" and "ap" in with_metrics.title

    write_report(tmp_path, data)
    md = (tmp_path / "report.md").read_text()
    assert "| ap |" not in md and "not checked (accuracy not evaluated)" in md


def test_partial_reports_render(tmp_path):
    # only the baseline; stages absent entirely (taken from the recipe as pending)
    data = sample_data()
    data["stages"] = [{"name": f"s{i}", "pass": "p"} for i in range(3)]
    write_report(tmp_path, RunRecord.model_validate(data))
    md = (tmp_path / "report.md").read_text()
    assert md.count("| pending |") == 3
    # a failed stage with its message
    data = sample_data()
    data["stages"][1] = {"name": "ssh_slim", "pass": "slim_ssh", "status": "failed",
                         "message": "stage 2 (ssh_slim): ssh = 200,000 > budget 150,000", "seconds": 1.0}
    write_report(tmp_path, RunRecord.model_validate(data))
    md = (tmp_path / "report.md").read_text()
    assert "**failed**" in md and "ssh = 200,000 > budget 150,000" in md
    # no stages, no metrics
    data = sample_data(metrics=False)
    data["stages"] = []
    write_report(tmp_path, RunRecord.model_validate(data))
    assert Image.open(tmp_path / "plots" / "params_vs_accuracy.png").size == plots.SIZE


def test_cheap_enough(tmp_path):
    data = sample_report()
    write_report(tmp_path, data)  # warm font caches
    # CPU time of this process, not wall time: CI shares its cores, and waiting for one is not the report's cost.
    start = time.process_time()
    write_report(tmp_path, data)
    assert time.process_time() - start < 0.5


def test_failed_write_leaves_previous_report_intact(tmp_path, monkeypatch):
    write_report(tmp_path, sample_report())
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    data = sample_data()
    data["stages"][2].update(status="ok", params=_params(cbam=680), macs=5, output_drift=0.1, seconds=1.0)
    changed = RunRecord.model_validate(data)
    calls = []
    real_replace = os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_report(tmp_path, changed)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # same files, same bytes: no temp files, nothing torn
    assert read_record((tmp_path / "report.json").read_text(), "report.json") == sample_report()


def test_failure_while_writing_contents_leaves_no_temp(tmp_path, monkeypatch):
    write_report(tmp_path, sample_report())
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(_report):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report_mod, "plot_params_by_component", broken)
    data = sample_data()
    data["final"] = {"params": _params(), "macs": 1, "metrics": {}}
    changed = RunRecord.model_validate(data)
    with pytest.raises(RuntimeError):
        write_report(tmp_path, changed)
    files = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert files == set(before)  # no temp files left behind
    assert read_record((tmp_path / "report.json").read_text(), "report.json") == sample_report()


def test_a_stored_record_is_validated_when_read(tmp_path):
    write_report(tmp_path, sample_report())
    data = json.loads((tmp_path / "report.json").read_text())
    assert read_record(json.dumps(data), "r") == sample_report()
    data["stages"][0]["status"] = "half-done"
    with pytest.raises(ValueError, match=r"r: not a run record of this version \(stages.0.status"):
        read_record(json.dumps(data), "r")
    with pytest.raises(ValueError, match="not a run record"):
        read_record("[1, 2", "r")


def test_tick_formatting():
    assert plots.format_k(600_000, 100_000) == "600K"
    assert plots.format_k(250_000, 50_000) == "250K"
    assert plots.format_k(592_371) == "592K"
    assert plots.format_k(0, 100_000) == "0"
    ticks = plots.nice_ticks(0, 640_000, 6)
    assert ticks[0] == 0 and ticks[-1] >= 640_000 and len(ticks) <= 8


# ------------------------------------------------------------------ the charts themselves (compressor.plots)

BAR_LABELS = ["baseline", "1 ssh_plain", "2 unify_heads", "3 prune_backbone"]
BAR_SEGMENTS = {"backbone": [213_072, 213_072, 213_072, 154_762], "ssh": [232_965, 103_000, 103_000, 26_208],
                "heads": [6_240, 6_240, 6_240, 6_240], "other": [0, 0, 0, 0]}
LINE_POINTS = [(592_371, 0.7213, "baseline"), (463_662, 0.6962, "1 ssh_plain"), (463_662, 0.6962, "2 unify_heads"),
               (237_554, 0.7276, "3 prune_backbone"), (237_554, 0.7276, "final")]


def _bar(**kwargs) -> bytes:
    return plots.bar_chart_png(BAR_LABELS, BAR_SEGMENTS, title="Parameters by component", y_label="parameters",
                               **kwargs)


def _line() -> bytes:
    return plots.line_chart_png(LINE_POINTS, title="Parameters vs accuracy", x_label="parameters", y_label="ap")


def _image(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG" and image.size == plots.SIZE
    return image


def test_charts_are_deterministic_small_pngs_without_metadata():
    import matplotlib

    for draw in (_bar, _line):
        png = draw()
        _image(png)
        assert draw() == png  # same data, same bytes
        assert len(png) < 60_000
        # no text/time chunks: nothing that names the software or the moment it ran
        assert not any(chunk in png for chunk in (b"tEXt", b"iTXt", b"zTXt", b"tIME")), draw
        assert b"matplotlib" not in png.lower()
    # the user's matplotlib settings neither change the charts nor are changed by them
    with matplotlib.rc_context({"axes.facecolor": "black", "font.size": 22, "lines.linewidth": 9}):
        under_user_style = (_bar(), _line())
        assert matplotlib.rcParams["axes.facecolor"] == "black" and matplotlib.rcParams["font.size"] == 22
    assert under_user_style == (_bar(), _line())


def test_charts_use_no_pyplot_and_import_matplotlib_lazily():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import compressor.plots as plots\n"
        "assert 'matplotlib' not in sys.modules\n"
        "plots.line_chart_png([(1, 2, 'a')], title='t', x_label='x', y_label='y')\n"
        "plots.bar_chart_png(['a'], {'x': [1]}, title='t', y_label='y')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_empty_charts_say_no_data():
    for png in (plots.bar_chart_png([], {}, title="nothing", y_label="parameters"),
                plots.bar_chart_png([], {"backbone": []}, title="nothing", y_label="parameters"),
                plots.line_chart_png([], title="nothing", x_label="parameters", y_label="ap")):
        image = _image(png).convert("L")
        width, height = image.size
        # the message sits in the middle of the plot area, where an empty chart has only white and grid
        middle = image.crop((width // 2 - 60, height // 2 - 30, width // 2 + 40, height // 2 + 10))
        assert middle.getextrema()[0] < 150


def test_bar_chart_options_and_sizes():
    # as plugins/sensitivity.py calls it
    png = plots.bar_chart_png(["backbone 0.1", "ssh 0.5"], {"output drift": [0.31, float("nan")]},
                              title="Output drift", y_label="max |output change|",
                              tick_format=lambda v, step=None: f"{v:.2g}", show_totals=False)
    _image(png)
    assert png != _bar(show_totals=False) != _bar()
    small = plots.bar_chart_png(BAR_LABELS, BAR_SEGMENTS, title="t", y_label="y", x_label="stage", size=(333, 217))
    assert Image.open(io.BytesIO(small)).size == (333, 217)
    line = plots.line_chart_png(LINE_POINTS, title="t", x_label="x", y_label="y", size=(640, 481))
    assert Image.open(io.BytesIO(line)).size == (640, 481)


def test_point_labels_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    # three labels on one point, two more on near neighbours
    points = [(5, 5, "2 unify_heads"), (5, 5, "1 ssh_plain"), (5, 5, "final"), (5.2, 5, "x"), (5, 5.1, "y")]
    boxes = plots._place_labels(ax, points, marker_radius=4.5)
    assert len(boxes) == len(points) and len(ax.texts) == len(points)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
