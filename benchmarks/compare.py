"""Baseline FeatherFace vs the compressed V2, measured side by side in one run.

    python benchmarks/compare.py [--baseline featherface] [--v2 RUN_DIR_OR_CHECKPOINT]
                                 [--sizes 640,320] [--threads 1,2] [--runs 20] [--warmup 5]
                                 [--macs-size 640] [--out benchmarks/results]

For each model: parameters (total and per component), MACs at 640x640 batch 1
(with the deformable sampling MACs apart, as ``count_macs`` reports them), CPU
latency (median of ``--runs`` batch-1 forwards after ``--warmup``) at every size
and thread count, and the peak resident memory of those forwards.

Every measurement runs in a fresh child process (this script again, in a hidden
``--measure-one`` mode that prints one JSON line), so that:

* peak RSS (``ru_maxrss``) belongs to one model at one size and nothing else;
* one model's warmed caches, allocator pools and OpenMP thread pool cannot help
  or hinder the next;
* the thread count is set before torch creates its thread pool.

A model's first child also counts its parameters and MACs, after it has read
its memory figures (a MAC-counting forward at 640 would otherwise set the peak).

The parent only orchestrates: it never imports torch and blocks while a child
runs, so no spinning OpenMP threads of its own compete with the measurement,
and its small RSS cannot leak into a child's ``ru_maxrss`` through fork+exec.

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` and prints the
markdown.  Exit codes: 0 ok, 1 a measurement failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_V2 = REPO / "runs" / "v2"
V2_RECIPE = REPO / "recipes" / "v2.yaml"
MACS_SIZE = 640
MEASURE_ONE = "--measure-one"
MIB = 1024 * 1024
BUILT_V2 = "recipes/v2.yaml --no-finetune (built in a temporary folder, deleted after the run)"
UNTRAINED_NOTE = ("V2 built from recipes/v2.yaml with --no-finetune on a freshly initialised baseline: "
                  "its weights are untrained (latency, MACs and memory do not depend on the weights)")


class BenchmarkError(Exception):
    """A problem reported as one line; ``exit_code`` follows the compress CLI (2 bad input, 1 failure)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- command line


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like the compress CLI's), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 640,320") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 0")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="compare.py",
        description="Measure the baseline and the compressed V2 side by side: parameters, MACs, "
                    "CPU latency and peak memory, each measurement in a fresh process.")
    parser.add_argument("--baseline", default="featherface",
                        help="family name (its baseline architecture) or a checkpoint (default: featherface)")
    parser.add_argument("--v2", default=None,
                        help=f"V2 run folder or checkpoint (default: {DEFAULT_V2.relative_to(REPO)}; when that is "
                             "missing, the architecture is built with `compress run recipes/v2.yaml --no-finetune`)")
    parser.add_argument("--sizes", type=_int_list, default=[640, 320], help="square input sides (default: 640,320)")
    parser.add_argument("--threads", type=_int_list, default=[1, 2], help="CPU thread counts (default: 1,2)")
    parser.add_argument("--macs-size", type=_positive, default=MACS_SIZE,
                        help=f"square input side for the MAC count (default: {MACS_SIZE})")
    parser.add_argument("--runs", type=_positive, default=20, help="timed forwards per measurement (default: 20)")
    parser.add_argument("--warmup", type=_non_negative, default=5, help="untimed forwards first (default: 5)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="output folder (default: benchmarks/results)")
    return parser.parse_args(argv)


# ------------------------------------------------------- child: one measurement


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


def _count(loaded: Any, macs_size: int) -> dict[str, Any]:
    """Parameters by component and MACs of one forward at ``macs_size``, batch 1."""
    import torch

    from compressor import accounting

    measured = accounting.measure(loaded.model, loaded.family, (macs_size, macs_size))
    return {"resolved": loaded.source, "family": loaded.family.name, "params": measured.params.to_dict(),
            "macs": {"input_size": [macs_size, macs_size], "batch_size": 1, "macs": measured.macs,
                     "extra": measured.extra_macs},
            "torch": torch.__version__}


def _measure_run(args: argparse.Namespace) -> dict[str, Any]:
    """Latency and peak RSS of batch-1 forwards of one model at one size on ``args.threads`` threads.

    With ``--count``, parameters and MACs too, but only after the memory has
    been read: a MAC-counting forward at 640 would otherwise set the peak.
    """
    import torch

    # Before anything else touches torch's intra-op pool, so it is created with this size.
    torch.set_num_threads(args.threads)
    from compressor import accounting
    from compressor.checkpoint import open_model

    loaded = open_model(args.source)
    for size in args.check_sizes + [args.size]:  # fail before minutes of timing, not after
        loaded.family.check_input_size(size, size)
    loaded.family.example_input(args.size, args.size, batch_size=1)  # warm what building an input costs
    # The reference point: interpreter, torch and plugins imported, model and input in memory.
    after_load = current_rss_bytes()
    peak_before_forwards = peak_rss_bytes()
    measured = accounting.measure(loaded.model, loaded.family, (args.size, args.size), macs=False,
                                  latency_runs=args.runs, latency_warmup=args.warmup, threads=args.threads)
    peak = peak_rss_bytes()
    result: dict[str, Any] = {
        "latency": measured.latency.to_dict(),
        "memory": {
            "peak_rss_mib": peak / MIB,
            "rss_after_load_mib": after_load / MIB,
            "forward_peak_over_load_mib": (peak - after_load) / MIB,
            # False when loading had already reached a higher peak than the forwards did: the
            # difference above is then an upper bound on what the forwards added.
            "peak_set_by_forwards": peak > peak_before_forwards,
        },
    }
    if args.count:
        result["count"] = _count(loaded, args.macs_size)
    return result


def measure_one(argv: list[str]) -> int:
    """The hidden child mode: measure one model at one size and thread count, print JSON on one line."""
    parser = _OneLineParser(prog="compare.py --measure-one")
    parser.add_argument("--source", required=True)
    parser.add_argument("--size", type=_positive, required=True)
    parser.add_argument("--threads", type=_positive, required=True)
    parser.add_argument("--runs", type=_positive, required=True)
    parser.add_argument("--warmup", type=_non_negative, required=True)
    parser.add_argument("--check-sizes", type=_int_list, default=[])
    parser.add_argument("--count", action="store_true")
    parser.add_argument("--macs-size", type=_positive, default=MACS_SIZE)
    args = parser.parse_args(argv)
    from compressor.errors import CompressorError

    try:
        if args.count:
            args.check_sizes.append(args.macs_size)
        result = _measure_run(args)
    except CompressorError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------ parent: orchestrate


def _child_env(threads: int | None) -> dict[str, str]:
    """The environment of a child: OpenMP/MKL pools sized before the child imports torch."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_child(args: list[str], threads: int | None, what: str) -> dict[str, Any]:
    """Run this script in ``--measure-one`` mode and return its JSON.

    ``subprocess.run`` blocks: the parent sleeps while the child measures.
    """
    command = [sys.executable, str(Path(__file__).resolve()), MEASURE_ONE, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=_child_env(threads))
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        message = lines[-1].removeprefix("error: ")
        raise BenchmarkError(f"{what}: {message}", 2 if done.returncode == 2 else 1)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchmarkError(f"{what}: the measuring process printed no result", 1)
    return json.loads(lines[-1])


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
            raise BenchmarkError(f"--v2 {requested}: no such run folder or checkpoint")
        if Path(requested).is_dir() and not _is_run_folder(Path(requested)):
            # Checked here rather than in the child: it would fail only after the baseline's first measurement.
            raise BenchmarkError(f"--v2 {requested}: a folder with neither final.pt nor checkpoints/ (not a run folder)")
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
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise BenchmarkError(f"building V2 from {V2_RECIPE.relative_to(REPO)}: {lines[-1]}", 1)
    print(f"note: {UNTRAINED_NOTE}", file=sys.stderr)
    return str(out)


@dataclass
class Model:
    key: str
    label: str
    source: str
    notes: list[str]


def measure_all(models: list[Model], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every (size, threads) for every model, each in its own child.

    The models alternate inside each (size, threads) so that a change in the
    machine's load during the run falls on both alike.  Each model's first
    child also counts its parameters and MACs (after its own measurement) and
    checks every size, so a bad size fails at once.
    """
    results: dict[str, list[dict[str, Any]]] = {m.key: [] for m in models}
    for size in args.sizes:
        for threads in args.threads:
            for model in models:
                child_args = ["--source", model.source, "--size", str(size), "--threads", str(threads),
                              "--runs", str(args.runs), "--warmup", str(args.warmup)]
                if not results[model.key]:
                    child_args += ["--count", "--macs-size", str(args.macs_size),
                                   "--check-sizes", ",".join(map(str, args.sizes))]
                what = f"{model.label} at {size}x{size}, {_threads(threads)}"
                result = run_child(child_args, threads, what)
                result.update(size=size, threads=threads)
                results[model.key].append(result)
                print(f"  {what}: {result['latency']['median_ms']:.1f} ms, "
                      f"peak RSS {result['memory']['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    return results


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


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


def usable_cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def environment(torch_version: str, argv: list[str], started: datetime, load: list[float] | None) -> dict[str, Any]:
    return {
        "torch": torch_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        # A busy machine slows every number; the load before the run says whether it was quiet.
        "load_average_at_start": load,
        "date": started.isoformat(timespec="seconds"),
        "command": command_line(argv),
    }


def command_line(argv: list[str]) -> str:
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    return shlex.join(["python", script, *argv])


def speedups(baseline: list[dict[str, Any]], v2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Baseline median / V2 median per (size, threads): above 1 means V2 is faster."""
    v2_by_key = {(r["size"], r["threads"]): r for r in v2}
    rows = []
    for base in baseline:
        other = v2_by_key[(base["size"], base["threads"])]
        ratio = base["latency"]["median_ms"] / other["latency"]["median_ms"]
        rows.append({"size": base["size"], "threads": base["threads"], "speedup": ratio})
    return rows


# ------------------------------------------------------------------ markdown


def _threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"


def _g(macs: int) -> str:
    return f"{macs / 1e9:.3f} G"


def _change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def _macs_cell(macs: dict[str, Any]) -> str:
    extra = sum(macs["extra"].values())
    return f"{_g(macs['macs'])} + {_g(extra)} deformable sampling" if extra else _g(macs["macs"])


def markdown(report: dict[str, Any]) -> str:
    base, v2 = report["models"]["baseline"], report["models"]["v2"]
    lines = [
        "| | baseline | V2 | change |",
        "| --- | ---: | ---: | ---: |",
        f"| parameters | {base['params']['total']:,} | {v2['params']['total']:,} | "
        f"{_change(base['params']['total'], v2['params']['total'])} |",
    ]
    lines.append(_macs_row(base["macs"], v2["macs"]))
    speedup = {(s["size"], s["threads"]): s["speedup"] for s in report["speedup"]}
    runs = report["settings"]["runs"]
    for b, v in zip(base["latency"], v2["latency"]):
        lines.append(f"| CPU latency {b['size']}×{b['size']}, {_threads(b['threads'])}, median of {runs} | "
                     f"{b['latency']['median_ms']:.1f} ms | {v['latency']['median_ms']:.1f} ms | "
                     f"{speedup[(b['size'], b['threads'])]:.2f}× speed-up |")
    lines.extend(_memory_rows(base["latency"], v2["latency"], report["settings"]["threads"][0]))
    lines += ["", "| parameters by component | baseline | V2 |", "| --- | ---: | ---: |"]
    for name, count in base["params"]["components"].items():
        lines.append(f"| {name} | {count:,} | {v2['params']['components'].get(name, 0):,} |")
    return "\n".join(lines) + "\n"


def _macs_row(base: dict[str, Any], v2: dict[str, Any]) -> str:
    with_sampling = _change(base["macs"] + sum(base["extra"].values()), v2["macs"] + sum(v2["extra"].values()))
    height, width = base["input_size"]
    return (f"| MACs at {height}×{width}, batch 1 | {_macs_cell(base)} | {_macs_cell(v2)} | "
            f"{_change(base['macs'], v2['macs'])} ({with_sampling} with sampling) |")


def _memory_rows(base: list[dict[str, Any]], v2: list[dict[str, Any]], threads: int) -> list[str]:
    """Peak RSS per size at the first thread count (every count is in the JSON)."""
    rows = []
    for b, v in zip(base, v2):
        if b["threads"] != threads:
            continue
        bm, vm = b["memory"], v["memory"]
        size = f"{b['size']}×{b['size']}, {_threads(threads)}"
        rows.append(f"| peak RSS of the process, {size} | {bm['peak_rss_mib']:.0f} MiB | "
                    f"{vm['peak_rss_mib']:.0f} MiB | {_change(bm['peak_rss_mib'], vm['peak_rss_mib'])} |")
        rows.append(f"| of which forwards, over RSS after load, {size} | {_forward_mib(bm)} | {_forward_mib(vm)} | "
                    f"{_change(bm['forward_peak_over_load_mib'], vm['forward_peak_over_load_mib'])} |")
    return rows


def _forward_mib(memory: dict[str, Any]) -> str:
    # "≤" when loading had set the peak: the forwards added at most this much.
    bound = "" if memory["peak_set_by_forwards"] else "≤ "
    return f"{bound}{memory['forward_peak_over_load_mib']:.0f} MiB"


def markdown_document(report: dict[str, Any], table: str) -> str:
    env = report["environment"]
    notes = [
        f"Command: `{env['command']}`",
        f"{env['date']}, {env['cpu_model']}, {env['usable_cores']} usable core(s), torch {env['torch']}, "
        f"load average at start {_load(env['load_average_at_start'])}.",
        "",
        table,
        "Each latency and memory figure comes from a fresh process that loads one model and runs "
        f"{report['settings']['warmup']} warm-up and {report['settings']['runs']} timed batch-1 forwards "
        "with torch.set_num_threads set to the thread count. Peak RSS is `ru_maxrss` after those forwards; "
        "\"over RSS after load\" subtracts the resident size measured after imports, model load and input creation. "
        "MACs count convolutions and linear layers (BN, activations, pooling, resizing not counted); "
        "the deformable convs' bilinear sampling is given apart.",
    ]
    for model in report["models"].values():
        notes += [f"\n{model['label']}: `{model['resolved']}`"] + [f"- {n}" for n in model["notes"]]
    notes += [f"\n**Warning:** {w}" for w in report["warnings"]]
    return "\n".join(notes) + "\n"


def _load(load: list[float] | None) -> str:
    return "n/a" if not load else ", ".join(f"{v:.2f}" for v in load)


# ---------------------------------------------------------------------- main


def collect(args: argparse.Namespace, argv: list[str], workdir: Path) -> dict[str, Any]:
    started, load = datetime.now(timezone.utc), load_average()  # before any child adds to the load
    baseline_source = _as_source(args.baseline)
    v2_source, v2_notes = resolve_v2(args.v2, workdir)  # a missing --v2 fails here, before any other output
    warnings = machine_warnings(load, args.threads)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    built = UNTRAINED_NOTE in v2_notes
    models = [Model("baseline", "baseline", baseline_source, []), Model("v2", "V2", v2_source, v2_notes)]
    print("measuring (each in a fresh process):", file=sys.stderr)
    measured = measure_all(models, args)
    counts = take_counts(models, measured, built)
    torch_version = counts["baseline"].pop("torch")
    counts["v2"].pop("torch")
    report: dict[str, Any] = {
        "settings": {"sizes": args.sizes, "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
                     "batch_size": 1, "macs_size": args.macs_size},
        "models": {m.key: {"label": m.label, "source": m.source, "notes": m.notes, **counts[m.key],
                           "latency": measured[m.key]}
                   for m in models},
        "environment": environment(torch_version, argv, started, load),
        "warnings": warnings,
    }
    report["speedup"] = speedups(measured["baseline"], measured["v2"])
    return report


def take_counts(models: list[Model], measured: dict[str, list[dict[str, Any]]], built: bool) -> dict[str, dict]:
    """Each model's parameters and MACs (from its first child), with notes on where the model came from."""
    counts = {m.key: measured[m.key][0].pop("count") for m in models}
    if built:  # the temporary path means nothing once the run is over
        counts["v2"]["resolved"] = models[1].source = BUILT_V2
    for model in models:
        if Path(counts[model.key]["resolved"]).parent.name == "checkpoints" and Path(model.source).is_dir():
            model.notes.append(f"{model.source} has no final.pt (unfinished run): measured its last stage checkpoint")
    return counts


def write_outputs(report: dict[str, Any], out: Path) -> str:
    table = markdown(report)
    document = markdown_document(report, table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "benchmark.md").write_text(document)
    return document


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [MEASURE_ONE]:
        return measure_one(argv[1:])
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="compare-v2-") as workdir:
            report = collect(args, argv, Path(workdir))
        document = write_outputs(report, args.out)
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(document, end="")
    print(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
