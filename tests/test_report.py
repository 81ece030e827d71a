"""Run report: report.json round-trips, report.md is readable, the plots are PNGs, writes are atomic."""

from __future__ import annotations

import copy
import io
import json
import os
import time

import pytest
from PIL import Image

from compressor import plots, report as report_mod
from compressor.report import plot_params_vs_accuracy, render_markdown, write_report

BASELINE_COMPONENTS = {
    "backbone": 213_072, "cbam": 13_568, "bifpn": 112_606, "ssh": 232_965,
    "channel_shuffle": 13_920, "heads": 6_240, "other": 0,
}


def _params(**changes: int) -> dict:
    components = {**BASELINE_COMPONENTS, **changes}
    return {"total": sum(components.values()), "components": components}


def sample_report(metrics: bool = True) -> dict:
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
        "baseline": {"params": _params(), "macs": 1_243_802_176, "extra_macs": {"deform": 66_528_000},
                     "metrics": m(0.871)},
        "stages": [
            {"name": "attention", "pass": "reduce_attention", "status": "ok", "params": _params(cbam=6_784),
             "macs": 1_243_000_000, "output_drift": 3.2e-3, "metrics": m(0.869), "seconds": 12.34,
             "finetune": "skipped (--no-finetune)", "message": None, "repeats": 1},
            {"name": "ssh_slim", "pass": "slim_ssh", "status": "ok", "params": _params(cbam=6_784, ssh=120_000),
             "macs": 812_000_000, "output_drift": 0.041, "metrics": m(0.852), "seconds": 30.0,
             "finetune": {"steps": 500, "loss": 1.234}, "message": None, "repeats": 2},
            {"name": "prune", "pass": "prune", "status": "pending"},
        ],
        "final": None,
        "custom_key": {"kept": [1, 2, 3]},
    }


def test_writes_four_files_and_json_round_trips(tmp_path):
    data = sample_report()
    write_report(tmp_path, data)
    for name in ("report.json", "report.md", "plots/params_by_component.png", "plots/params_vs_accuracy.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "report.json").read_text()) == data
    assert data == sample_report()  # the input is not modified

    md = (tmp_path / "report.md").read_text()
    for needle in ("attention", "ssh_slim", "prune", "reduce_attention", "pending", "592,371",
                   "plots/params_by_component.png", "plots/params_vs_accuracy.png", "1.244 G", "812.0 M",
                   "3.20e-03", "0.8520", "slim_ssh ×2", "-6,784 (-1.1%)"):
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
    data = sample_report()
    data["stages"][2].update(status="ok", params=_params(cbam=680, ssh=100_000, bifpn=60_000), macs=700_000_000,
                             output_drift=0.01, metrics={"ap": 0.85, "easy": 0.88}, seconds=5.0, repeats=1)
    data["final"] = {"params": data["stages"][2]["params"], "macs": 700_000_000, "metrics": {"ap": 0.86}}
    md = render_markdown(data)
    assert "**Budget: PASS**" in md and "FAIL" not in md
    assert "| final |" in md.replace("**final**", "final")
    assert "run: finished, 3 of 3 stages done" in md
    component_header = next(line for line in md.splitlines() if line.startswith("| component |"))
    assert component_header.rstrip(" |").endswith("final")


def test_accuracy_drop_budget_fails():
    data = sample_report()
    data["final"] = {"params": data["stages"][1]["params"], "macs": 1, "metrics": {"ap": 0.70}}
    data["recipe"]["budget"] = {"total": None, "components": {}, "macs": None, "max_accuracy_drop": 0.05}
    md = render_markdown(data)
    assert "**Budget: FAIL**" in md and "accuracy drop (ap)" in md


def test_no_budget_no_section():
    data = sample_report()
    data["recipe"]["budget"] = {"total": None, "components": {}, "macs": None, "max_accuracy_drop": None}
    assert "## Budget" not in render_markdown(data)
    del data["recipe"]["budget"]
    assert "## Budget" not in render_markdown(data)


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
    assert "| ap |" not in md and "not evaluated" in md  # accuracy-drop limit cannot be checked


def test_partial_reports_render(tmp_path):
    # only the baseline; stages absent entirely (taken from the recipe as pending)
    data = sample_report()
    data["stages"] = []
    write_report(tmp_path, data)
    md = (tmp_path / "report.md").read_text()
    assert md.count("| pending |") == 3
    # a failed stage with its message
    data = sample_report()
    data["stages"][1] = {"name": "ssh_slim", "pass": "slim_ssh", "status": "failed",
                         "message": "stage 2 (ssh_slim): ssh = 200,000 > budget 150,000", "seconds": 1.0}
    write_report(tmp_path, data)
    md = (tmp_path / "report.md").read_text()
    assert "**failed**" in md and "ssh = 200,000 > budget 150,000" in md
    # nothing at all
    write_report(tmp_path, {"recipe": {}, "baseline": None, "stages": [], "final": None})
    assert Image.open(tmp_path / "plots" / "params_vs_accuracy.png").size == plots.SIZE


def test_cheap_enough(tmp_path):
    data = sample_report()
    write_report(tmp_path, data)  # warm font caches
    start = time.perf_counter()
    write_report(tmp_path, data)
    assert time.perf_counter() - start < 0.5


def test_failed_write_leaves_previous_report_intact(tmp_path, monkeypatch):
    write_report(tmp_path, sample_report())
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    changed = copy.deepcopy(sample_report())
    changed["stages"][2].update(status="ok", params=_params(cbam=680), macs=5, output_drift=0.1, seconds=1.0)
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
    assert json.loads((tmp_path / "report.json").read_text()) == sample_report()


def test_failure_while_writing_contents_leaves_no_temp(tmp_path, monkeypatch):
    write_report(tmp_path, sample_report())
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(_report):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report_mod, "plot_params_by_component", broken)
    changed = sample_report()
    changed["final"] = {"params": _params(), "macs": 1, "metrics": {}}
    with pytest.raises(RuntimeError):
        write_report(tmp_path, changed)
    files = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert files == set(before)  # no temp files left behind
    assert json.loads((tmp_path / "report.json").read_text()) in (sample_report(), changed)


def test_unserialisable_report_leaves_previous_json(tmp_path):
    write_report(tmp_path, sample_report())
    before = (tmp_path / "report.json").read_bytes()
    bad = sample_report()
    bad["baseline"]["metrics"]["ap"] = float("nan")  # serialisable (NaN), fine
    bad["recipe"]["x"] = {1: object.__new__(type("Odd", (), {"__str__": lambda self: "odd"}))}
    write_report(tmp_path, bad)  # odd objects become strings rather than tearing the write
    assert json.loads((tmp_path / "report.json").read_text())["recipe"]["x"] == {"1": "odd"}
    assert before != (tmp_path / "report.json").read_bytes()


def test_tick_formatting():
    assert plots.format_k(600_000, 100_000) == "600K"
    assert plots.format_k(250_000, 50_000) == "250K"
    assert plots.format_k(592_371) == "592K"
    assert plots.format_k(0, 100_000) == "0"
    ticks = plots.nice_ticks(0, 640_000, 6)
    assert ticks[0] == 0 and ticks[-1] >= 640_000 and len(ticks) <= 8
