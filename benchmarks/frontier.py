"""The frontier, as a picture: held-out test AP against parameters and against CPU latency, for many runs.

    python benchmarks/frontier.py --run LABEL=RUN_DIR [--run LABEL=RUN_DIR ...] [--series LABEL=NAME ...]
                                  [--timed-on LABEL=CHECKPOINT ...]
                                  [--teacher CHECKPOINT] [--latency-runs 10] [--warmup 5] [--rounds 3]
                                  [--threads 1] [--input-size 640] [--out benchmarks/results/frontier]

Each ``--run`` is one point: a folder written by ``compress run`` (its ``report.json``
and ``final.pt``; a folder holding only the record, its weights not kept, is placed by
its accuracy and parameters and left out of the latency, with a note, unless ``--timed-on``
names a checkpoint of the same architecture to time it on).  The point's accuracy is the final model's held-out test AP
(``test_ap`` in the record, with its interval ``test_ap_low``..``test_ap_high``, the
face families' 95% bootstrap over test images); a run whose record has no test AP
falls back to its validation ``ap``, and is marked so in the table, the JSON and
the plots' title.  The parameters are the record's ``final.params.total``.

Series: a label ``NAME@REST`` (``auto@150k``) puts the point in series ``NAME``, and
``--series LABEL=NAME`` names (or, with an empty NAME, removes) a label's series
explicitly.  The points of one series are joined by a line in the order of the
x axis (a frontier); every other point is a marker of its own.  The teacher (the
starting model, the ``baseline`` of every run) is one more marker: the runs must
agree on it (family, parameters, AP), or the script stops with one line.  A run
that started from a checkpoint inside another ``--run``'s folder (``compress auto
--from RUN/checkpoints/...``) continues that run: its baseline is not the teacher,
it is left out of that check, and the notes say where it started.

Latency (skipped with ``--latency-runs 0``): CPU wall time of batch-1 PyTorch eager
forwards at ``--input-size`` on ``--threads`` threads, timed by the project's one loop
(:func:`compressor.accounting.measure_latency`, i.e. ``forward_times``).  Each model is
timed in a fresh child process (this script in a hidden ``--measure-one`` mode),
``--rounds`` times, the models alternating within each round so a change in the
machine's load falls on all alike; a point's latency is the median over rounds of
each process's median.  The runs are timed on their ``final.pt``; the teacher on
``--teacher`` or else the recipe's ``model.checkpoint`` as recorded (absolute: the
recipe loader resolves it against the recipe file); a run that started from no
checkpoint is timed on its family's baseline architecture (latency does not depend
on the weights).  The child also counts each model's parameters, which must equal
the record's.

Writes ``<out>/frontier.json`` (every point), ``<out>/frontier.md`` (a table, the
command, the machine), ``<out>/frontier_params.png`` and ``<out>/frontier_latency.png``
(drawn with :func:`compressor.plots.series_png`), and prints the markdown.
Exit codes: 0 ok, 1 a measurement failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (the tests) rather than run
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_support import (MEASURE_ONE, OneLineParser, ScriptError, child_parser, environment, exit_on_error,
                            format_load, load_average, non_negative, positive, print_result, run_child,
                            threads_label)

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
TEACHER = "teacher"
REPORT, FINAL = "report.json", "final.pt"
#: Two runs share a teacher when their baselines' AP differ by no more than this (the same checkpoint on
#: the same split gives the same AP; another device may differ in the last digits).
AP_TOLERANCE = 1e-4
VAL_MARK = "validation AP"
SPLIT_NOTE = ("no held-out test AP in its record (a run from before the test split, or data without one): "
              "its validation AP is shown instead")


# ---------------------------------------------------------------- command line


def _pair(text: str) -> tuple[str, str]:
    label, sep, value = text.partition("=")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=VALUE")
    return label.strip(), value.strip()


def _run_pair(text: str) -> tuple[str, str]:
    label, folder = _pair(text)
    if not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=RUN_DIR, the run folder is missing")
    if label.startswith("@"):
        raise argparse.ArgumentTypeError(f"{text!r}: NAME@... needs a series name before the '@'")
    return label, folder


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(
        prog="frontier.py",
        description="Plot held-out test AP (with its interval) against parameters and CPU latency for several "
                    "compress run folders, the teacher among them.")
    parser.add_argument("--run", dest="runs", action="append", type=_run_pair, required=True, metavar="LABEL=RUN_DIR",
                        help="one point: a compress run folder; a label NAME@... (auto@150k) puts it in series NAME")
    parser.add_argument("--series", action="append", type=_pair, default=[], metavar="LABEL=NAME",
                        help="put run LABEL in series NAME (points of a series are joined by a line); an empty "
                             "NAME makes it a marker of its own")
    parser.add_argument("--timed-on", action="append", type=_pair, default=[], metavar="LABEL=CHECKPOINT",
                        help="time run LABEL on CHECKPOINT instead of its final.pt: a model of the same "
                             "architecture (e.g. its recipe run with --no-finetune) for a record whose weights "
                             "were not kept; its parameter count must equal the record's")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="the teacher's checkpoint for its latency (default: the runs' model.checkpoint as "
                             "recorded; the family's baseline when they started from none)")
    parser.add_argument("--latency-runs", type=non_negative, default=10,
                        help="timed forwards per measurement; 0 skips latency and its plot (default: 10)")
    parser.add_argument("--warmup", type=non_negative, default=5, help="untimed forwards first (default: 5)")
    parser.add_argument("--rounds", type=positive, default=3,
                        help="times every model is measured, round after round, each in a fresh process; a point "
                             "reports the median over rounds (default: 3)")
    parser.add_argument("--threads", type=positive, default=1, help="CPU threads (torch.set_num_threads; default: 1)")
    parser.add_argument("--input-size", type=positive, default=640,
                        help="square input side of the timed forwards (default: 640)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "frontier",
                        help="output folder (default: benchmarks/results/frontier)")
    return parser.parse_args(argv)


# ------------------------------------------------------- child: one measurement


def _measure_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)  # before anything creates torch's intra-op pool
    from compressor.accounting import count_parameters, measure_latency
    from compressor.checkpoint import open_model

    loaded = open_model(args.source)
    family = loaded.family
    family.check_input_size(args.size, args.size)
    example = family.example_input(args.size, args.size, batch_size=1)
    latency = measure_latency(loaded.model, example, runs=args.runs, warmup=args.warmup, threads=args.threads)
    params = count_parameters(loaded.model, family.component_of, family.components)
    return {"median_ms": latency.median_ms, "params": params.total, "family": family.name,
            "torch": torch.__version__}


def child_main(argv: list[str]) -> int:
    """Time one model in this fresh process; print the result as one JSON line."""
    args = child_parser(f"frontier.py {MEASURE_ONE}").parse_args(argv)
    return print_result(lambda: _measure_run(args))


def measure_one(source: str, args: argparse.Namespace, what: str) -> dict[str, Any]:
    """This script in ``--measure-one`` mode on ``source``; the parent blocks (and computes nothing) meanwhile."""
    return run_child(SCRIPT, [MEASURE_ONE, "--source", source, "--size", str(args.input_size),
                              "--threads", str(args.threads), "--runs", str(args.latency_runs),
                              "--warmup", str(args.warmup)], args.threads, what)


# ------------------------------------------------------------ parent: the points


@dataclass
class Point:
    label: str
    series: str | None
    folder: str            # as given on the command line
    source: str            # the run folder, resolved ("" for the teacher: every run's baseline)
    model: str             # what latency is measured on: a checkpoint, or a family name; "" for none
    family: str
    params: int
    ap: float
    low: float | None
    high: float | None
    split: str             # "test", or "validation" where the record has no test AP
    latency_ms: float | None = None
    per_round_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "series": self.series, "params": self.params,
                "test_ap": self.ap if self.split == "test" else None,
                "ap": self.ap, "low": self.low, "high": self.high, "split": self.split,
                "latency_ms": self.latency_ms, "latency_per_round_ms": self.per_round_ms,
                "family": self.family, "source": self.source or None, "folder": self.folder or None,
                "model": self.model}


def series_of(labels: list[str], explicit: list[tuple[str, str]]) -> dict[str, str | None]:
    """Each label's series: ``--series`` where given, else the text before an '@', else none."""
    series: dict[str, str | None] = {label: (label.split("@", 1)[0] if "@" in label else None) for label in labels}
    for label, name in explicit:
        if label not in series:
            raise ScriptError(f"--series {label}={name}: no --run is labelled {label!r}")
        series[label] = name or None
    return series


def timed_on_of(labels: list[str], given: list[tuple[str, str]]) -> dict[str, Path]:
    """``--timed-on`` as label -> checkpoint, each label a ``--run``'s and each checkpoint an existing file."""
    timed_on: dict[str, Path] = {}
    for label, checkpoint in given:
        if label not in labels:
            raise ScriptError(f"--timed-on {label}={checkpoint}: no --run is labelled {label!r}")
        if not Path(checkpoint).is_file():
            raise ScriptError(f"--timed-on {label}={checkpoint}: no such checkpoint")
        timed_on[label] = Path(checkpoint)
    return timed_on


def check_folder(label: str, folder: str) -> Path:
    """The run folder, checked before anything is read: it exists and has a record."""
    path = Path(folder)
    what = f"--run {label}={folder}"
    if not path.exists():
        raise ScriptError(f"{what}: no such run folder")
    if not path.is_dir():
        raise ScriptError(f"{what}: not a folder (a run folder written by compress run)")
    if not (path / REPORT).is_file():
        raise ScriptError(f"{what}: no {REPORT} (not a folder written by compress run)")
    return path.resolve()


def accuracy(metrics: dict[str, float], where: str) -> tuple[float, float | None, float | None, str]:
    """(AP, low, high, split): the held-out test AP with its interval, else the validation AP."""
    from compressor.record import INTERVAL_SUFFIXES, TEST_PREFIX

    for key, split in ((f"{TEST_PREFIX}ap", "test"), ("ap", "validation")):
        if key in metrics:
            low, high = (metrics.get(key + suffix) for suffix in INTERVAL_SUFFIXES)
            return metrics[key], low, high, split
    raise ScriptError(f"{where}: no AP in the record (a run without evaluation, or a family without an AP)")


def read_points(args: argparse.Namespace) -> tuple[Point, list[Point], list[str]]:
    """The teacher and one point per --run, from the run records; notes on what was substituted."""
    labels = [label for label, _ in args.runs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ScriptError(f"--run {duplicates[0]}=...: the label is given twice")
    if TEACHER in labels:
        raise ScriptError(f"--run {TEACHER}=...: '{TEACHER}' is the baseline's label; name the run otherwise")
    series = series_of(labels, args.series)
    folders = [check_folder(label, folder) for label, folder in args.runs]  # all of them before reading any
    timed_on = timed_on_of(labels, args.timed_on)
    if args.teacher is not None and args.latency_runs and not args.teacher.is_file():
        raise ScriptError(f"--teacher {args.teacher}: no such checkpoint")

    from compressor.record import read_record

    notes: list[str] = []
    points, teachers = [], []
    for (label, given), folder in zip(args.runs, folders):
        where = f"--run {label}={given}"
        try:
            record = read_record((folder / REPORT).read_text(encoding="utf-8"), str(folder / REPORT))
        except (OSError, UnicodeDecodeError) as err:
            raise ScriptError(f"{where}: cannot read {REPORT} ({err})") from None
        except ValueError as err:
            raise ScriptError(str(err)) from None
        if record.final is None:
            raise ScriptError(f"{where}: {REPORT} has no final model (unfinished or failed run)")
        ap, low, high, split = accuracy(record.final.metrics, where)
        weights = timed_on.get(label, folder / FINAL)
        point = Point(label, series[label], given, str(folder), str(weights) if weights.is_file() else "",
                      record.family, record.final.params.total, ap, low, high, split)
        if split != "test":
            notes.append(f"{label}: {SPLIT_NOTE}")
        if label in timed_on and args.latency_runs:
            notes.append(f"{label}: timed on {weights} (the same architecture; its weights not kept)")
        elif not point.model and args.latency_runs:
            notes.append(f"{label}: no {FINAL} in its folder (the record only, its weights not kept): not timed")
        points.append(point)
        parent = continued_run(record, args.runs, folders)
        if parent is None:
            teachers.append((where, record))
        else:
            notes.append(f"{label}: started from {parent}; its own baseline is that checkpoint, not the teacher")
    if not teachers:
        raise ScriptError("every --run started from another run's checkpoint: none of them says what the teacher is")
    teacher = teacher_point(teachers, args, notes)
    if args.latency_runs:
        check_input_size(teacher.family, args.input_size)
    return teacher, points, notes


def continued_run(record: Any, runs: list[tuple[str, str]], folders: list[Path]) -> str | None:
    """``LABEL's checkpoint NAME`` when the run started from a checkpoint inside another --run's folder
    (``compress auto --from RUN/checkpoints/...``), ``FOLDER's checkpoint NAME`` when inside some other run
    folder (one holding a report.json, e.g. a ``--no-finetune`` run): its baseline is then that run's
    model, not the teacher."""
    start = (record.recipe.get("model") or {}).get("checkpoint")
    if not start:
        return None
    start_path = Path(start).resolve()
    for (label, _), folder in zip(runs, folders):
        if start_path.is_relative_to(folder.resolve()):
            return f"{label}'s checkpoint {start_path.relative_to(folder.resolve())}"
    for folder in start_path.parents:
        if (folder / REPORT).is_file():
            return f"{folder}'s checkpoint {start_path.relative_to(folder)}"
    return None


def check_input_size(family_name: str, size: int) -> None:
    """A size the family cannot take fails here, in one line, rather than in the first measuring process."""
    from compressor.errors import CompressorError
    from compressor.plugins import load_registry

    try:
        load_registry().get_family(family_name).check_input_size(size, size)
    except CompressorError as err:
        raise ScriptError(f"--input-size {size}: {err}") from None


def teacher_point(records: list[tuple[str, Any]], args: argparse.Namespace, notes: list[str]) -> Point:
    """The teacher: every run's baseline, which must be one model (family, parameters, AP)."""
    from compressor.record import TEST_PREFIX

    test_key = f"{TEST_PREFIX}ap"
    with_test = [(w, r) for w, r in records if test_key in r.baseline.metrics]
    where, first = (with_test or records)[0]
    ap, low, high, split = accuracy(first.baseline.metrics, f"{where}: baseline")
    for other_where, other in records:
        base = other.baseline
        key = test_key if split == "test" else "ap"
        differs = (other.family != first.family or base.params.total != first.baseline.params.total
                   or (key in base.metrics and abs(base.metrics[key] - ap) > AP_TOLERANCE))
        if differs:
            def described(record: Any) -> str:
                value = record.baseline.metrics.get(key)
                shown = f"{value:.4f}" if value is not None else "not measured"
                return f"{record.family}, {record.baseline.params.total:,} parameters, {key} {shown}"

            raise ScriptError(f"the runs do not share a teacher: the baseline of {where} is {described(first)}, "
                                f"of {other_where} {described(other)}")
    if split != "test":
        notes.append(f"{TEACHER}: {SPLIT_NOTE}")
    model, note = teacher_model(first, args)
    if note:
        notes.append(f"{TEACHER}: {note}")
    return Point(TEACHER, None, "", "", model, first.family, first.baseline.params.total, ap, low, high, split)


def teacher_model(record: Any, args: argparse.Namespace) -> tuple[str, str | None]:
    """What the teacher's latency is measured on, and a note when that is not its checkpoint as recorded."""
    if args.teacher is not None:
        return str(args.teacher.resolve()), None
    recorded = (record.recipe.get("model") or {}).get("checkpoint")
    if recorded is None:
        return record.family, (f"the runs started from no checkpoint: latency of the {record.family} family's "
                               "baseline architecture (latency does not depend on the weights)")
    path = Path(recorded)
    if not path.is_absolute():  # records hold the recipe's paths resolved; an older one may not
        path = Path.cwd() / path
    if args.latency_runs and not path.is_file():
        raise ScriptError(f"the teacher's checkpoint {recorded} (model.checkpoint in the runs' recipe) does not "
                            "exist: give it with --teacher PATH, or skip latency with --latency-runs 0")
    return str(path), None


def measure(points: list[Point], args: argparse.Namespace) -> str | None:
    """Every point's latency, in rounds, each measurement in a fresh process; returns the children's torch version."""
    torch_version = None
    for round_index in range(1, args.rounds + 1):
        print(f"round {round_index}/{args.rounds} (each model in a fresh process):", file=sys.stderr)
        for point in (p for p in points if p.model):
            what = f"{point.label} ({point.model})"
            result = measure_one(point.model, args, what)
            if result["params"] != point.params:
                raise ScriptError(f"{what}: {result['params']:,} parameters, but its run record says "
                                    f"{point.params:,}")
            point.per_round_ms.append(result["median_ms"])
            torch_version = result["torch"]
            print(f"  {point.label}: {result['median_ms']:.1f} ms", file=sys.stderr)
    for point in points:
        point.latency_ms = statistics.median(point.per_round_ms) if point.per_round_ms else None
    return torch_version


# ------------------------------------------------------------------ outputs


def _plot_series(teacher: Point, points: list[Point], x_of: Any) -> list[Any]:
    """The teacher's marker, a joined line per series (sorted by x, its points labelled), a marker per other run."""
    from compressor.plots import Series

    def interval(p: Point) -> tuple[float, float]:
        return (p.low if p.low is not None else p.ap, p.high if p.high is not None else p.ap)

    def name(p: Point) -> str:  # the point's label, marked where its AP is the validation AP
        return p.label if p.split == "test" else f"{p.label} ({VAL_MARK})"

    out = [Series(name(teacher), [(x_of(teacher), teacher.ap)], [interval(teacher)], joined=False)]
    for series in dict.fromkeys(p.series for p in points if p.series is not None):
        members = sorted((p for p in points if p.series == series), key=x_of)
        out.append(Series(series, [(x_of(p), p.ap) for p in members], [interval(p) for p in members],
                          joined=True, labels=[name(p) for p in members]))
    for p in points:
        if p.series is None:
            out.append(Series(name(p), [(x_of(p), p.ap)], [interval(p)], joined=False))
    return out


def draw(teacher: Point, points: list[Point], args: argparse.Namespace, out: Path) -> list[str]:
    """The two PNGs (the latency one only when measured); returns their file names."""
    from compressor import plots

    every = [teacher, *points]
    split = ("held-out test AP" if all(p.split == "test" for p in every)
             else f"test AP ({VAL_MARK} where marked)")
    y_label = f"{split}, error bars: its interval"
    families = ", ".join(dict.fromkeys(p.family for p in every))
    files = []
    png = plots.series_png(_plot_series(teacher, points, lambda p: p.params),
                           title=f"{families}: {split} against parameters",
                           x_label="parameters", y_label=y_label)
    (out / "frontier_params.png").write_bytes(png)
    files.append("frontier_params.png")
    if args.latency_runs:
        png = plots.series_png(_plot_series(teacher, [p for p in points if p.latency_ms is not None],
                                            lambda p: p.latency_ms),
                               title=f"{families}: {split} against CPU latency",
                               x_label=f"CPU latency, ms per image ({_setting(args)})", y_label=y_label,
                               x_format=plots.format_number)
        (out / "frontier_latency.png").write_bytes(png)
        files.append("frontier_latency.png")
    return files


def _setting(args: argparse.Namespace) -> str:
    return f"PyTorch eager, batch 1, {args.input_size}×{args.input_size}, {threads_label(args.threads)}"


def _ap_cell(p: Point) -> str:
    interval = f" [{p.low:.4f}, {p.high:.4f}]" if p.low is not None and p.high is not None else " (no interval)"
    mark = " (validation ¹)" if p.split != "test" else ""
    return f"{p.ap:.4f}{interval}{mark}"


def markdown(report: dict[str, Any], teacher: Point, points: list[Point], args: argparse.Namespace,
             files: list[str]) -> str:
    env = report["environment"]
    latency = f"CPU ms ({_setting(args)})" if args.latency_runs else None
    header = ["model", "series", "parameters", "test AP [interval]"] + ([latency] if latency else []) + ["run folder"]
    lines = ["# The frontier: held-out test AP against parameters and CPU latency", "",
             f"Command: `{env['command']}`", "",
             f"Machine: {env['cpu_model']}, {env['usable_cores']} usable core(s), torch {env['torch']}, "
             f"Python {env['python']}, {env['date']}; load average at start "
             f"{format_load(env['load_average_at_start'])}, at end {format_load(env['load_average_at_end'])}.", ""]
    if args.latency_runs:
        lines += [f"Latency: {_setting(args)}; each model timed in a fresh process ({args.warmup} warm-up and "
                  f"{args.latency_runs} timed forwards, `compressor.accounting.measure_latency`), {args.rounds} "
                  "round(s) with the models alternating; each figure is the median over rounds of the processes' "
                  "medians (every round is in frontier.json).", ""]
    else:
        lines += ["Latency: not measured (--latency-runs 0).", ""]
    lines += ["| " + " | ".join(header) + " |",
              "| --- | --- | ---: | ---: |" + (" ---: |" if latency else "") + " --- |"]
    ordered = [teacher, *sorted(points, key=lambda p: -p.params)]
    for p in ordered:
        cells = [p.label, p.series or "—", f"{p.params:,}", _ap_cell(p)]
        if latency:
            cells.append(f"{p.latency_ms:.1f}" if p.latency_ms is not None else "not timed")
        if p.folder:
            cells.append(f"`{p.folder}`")
        else:
            cells.append("the baseline of every run" + (f" (timed: `{p.model}`)" if latency else ""))
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "AP at IoU 0.5 of the final model on the family's held-out test split (`test_ap` in each "
              "run's report.json, measured once per run, never used for tuning), with the interval the record "
              "gives (`test_ap_low`..`test_ap_high`: for the face families a 95% percentile bootstrap over test "
              "images). Parameters: the record's `final.params.total` (each tensor counted once)."]
    if any(p.split != "test" for p in ordered):
        lines += ["", f"¹ {SPLIT_NOTE}."]
    if report["notes"]:
        lines += [""] + [f"- {note}" for note in report["notes"]]
    lines += [""] + [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})" for name in files]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def collect(args: argparse.Namespace, argv: list[str]) -> tuple[dict[str, Any], Point, list[Point]]:
    started, load = datetime.now(timezone.utc), load_average()
    teacher, points, notes = read_points(args)  # every input checked before anything is measured
    torch_version = measure([teacher, *points], args) if args.latency_runs else None
    if torch_version is None:
        import torch  # already imported by compressor.record

        torch_version = torch.__version__
    report = {
        "settings": {"latency_runs": args.latency_runs, "warmup": args.warmup, "rounds": args.rounds,
                     "threads": args.threads, "input_size": [args.input_size, args.input_size], "batch_size": 1,
                     "runtime": "PyTorch eager"},
        "points": [teacher.to_dict(), *(p.to_dict() for p in points)],
        "notes": notes,
        "environment": environment({"torch": torch_version}, SCRIPT, argv, started, load),
    }
    return report, teacher, points


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [MEASURE_ONE]:
        return child_main(argv[1:])
    args = parse_args(argv)
    return exit_on_error(lambda: frontier(args, argv))


def frontier(args: argparse.Namespace, argv: list[str]) -> int:
    """Read, measure, draw, write the outputs and print the markdown; ``main`` turns a ScriptError into one line."""
    report, teacher, points = collect(args, argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        files = draw(teacher, points, args, args.out)
        document = markdown(report, teacher, points, args, files)
        report["files"] = files
        (args.out / "frontier.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "frontier.md").write_text(document)
    except OSError as err:
        raise ScriptError(f"--out {args.out}: cannot write ({err.strerror or err})") from None
    print(document, end="")
    print(f"wrote {', '.join(str(args.out / name) for name in ['frontier.json', 'frontier.md', *files])}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
