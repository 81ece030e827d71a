"""benchmarks/compare.py on tiny settings: the JSON and markdown it writes, and its one-line errors.

The real benchmark (640 and 320 pixels, 20 runs) takes minutes; here every
measurement is 64x64 with two timed forwards, and the "V2" is a checkpoint of
the baseline, which is all the plumbing needs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.checkpoint import save_checkpoint
from featherface import featherface_baseline
from compressor_plugins.featherface_family import FAMILY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    checkpoint = tmp / "v2.pt"
    save_checkpoint(checkpoint, featherface_baseline(), FAMILY)
    out = tmp / "out"
    result = run_script("--v2", str(checkpoint), "--sizes", "64", "--threads", "1", "--runs", "2", "--warmup", "1",
                        "--macs-size", "64", "--runtimes", "eager", "--rounds", "1", "--out", str(out))
    return result, out


def test_writes_both_models(tiny_run):
    result, out = tiny_run
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "benchmark.json").read_text())
    assert set(report["models"]) == {"baseline", "v2"}
    for model in report["models"].values():
        assert model["params"]["total"] == 592_371
        assert sum(model["params"]["components"].values()) == 592_371
        assert model["macs"]["macs"] > 0 and model["macs"]["extra"]["deform_sampling_macs"] > 0
        [entry] = model["latency"]
        assert (entry["size"], entry["threads"]) == (64, 1)
        assert entry["latency"]["median_ms"] > 0 and entry["latency"]["runs"] == 2
        memory = entry["memory"]
        assert memory["peak_rss_mib"] > 0 and memory["rss_after_load_mib"] > 0
        assert memory["peak_rss_mib"] >= memory["forward_peak_over_load_mib"] >= 0
    [speedup] = report["speedup"]
    assert (speedup["size"], speedup["threads"]) == (64, 1) and speedup["speedup"] > 0
    env = report["environment"]
    assert env["torch"] and env["cpu_count"] >= 1 and "--runs 2" in env["command"]
    assert isinstance(report["warnings"], list)


def test_markdown_written_and_printed(tiny_run):
    result, out = tiny_run
    document = (out / "benchmark.md").read_text()
    assert "| parameters | 592,371 | 592,371 |" in document
    assert "64×64, 1 thread" in document and "| PyTorch eager |" in document and "speed-up" in document
    assert "compare.py --v2" in document  # the command that produced it
    assert "| parameters | 592,371" in result.stdout


def test_missing_v2_is_one_line(tmp_path):
    missing = tmp_path / "no-such-run"
    result = run_script("--v2", str(missing), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_option_is_one_line():
    result = run_script("--sizes", "big")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "big" in result.stderr


def test_speedup_is_baseline_over_v2():
    module = load_script()
    base = [{"size": 640, "threads": 1, "latency": {"median_ms": 300.0}}]
    v2 = [{"size": 640, "threads": 1, "latency": {"median_ms": 100.0}}]
    assert module.speedups(base, v2) == [{"size": 640, "threads": 1, "speedup": 3.0}]
