"""Baseline FeatherFace vs the compressed V2, in PyTorch eager and ONNX Runtime (fp32, int8), side by side in one run.

    python benchmarks/compare.py [--baseline featherface] [--v2 RUN_DIR_OR_CHECKPOINT]
                                 [--runtimes eager,onnx,int8] [--sizes 640,320] [--threads 1,2]
                                 [--runs 20] [--warmup 5] [--rounds 3] [--macs-size 640]
                                 [--artifacts DIR] [--calibration-images DIR] [--out benchmarks/results]

For each model: parameters (total and per component) and MACs at 640x640 batch 1
(with the deformable sampling MACs apart, as ``count_macs`` reports them); then
for each runtime, CPU latency (median of ``--runs`` batch-1 forwards after
``--warmup``, and their 90th percentile) at every size and thread count, the
peak resident memory of those forwards, and the size of the file the runtime runs.

The runtimes:

* ``eager``: the PyTorch model (checkpoint or family baseline), ``torch.set_num_threads(N)``;
* ``onnx``: ``python -m compressor export SOURCE --format onnx --input-size SxS``, one static
  export per (model, size), run by :class:`compressor.onnx_model.OnnxModel` (ONNX Runtime,
  CPUExecutionProvider, ``intra_op_num_threads=N``);
* ``int8``: the same command with ``--int8`` (static post-training quantization).

The exports run once per (model, size), in subprocesses, before any timing;
their files go to a temporary folder deleted at the end, or to ``--artifacts``.
An export or quantization that fails is recorded as that cell's one-line
reason ("n/a: ..." in the table) and the run carries on.

Every measurement runs in a fresh child process (this script again, in a hidden
``--measure-one`` mode that prints one JSON line), so that:

* peak RSS (``ru_maxrss``) belongs to one model at one size in one runtime and nothing else;
* one model's warmed caches, allocator pools and thread pools cannot help or hinder the next;
* the thread count is set before torch or ONNX Runtime creates its thread pool.

Both runtimes are timed by the same loop (:func:`time_forwards`).  Each model's
parameters, MACs and checkpoint size come from one more child (hidden
``--count-one``) before anything is timed; it also checks every size, so a bad
size fails at once.

The whole matrix is measured ``--rounds`` times, round after round, and within
a round the models alternate inside each (size, threads, runtime), so a change
in the machine's load falls on every cell alike.  A cell reports the median
over rounds of each process's median (and the lowest of those medians).

The parent only orchestrates: it never imports torch and blocks while a child
runs, so no spinning threads of its own compete with the measurement, and its
small RSS cannot leak into a child's ``ru_maxrss`` through fork+exec.

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` and prints the
markdown.  Exit codes: 0 ok (cells marked n/a included), 1 a measurement failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (the tests) rather than run
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_support import (MEASURE_ONE, OneLineParser, ScriptError, child_parser, environment, exit_on_error,
                            format_load, last_line, load_average, non_negative, positive, print_result, run_child,
                            threads_label, usable_cores)

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
DEFAULT_V2 = REPO / "runs" / "v2"
V2_RECIPE = REPO / "recipes" / "v2.yaml"
MACS_SIZE = 640
COUNT_ONE = "--count-one"
MIB = 1024 * 1024
RUNTIMES = ("eager", "onnx", "int8")
RUNTIME_LABELS = {"eager": "PyTorch eager", "onnx": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}
#: The file each ONNX runtime's export is written to, after ``<model>_<size>``.
EXPORT_SUFFIXES = {"onnx": ".onnx", "int8": ".int8.onnx"}
#: The size and thread count of the README's headline speed-ups (when measured; else the first of each).
HEADLINE_SIZE, HEADLINE_THREADS = 640, 1
BUILT_V2 = "recipes/v2.yaml --no-finetune (built in a temporary folder, deleted after the run)"
UNTRAINED_NOTE = ("V2 built from recipes/v2.yaml with --no-finetune on a freshly initialised baseline: "
                  "its weights are untrained (latency, MACs and memory do not depend on the weights)")


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 640,320") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _runtime_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in RUNTIMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(RUNTIMES)}")
    return list(dict.fromkeys(names))  # in the order given, each once


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(
        prog="compare.py",
        description="Measure the baseline and the compressed V2 side by side in PyTorch eager and ONNX Runtime "
                    "(fp32, int8): parameters, MACs, file sizes, CPU latency and peak memory, each measurement "
                    "in a fresh process.")
    parser.add_argument("--baseline", default="featherface",
                        help="family name (its baseline architecture) or a checkpoint (default: featherface)")
    parser.add_argument("--v2", default=None,
                        help=f"V2 run folder or checkpoint (default: {DEFAULT_V2.relative_to(REPO)}; when that is "
                             "missing, the architecture is built with `compress run recipes/v2.yaml --no-finetune`)")
    parser.add_argument("--runtimes", type=_runtime_list, default=list(RUNTIMES),
                        help="what runs the models: eager (PyTorch), onnx (ONNX Runtime, fp32 export), int8 "
                             "(ONNX Runtime, int8 export) (default: eager,onnx,int8)")
    parser.add_argument("--sizes", type=_int_list, default=[640, 320], help="square input sides (default: 640,320)")
    parser.add_argument("--threads", type=_int_list, default=[1, 2], help="CPU thread counts (default: 1,2)")
    parser.add_argument("--macs-size", type=positive, default=MACS_SIZE,
                        help=f"square input side for the MAC count (default: {MACS_SIZE})")
    parser.add_argument("--runs", type=positive, default=20, help="timed forwards per measurement (default: 20)")
    parser.add_argument("--warmup", type=non_negative, default=5, help="untimed forwards first (default: 5)")
    parser.add_argument("--rounds", type=positive, default=3,
                        help="times the whole matrix is measured, round after round; a cell reports the median "
                             "over rounds (default: 3)")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="keep the exported .onnx files (and their records) in this folder (default: a "
                             "temporary folder, deleted after the run)")
    parser.add_argument("--calibration-images", type=Path, default=None,
                        help="int8: a folder of images to calibrate on (default: the family's own data)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="output folder (default: benchmarks/results)")
    return parser.parse_args(argv)


# ------------------------------------------------------- children: one measurement


def current_rss_bytes() -> int:
    """Resident set size now (not the peak); Linux /proc, else the peak as the best available."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def time_forwards(model: Any, example: Any, runs: int, warmup: int) -> list[float]:
    """Every forward's time in ms (for the median and the p90): the engine's one timing loop, for both runtimes."""
    from compressor.accounting import forward_times

    return forward_times(model, example, runs, warmup)


def p90(times: list[float]) -> float:
    """The 90th percentile, interpolated between the measured times (never beyond the slowest)."""
    return statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]


def _open_for_timing(source: str, threads: int) -> tuple[Any, Any, str]:
    """(model, family, runtime) for ``source``: an ``.onnx`` file in ONNX Runtime, anything else in PyTorch."""
    if source.lower().endswith(".onnx"):
        import onnxruntime

        from compressor.onnx_model import FAMILY_KEY, OnnxModel
        from compressor.plugins import load_registry

        model = OnnxModel(Path(source), threads=threads)  # intra_op_num_threads = threads
        family = load_registry().get_family(model.metadata.get(FAMILY_KEY, "(none)"), where=f"{source}: {FAMILY_KEY}: ")
        return model, family, f"onnxruntime {onnxruntime.__version__}"
    import torch

    from compressor.checkpoint import open_model

    loaded = open_model(source)
    return loaded.model, loaded.family, f"torch {torch.__version__}"


def _measure_run(args: argparse.Namespace) -> dict[str, Any]:
    """Latency and peak RSS of batch-1 forwards of one model file at one size on ``args.threads`` threads."""
    import torch

    # Before anything else touches torch's intra-op pool, so it is created with this size.
    torch.set_num_threads(args.threads)
    model, family, runtime = _open_for_timing(args.source, args.threads)
    family.check_input_size(args.size, args.size)
    example = family.example_input(args.size, args.size, batch_size=1)  # the input eager and ONNX are given alike
    # The reference point: interpreter, torch (and ONNX Runtime) imported, model (or session) and input in memory.
    after_load = current_rss_bytes()
    peak_before_forwards = peak_rss_bytes()
    times = time_forwards(model, example, args.runs, args.warmup)
    peak = peak_rss_bytes()
    return {
        "runtime": runtime,
        "latency": {"median_ms": statistics.median(times), "p90_ms": p90(times), "min_ms": min(times),
                    "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
                    "input_size": [args.size, args.size], "batch_size": 1},
        "memory": {
            "peak_rss_mib": peak / MIB,
            "rss_after_load_mib": after_load / MIB,
            "forward_peak_over_load_mib": (peak - after_load) / MIB,
            # False when loading had already reached a higher peak than the forwards did: the
            # difference above is then an upper bound on what the forwards added.
            "peak_set_by_forwards": peak > peak_before_forwards,
        },
    }


def _checkpoint_size(loaded: Any) -> dict[str, Any]:
    """The bytes of the checkpoint eager loads; a family's baseline has none, so one is saved to measure."""
    path = Path(loaded.source)
    if path.is_file():
        return {"bytes": path.stat().st_size, "file": str(path), "saved_for_benchmark": False}
    from compressor.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="compare-checkpoint-") as folder:
        saved = Path(folder) / "baseline.pt"
        save_checkpoint(saved, loaded.model, loaded.family)
        return {"bytes": saved.stat().st_size, "file": None, "saved_for_benchmark": True}


def _count_run(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters by component, MACs of one forward at ``macs_size`` (batch 1) and the checkpoint's size."""
    import torch

    from compressor import accounting
    from compressor.checkpoint import open_model

    loaded = open_model(args.source)
    for size in args.check_sizes + [args.macs_size]:  # fail before minutes of exports and timing, not after
        loaded.family.check_input_size(size, size)
    measured = accounting.measure(loaded.model, loaded.family, (args.macs_size, args.macs_size))
    try:
        import onnxruntime
        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"resolved": loaded.source, "family": loaded.family.name, "params": measured.params.to_dict(),
            "macs": {"input_size": [args.macs_size, args.macs_size], "batch_size": 1, "macs": measured.macs,
                     "extra": measured.extra_macs},
            "checkpoint": _checkpoint_size(loaded),
            "versions": {"torch": torch.__version__, "onnxruntime": ort_version}}


def child_main(mode: str, argv: list[str]) -> int:
    """The hidden child modes: measure one (model, size, threads), or count one model; print JSON on one line."""
    parser = child_parser(f"compare.py {mode}", measure=mode == MEASURE_ONE)
    if mode != MEASURE_ONE:
        parser.add_argument("--check-sizes", type=_int_list, default=[])
        parser.add_argument("--macs-size", type=positive, default=MACS_SIZE)
    args = parser.parse_args(argv)
    return print_result(lambda: _measure_run(args) if mode == MEASURE_ONE else _count_run(args))


# ------------------------------------------------------------ parent: orchestrate


def _as_source(text: str) -> str:
    """A checkpoint or run folder becomes an absolute path, for the record; anything else stays as given.

    The same test as ``open_model``'s: ``featherface`` is a family name even
    when run from the repository root, where a ``featherface/`` package folder exists.
    """
    path = Path(text)
    return str(path.resolve()) if path.is_file() or _is_run_folder(path) else text


def _is_run_folder(path: Path) -> bool:
    return (path / "final.pt").is_file() or (path / "checkpoints").is_dir()


def resolve_v2(requested: str | None, workdir: Path) -> tuple[str, list[str]]:
    """The V2 source and notes about it; builds the architecture when there is no V2 run yet.

    A built V2 lives in ``workdir``, which is deleted after the run: the report names the recipe instead.
    """
    if requested is not None:
        if not Path(requested).exists():
            raise ScriptError(f"--v2 {requested}: no such run folder or checkpoint")
        if Path(requested).is_dir() and not _is_run_folder(Path(requested)):
            # Checked here rather than in the child: it would fail only after the baseline's first measurement.
            raise ScriptError(f"--v2 {requested}: a folder with neither final.pt nor checkpoints/ (not a run folder)")
        return _as_source(requested), []
    if DEFAULT_V2.exists():
        return str(DEFAULT_V2), []
    return build_untrained_v2(workdir), [UNTRAINED_NOTE]


def build_untrained_v2(workdir: Path) -> str:
    """``compress run recipes/v2.yaml --no-finetune`` into ``workdir``: the V2 architecture.

    The recipe's starting checkpoint is overridden with none (a fresh baseline),
    so this works before a trained baseline exists; the pruning stage removes a
    fixed fraction of each channel group, so the architecture does not depend
    on the weights either.
    """
    out = workdir / "v2"
    print(f"{DEFAULT_V2.relative_to(REPO)} not found: building the V2 architecture "
          f"(compress run recipes/v2.yaml --no-finetune, a few minutes on one core)", file=sys.stderr)
    command = [sys.executable, "-m", "compressor", "run", str(V2_RECIPE), "--no-finetune", "--quiet",
               "--out", str(out), "--set", "model.checkpoint=null"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise ScriptError(f"building V2 from {V2_RECIPE.relative_to(REPO)}: {last_line(done)}", 1)
    print(f"note: {UNTRAINED_NOTE}", file=sys.stderr)
    return str(out)


@dataclass
class Model:
    key: str
    label: str
    source: str
    notes: list[str]


@dataclass
class Export:
    """One exported file (or why there is none) for one (model, runtime, size)."""

    path: Path
    seconds: float
    bytes: int | None = None
    record: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self, keep_path: bool) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.path.name, "error": self.error, "seconds": self.seconds}
        # The metadata holds the whole architecture spec: `compress inspect FILE.onnx` shows it.
        record = {k: v for k, v in self.record.items() if k not in ("metadata", "path", "source")}
        return {"file": self.path.name, "path": str(self.path) if keep_path else None, "bytes": self.bytes,
                "seconds": self.seconds, "record": record}


def export_command(model: Model, runtime: str, size: int, folder: Path,
                   calibration_images: Path | None) -> tuple[list[str], Path]:
    """The project's export command for ``runtime`` at ``size``x``size`` (static), and the file it writes."""
    out = folder / f"{model.key}_{size}{EXPORT_SUFFIXES[runtime]}"
    command = [sys.executable, "-m", "compressor", "export", model.source, "--format", "onnx",
               "--input-size", f"{size}x{size}", "--out", str(out)]
    if runtime == "int8":
        command.append("--int8")
        if calibration_images is not None:
            command += ["--calibration-images", str(calibration_images)]
    return command, out


def export_one(model: Model, runtime: str, size: int, folder: Path, calibration_images: Path | None) -> Export:
    """Run the export in a subprocess; a failure becomes the export's one-line ``error``, not an exception."""
    command, out = export_command(model, runtime, size, folder, calibration_images)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        return Export(out, seconds, error=f"export{' --int8' if runtime == 'int8' else ''}: {last_line(done)}")
    if not out.is_file():
        return Export(out, seconds, error=f"export: exit status 0 but no file at {out}")
    record_file = out.with_name(out.name + ".json")  # compressor.export.record_path
    try:
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    except (OSError, ValueError):
        record = {}
    return Export(out, seconds, bytes=out.stat().st_size, record=record if isinstance(record, dict) else {})


def export_all(models: list[Model], args: argparse.Namespace, folder: Path) -> dict[tuple[str, str, int], Export]:
    """Every ONNX runtime's file for every (model, size), before any timing (exports load the machine)."""
    exports: dict[tuple[str, str, int], Export] = {}
    runtimes = [r for r in args.runtimes if r in EXPORT_SUFFIXES]
    if not runtimes:
        return exports
    folder.mkdir(parents=True, exist_ok=True)
    print(f"exporting ({', '.join(RUNTIME_LABELS[r] for r in runtimes)}) into {folder}:", file=sys.stderr)
    for model in models:
        for size in args.sizes:
            for runtime in runtimes:
                export = export_one(model, runtime, size, folder, args.calibration_images)
                exports[(model.key, runtime, size)] = export
                outcome = (f"n/a: {export.error}" if export.error is not None
                           else f"{export.bytes:,} bytes")
                print(f"  {model.label} {RUNTIME_LABELS[runtime]} at {size}x{size}: {outcome} "
                      f"({export.seconds:.0f} s)", file=sys.stderr)
    return exports


Cell = tuple[str, str, int, int]  # (model key, runtime, size, threads)


def measure_all(models: list[Model], args: argparse.Namespace,
                exports: dict[tuple[str, str, int], Export]) -> tuple[dict[Cell, list[dict[str, Any]]], dict[Cell, str]]:
    """Every (size, threads, runtime) for every model, ``args.rounds`` times, each in its own child.

    The rounds measure the whole matrix one after another, and within a round
    the models alternate inside each (size, threads, runtime), so that a change
    in the machine's load during the run falls on every cell alike.  Returns each
    cell's per-round results and the one-line reason of each cell that has none:
    an export that failed, or an ONNX Runtime measurement that failed (then it
    is not tried again).  A failing eager measurement stops the run.
    """
    results: dict[Cell, list[dict[str, Any]]] = {}
    failed: dict[Cell, str] = {}
    for round_index in range(1, args.rounds + 1):
        print(f"round {round_index}/{args.rounds} (each measurement in a fresh process):", file=sys.stderr)
        for size in args.sizes:
            for threads in args.threads:
                for runtime in args.runtimes:
                    for model in models:
                        cell = (model.key, runtime, size, threads)
                        what = f"{model.label} {RUNTIME_LABELS[runtime]} at {size}x{size}, {threads_label(threads)}"
                        export = exports.get((model.key, runtime, size))
                        if export is not None and export.error is not None:
                            failed.setdefault(cell, export.error)
                        if cell in failed:
                            continue
                        source = model.source if export is None else str(export.path)
                        child_args = ["--source", source, "--size", str(size), "--threads", str(threads),
                                      "--runs", str(args.runs), "--warmup", str(args.warmup)]
                        try:
                            result = run_child(SCRIPT, [MEASURE_ONE, *child_args], threads, what)
                        except ScriptError as err:
                            if runtime == "eager":
                                raise
                            failed[cell] = str(err).removeprefix(f"{what}: ")
                            print(f"  {what}: n/a: {failed[cell]}", file=sys.stderr)
                            continue
                        results.setdefault(cell, []).append(result)
                        print(f"  {what}: {result['latency']['median_ms']:.1f} ms, "
                              f"peak RSS {result['memory']['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    return results, failed


def aggregate(rounds: list[dict[str, Any]], size: int, threads: int) -> dict[str, Any]:
    """One cell over its rounds: the median of the per-process medians (and the lowest), p90 and memory likewise."""
    lat = [r["latency"] for r in rounds]
    mem = [r["memory"] for r in rounds]
    medians = [entry["median_ms"] for entry in lat]
    return {
        "size": size,
        "threads": threads,
        "latency": {"median_ms": statistics.median(medians), "min_median_ms": min(medians),
                    "p90_ms": statistics.median(entry["p90_ms"] for entry in lat),
                    "threads": threads, "runs": lat[0]["runs"], "warmup": lat[0]["warmup"], "rounds": len(rounds),
                    "input_size": [size, size], "batch_size": 1},
        "memory": {"peak_rss_mib": statistics.median(m["peak_rss_mib"] for m in mem),
                   "rss_after_load_mib": statistics.median(m["rss_after_load_mib"] for m in mem),
                   "forward_peak_over_load_mib": statistics.median(m["forward_peak_over_load_mib"] for m in mem),
                   "peak_set_by_forwards": all(m["peak_set_by_forwards"] for m in mem)},
        "per_round": [{"median_ms": entry["median_ms"], "p90_ms": entry["p90_ms"], "min_ms": entry["min_ms"],
                       "peak_rss_mib": m["peak_rss_mib"]} for entry, m in zip(lat, mem)],
    }


def cells_of(key: str, runtime: str, args: argparse.Namespace, results: dict[Cell, list[dict[str, Any]]],
             failed: dict[Cell, str]) -> list[dict[str, Any]]:
    """One runtime's cells for one model, in (size, threads) order; a cell without results carries its ``error``."""
    cells = []
    for size in args.sizes:
        for threads in args.threads:
            cell = (key, runtime, size, threads)
            if cell in results:
                cells.append(aggregate(results[cell], size, threads))
            else:
                cells.append({"size": size, "threads": threads, "error": failed.get(cell, "not measured")})
    return cells


def machine_warnings(load: list[float] | None, threads: list[int]) -> list[str]:
    """What makes the timings less trustworthy: other processes running, more threads than cores."""
    warnings = []
    if load is not None and load[0] >= 0.5:
        warnings.append(f"load average {load[0]:.2f} before the benchmark started: other processes were running, "
                        "so timings are slower and noisier than on a quiet machine")
    cores = usable_cores()
    if cores and max(threads) > cores:
        warnings.append(f"{max(threads)} threads on {cores} usable core(s): threads share cores, timings are inflated")
    return warnings


def speedups(baseline: list[dict[str, Any]], v2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Baseline median / V2 median per (size, threads), both in eager: above 1 means V2 is faster."""
    v2_by_key = {(r["size"], r["threads"]): r for r in v2}
    rows = []
    for base in baseline:
        other = v2_by_key[(base["size"], base["threads"])]
        ratio = base["latency"]["median_ms"] / other["latency"]["median_ms"]
        rows.append({"size": base["size"], "threads": base["threads"], "speedup": ratio})
    return rows


def ratio(reference: dict[str, Any] | None, cell: dict[str, Any] | None) -> float | None:
    """reference median / cell median (above 1: the cell is faster), None when either was not measured."""
    if not reference or not cell or "latency" not in reference or "latency" not in cell:
        return None
    return reference["latency"]["median_ms"] / cell["latency"]["median_ms"]


def runtime_speedups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (model, runtime, size, threads) against the baseline in eager, and int8 against its model's fp32 ONNX."""
    def cell(key: str, runtime: str, size: int, threads: int) -> dict[str, Any] | None:
        runtimes = report["models"][key]["runtimes"]
        if runtime not in runtimes:
            return None
        return next(c for c in runtimes[runtime]["cells"] if (c["size"], c["threads"]) == (size, threads))

    rows = []
    for key, model in report["models"].items():
        for runtime, entry in model["runtimes"].items():
            for measured in entry["cells"]:
                size, threads = measured["size"], measured["threads"]
                row = {"model": key, "runtime": runtime, "size": size, "threads": threads,
                       "vs_baseline_eager": ratio(cell("baseline", "eager", size, threads), measured)}
                if runtime == "int8":
                    row["vs_onnx_fp32"] = ratio(cell(key, "onnx", size, threads), measured)
                rows.append(row)
    return rows


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The README's two speed-ups: V2 int8 against the baseline eager and against V2 fp32 ONNX Runtime."""
    settings = report["settings"]
    size = HEADLINE_SIZE if HEADLINE_SIZE in settings["sizes"] else settings["sizes"][0]
    threads = HEADLINE_THREADS if HEADLINE_THREADS in settings["threads"] else settings["threads"][0]
    row = next((r for r in report["speedups"] if (r["model"], r["runtime"], r["size"], r["threads"])
                == ("v2", "int8", size, threads)), {})
    return {"size": size, "threads": threads, "v2_int8_vs_baseline_eager": row.get("vs_baseline_eager"),
            "v2_int8_vs_v2_onnx_fp32": row.get("vs_onnx_fp32")}


# ------------------------------------------------------------------ markdown


def _g(macs: int) -> str:
    return f"{macs / 1e9:.3f} G"


def _change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def _macs_cell(macs: dict[str, Any]) -> str:
    extra = sum(macs["extra"].values())
    return f"{_g(macs['macs'])} + {_g(extra)} deformable sampling" if extra else _g(macs["macs"])


def _na(reason: str) -> str:
    return f"n/a: {reason}".replace("|", "\\|")  # a table cell


def markdown(report: dict[str, Any]) -> str:
    base, v2 = report["models"]["baseline"], report["models"]["v2"]
    lines = [
        "| | baseline | V2 | change |",
        "| --- | ---: | ---: | ---: |",
        f"| parameters | {base['params']['total']:,} | {v2['params']['total']:,} | "
        f"{_change(base['params']['total'], v2['params']['total'])} |",
        _macs_row(base["macs"], v2["macs"]),
        "",
    ]
    lines += _latency_table(report) + [""] + _headline_lines(report) + [""] + _files_table(report)
    lines += ["", "| parameters by component | baseline | V2 |", "| --- | ---: | ---: |"]
    for name, count in base["params"]["components"].items():
        lines.append(f"| {name} | {count:,} | {v2['params']['components'].get(name, 0):,} |")
    return "\n".join(lines) + "\n"


def _macs_row(base: dict[str, Any], v2: dict[str, Any]) -> str:
    with_sampling = _change(base["macs"] + sum(base["extra"].values()), v2["macs"] + sum(v2["extra"].values()))
    height, width = base["input_size"]
    return (f"| MACs at {height}×{width}, batch 1 | {_macs_cell(base)} | {_macs_cell(v2)} | "
            f"{_change(base['macs'], v2['macs'])} ({with_sampling} with sampling) |")


def _rows(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(model key, runtime, the runtime's entry) in table order: by model, then runtime."""
    return [(key, runtime, entry) for key, model in report["models"].items()
            for runtime, entry in model["runtimes"].items()]


def _latency_table(report: dict[str, Any]) -> list[str]:
    settings = report["settings"]
    columns = [(s, t) for s in settings["sizes"] for t in settings["threads"]]
    by_cell = {(r["model"], r["runtime"], r["size"], r["threads"]): r for r in report["speedups"]}
    lines = [f"CPU latency, batch 1: median over {settings['rounds']} round(s) of each process's median of "
             f"{settings['runs']} forwards (after {settings['warmup']} warm-up). (N×): speed-up against the "
             "baseline in PyTorch eager at the same size and threads; int8 also against the same model's "
             "ONNX Runtime fp32.",
             "",
             "| model | runtime | " + " | ".join(f"{s}×{s}, {threads_label(t)}" for s, t in columns) + " |",
             "| --- | --- |" + " ---: |" * len(columns)]
    for key, runtime, entry in _rows(report):
        cells = []
        for measured in entry["cells"]:
            if "error" in measured:
                cells.append(_na(measured["error"]))
                continue
            row = by_cell[(key, runtime, measured["size"], measured["threads"])]
            factors = []
            if not (key == "baseline" and runtime == "eager") and row["vs_baseline_eager"] is not None:
                factors.append(f"{row['vs_baseline_eager']:.2f}×")
            if row.get("vs_onnx_fp32") is not None:
                factors.append(f"{row['vs_onnx_fp32']:.2f}× vs fp32")
            extra = f" ({'; '.join(factors)})" if factors else ""
            cells.append(f"{measured['latency']['median_ms']:.1f} ms{extra}")
        lines.append(f"| {report['models'][key]['label']} | {entry['label']} | " + " | ".join(cells) + " |")
    return lines


def _headline_lines(report: dict[str, Any]) -> list[str]:
    head = report["headline"]
    where = f"at {head['size']}, {threads_label(head['threads'])}"

    def factor(value: float | None, needs: list[tuple[str, str]]) -> str:
        if value is not None:
            return f"{value:.2f}×"
        reasons = [_missing(report, key, runtime, head["size"], head["threads"]) for key, runtime in needs]
        return _na("; ".join(r for r in reasons if r))

    return [f"- V2 int8 (ONNX Runtime) vs baseline eager {where}: "
            f"{factor(head['v2_int8_vs_baseline_eager'], [('v2', 'int8'), ('baseline', 'eager')])}",
            f"- V2 int8 vs V2 fp32 ONNX Runtime {where}: "
            f"{factor(head['v2_int8_vs_v2_onnx_fp32'], [('v2', 'int8'), ('v2', 'onnx')])}"]


def _missing(report: dict[str, Any], key: str, runtime: str, size: int, threads: int) -> str:
    """Why a cell has no latency ('' when it has one), for a headline that cannot be computed."""
    model = report["models"][key]
    entry = model["runtimes"].get(runtime)
    if entry is None:
        return f"{model['label']} {RUNTIME_LABELS[runtime]} not measured (--runtimes)"
    cell = next(c for c in entry["cells"] if (c["size"], c["threads"]) == (size, threads))
    return f"{model['label']} {RUNTIME_LABELS[runtime]}: {cell['error']}" if "error" in cell else ""


def _files_table(report: dict[str, Any]) -> list[str]:
    """File size, agreement with PyTorch and peak RSS per size at the first thread count (all in the JSON)."""
    settings = report["settings"]
    threads = settings["threads"][0]
    lines = ["File each runtime runs (eager: the checkpoint; ONNX: the export at the first size that exported) and "
             f"peak RSS of the process at {threads_label(threads)} (in brackets: what the forwards added over the "
             "RSS after load).",
             "",
             "| model | runtime | file | max \\|ONNX Runtime − PyTorch\\| | "
             + " | ".join(f"peak RSS {s}×{s}" for s in settings["sizes"]) + " |",
             "| --- | --- | ---: | ---: |" + " ---: |" * len(settings["sizes"])]
    for key, runtime, entry in _rows(report):
        memory = []
        for measured in entry["cells"]:
            if measured["threads"] != threads:
                continue
            if "error" in measured:
                memory.append("n/a")  # the reason is in the latency table
            else:
                m = measured["memory"]
                memory.append(f"{m['peak_rss_mib']:.0f} MiB ({_forward_mib(m)})")
        lines.append(f"| {report['models'][key]['label']} | {entry['label']} | "
                     f"{_file_cell(report['models'][key], entry)} | "
                     f"{_diff_cell(runtime, entry)} | " + " | ".join(memory) + " |")
    return lines


def _file_cell(model: dict[str, Any], entry: dict[str, Any]) -> str:
    if "exports" not in entry:  # eager
        checkpoint = model["checkpoint"]
        note = " (saved for the benchmark: a family's baseline has no file)" if checkpoint["saved_for_benchmark"] else ""
        return f"{_bytes(checkpoint['bytes'])}{note}"
    exported = [e for e in entry["exports"] if "error" not in e]
    return _bytes(exported[0]["bytes"]) if exported else _na(entry["exports"][0]["error"])


def _bytes(count: int) -> str:
    return f"{count / MIB:.2f} MiB ({count:,} bytes)"


def _diff_cell(runtime: str, entry: dict[str, Any]) -> str:
    """The largest difference from PyTorch over every output and size, as the export records report it."""
    if runtime == "eager":
        return "—"
    diffs = [d for e in entry["exports"] if "error" not in e for d in e["record"].get("max_abs_diff", {}).values()]
    return f"{max(diffs):.2g}" if diffs else "—"


def _forward_mib(memory: dict[str, Any]) -> str:
    # "≤" when loading had set the peak: the forwards added at most this much.
    bound = "" if memory["peak_set_by_forwards"] else "≤ "
    return f"{bound}{memory['forward_peak_over_load_mib']:.0f} MiB"


def markdown_document(report: dict[str, Any], table: str) -> str:
    env, settings = report["environment"], report["settings"]
    notes = [
        f"Command: `{env['command']}`",
        f"{env['date']}, {env['cpu_model']}, {env['usable_cores']} usable core(s), torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime'] or 'not installed'}, load average at start "
        f"{format_load(env['load_average_at_start'])}, at end {format_load(env['load_average_at_end'])}.",
        "",
        table,
        "Each latency and memory figure comes from a fresh process that loads one model and runs "
        f"{settings['warmup']} warm-up and {settings['runs']} timed batch-1 forwards on the family's example input, "
        "with torch.set_num_threads (and, for ONNX Runtime, intra_op_num_threads) set to the thread count; "
        f"the whole matrix was measured {settings['rounds']} time(s), in rounds, and each figure is the median over "
        "rounds (the lowest round and p90s are in benchmark.json). The ONNX files are static exports by "
        "`python -m compressor export --format onnx [--int8] --input-size SxS`, one per size. Peak RSS is "
        "`ru_maxrss` after those forwards (the process imports torch in every runtime); \"over RSS after load\" "
        "subtracts the resident size measured after imports, model (or session) load and input creation. "
        "MACs count convolutions and linear layers (BN, activations, pooling, resizing not counted); "
        "the deformable convs' bilinear sampling is given apart.",
    ]
    for model in report["models"].values():
        notes += [f"\n{model['label']}: `{model['resolved']}`"] + [f"- {n}" for n in model["notes"]]
    notes += [f"\n**Warning:** {w}" for w in report["warnings"]]
    return "\n".join(notes) + "\n"


# ---------------------------------------------------------------------- main


def collect(args: argparse.Namespace, argv: list[str], workdir: Path) -> dict[str, Any]:
    started, load = datetime.now(timezone.utc), load_average()  # before any child adds to the load
    baseline_source = _as_source(args.baseline)
    v2_source, v2_notes = resolve_v2(args.v2, workdir)  # a missing --v2 fails here, before any other output
    if args.calibration_images is not None:
        if "int8" not in args.runtimes:
            raise ScriptError("--calibration-images is for the int8 runtime, which --runtimes leaves out")
        if not args.calibration_images.is_dir():
            raise ScriptError(f"--calibration-images {args.calibration_images}: no such folder")
        args.calibration_images = args.calibration_images.resolve()  # the exports run in the repository root
    warnings = machine_warnings(load, args.threads)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    built = UNTRAINED_NOTE in v2_notes
    models = [Model("baseline", "baseline", baseline_source, []), Model("v2", "V2", v2_source, v2_notes)]
    # Counts first: they check every size, so a bad one fails before minutes of exports.
    print("counting parameters and MACs:", file=sys.stderr)
    counts = {m.key: run_child(SCRIPT, [COUNT_ONE, "--source", m.source, "--macs-size", str(args.macs_size),
                                        "--check-sizes", ",".join(map(str, args.sizes))], None, m.label)
              for m in models}
    keep = args.artifacts is not None
    folder = args.artifacts.resolve() if keep else workdir / "artifacts"
    exports = export_all(models, args, folder)
    results, failed = measure_all(models, args, exports)
    note_sources(models, counts, built)
    versions = counts["baseline"].pop("versions")
    counts["v2"].pop("versions")
    report: dict[str, Any] = {
        "settings": {"runtimes": args.runtimes, "sizes": args.sizes, "threads": args.threads, "runs": args.runs,
                     "warmup": args.warmup, "rounds": args.rounds, "batch_size": 1, "macs_size": args.macs_size,
                     "artifacts": str(folder) if keep else None,
                     "calibration_images": str(args.calibration_images) if args.calibration_images else None},
        "models": {},
        "environment": environment({"torch": versions["torch"], "onnxruntime": versions.get("onnxruntime")},
                                   SCRIPT, argv, started, load),
        "warnings": warnings,
    }
    for model in models:
        count = counts[model.key]
        checkpoint = count.pop("checkpoint")
        runtimes: dict[str, Any] = {}
        for runtime in args.runtimes:
            entry: dict[str, Any] = {"label": RUNTIME_LABELS[runtime],
                                     "cells": cells_of(model.key, runtime, args, results, failed)}
            if runtime != "eager":
                entry["exports"] = [{"size": size, **exports[(model.key, runtime, size)].to_dict(keep)}
                                    for size in args.sizes]
            runtimes[runtime] = entry
        report["models"][model.key] = {"label": model.label, "source": model.source, "notes": model.notes, **count,
                                       "checkpoint": checkpoint, "runtimes": runtimes}
        if "eager" in runtimes:  # the eager cells under their earlier name, as before the runtimes
            report["models"][model.key]["latency"] = runtimes["eager"]["cells"]
    if "eager" in args.runtimes:
        report["speedup"] = speedups(report["models"]["baseline"]["latency"], report["models"]["v2"]["latency"])
    report["speedups"] = runtime_speedups(report)
    report["headline"] = headline(report)
    report["unavailable"] = [f"{m.label} {RUNTIME_LABELS[r]} at {s}x{s}, {threads_label(t)}: "
                             f"{failed[(m.key, r, s, t)]}"
                             for m in models for r in args.runtimes for s in args.sizes for t in args.threads
                             if (m.key, r, s, t) in failed]
    return report


def note_sources(models: list[Model], counts: dict[str, dict[str, Any]], built: bool) -> None:
    """Notes on where each model came from (in place): a built V2 and an unfinished run folder."""
    if built:  # the temporary path means nothing once the run is over
        counts["v2"]["resolved"] = models[1].source = BUILT_V2
        counts["v2"]["checkpoint"]["file"] = None
    for model in models:
        if Path(counts[model.key]["resolved"]).parent.name == "checkpoints" and Path(model.source).is_dir():
            model.notes.append(f"{model.source} has no final.pt (unfinished run): measured its last stage checkpoint")


def write_outputs(report: dict[str, Any], out: Path) -> str:
    table = markdown(report)
    document = markdown_document(report, table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "benchmark.md").write_text(document)
    return document


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in ([MEASURE_ONE], [COUNT_ONE]):
        return child_main(argv[0], argv[1:])
    args = parse_args(argv)
    return exit_on_error(lambda: benchmark(args, argv))


def benchmark(args: argparse.Namespace, argv: list[str]) -> int:
    """Measure, write the outputs and print the markdown; ``main`` turns a ScriptError into its one line."""
    with tempfile.TemporaryDirectory(prefix="compare-v2-") as workdir:
        report = collect(args, argv, Path(workdir))
    document = write_outputs(report, args.out)
    print(document, end="")
    for line in report["unavailable"]:
        print(f"n/a: {line}", file=sys.stderr)
    print(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
