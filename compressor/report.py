"""The run report: ``report.json`` (the record), ``report.md`` (for people) and two PNG plots.

Everything here renders a :class:`~compressor.record.RunRecord`; nothing is
computed that the record does not hold or derive (the budget verdict is
``RunRecord.budget_verdict``).  ``write_report`` is called after every stage,
so it is cheap, and every file goes through :mod:`compressor.atomic`: a crash
at any moment leaves each file whole, old or new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import plots
from .atomic import atomic_write_bytes, atomic_write_text
from .record import INTERVAL_SUFFIXES, TEST_PREFIX, BudgetVerdict, Measured, RunRecord, StageRecord

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
COMPONENTS_PNG = "params_by_component.png"
ACCURACY_PNG = "params_vs_accuracy.png"

DASH = "—"


def write_report(run_dir: Path, record: RunRecord) -> None:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` under ``run_dir``, each atomically."""
    run_dir = Path(run_dir)
    # Render everything before touching any file, so a failure leaves the old files.
    text = record.model_dump_json(indent=2, by_alias=True) + "\n"
    markdown = render_markdown(record)
    components = plot_params_by_component(record)
    accuracy = plot_params_vs_accuracy(record)
    atomic_write_text(run_dir / REPORT_JSON, text)
    atomic_write_text(run_dir / REPORT_MD, markdown)
    atomic_write_bytes(run_dir / PLOTS_DIR / COMPONENTS_PNG, lambda handle: handle.write(components))
    atomic_write_bytes(run_dir / PLOTS_DIR / ACCURACY_PNG, lambda handle: handle.write(accuracy.png))


# ------------------------------------------------------------------ the measured points


@dataclass(frozen=True)
class Step:
    """One measured point of the run: the baseline, a completed stage, or the final model."""

    label: str          # "baseline", "1 attention", "final"
    kind: str           # "baseline" | "stage" | "final"
    measured: Measured
    output_drift: float | None = None


def steps(record: RunRecord, include_final: bool = True) -> list[Step]:
    """Baseline, each completed stage, and the final model (if any), in run order."""
    out = [Step("baseline", "baseline", record.baseline)]
    for index, stage in record.completed:
        out.append(Step(f"{index} {stage.name}", "stage", stage.measured, stage.output_drift))  # type: ignore[arg-type]
    if include_final and record.final is not None:
        out.append(Step("final", "final", record.final))
    return out


def metric_names(record: RunRecord) -> list[str]:
    """Every validation metric in the record, the headline metric first.

    Not the test split's (``test_``; their own section) nor a metric's interval bounds
    (shown beside the metric, see :func:`_metric_cell`).
    """
    names: dict[str, None] = {record.metric: None} if record.metric else {}
    for step in steps(record):
        names.update((name, None) for name in step.measured.metrics)
    return [n for n in names if any(n in s.measured.metrics for s in steps(record))
            and not n.startswith(TEST_PREFIX) and not _is_bound(n, names)]


def _is_bound(name: str, names: dict[str, None] | list[str]) -> bool:
    return any(name.endswith(suffix) and name[: -len(suffix)] in names for suffix in INTERVAL_SUFFIXES)


def _component_order(all_steps: list[Step]) -> list[str]:
    order: dict[str, None] = {}
    for step in all_steps:
        order.update((name, None) for name in step.measured.params.components)
    return list(order)


# ------------------------------------------------------------------ plots


@dataclass(frozen=True)
class AccuracyPlot:
    png: bytes
    title: str
    metric: str | None      # None: no accuracy measured, output drift is plotted instead

    @property
    def is_drift(self) -> bool:
        return self.metric is None


def plot_params_by_component(record: RunRecord) -> bytes:
    """Stacked bars of parameters per component: the baseline and each completed stage."""
    measured = steps(record, include_final=False)
    components = _component_order(measured)
    segments = {name: [float(s.measured.params.components.get(name, 0)) for s in measured] for name in components}
    return plots.bar_chart_png(
        [s.label for s in measured], segments,
        title="Parameters by component, baseline and each completed stage", y_label="parameters",
    )


def plot_params_vs_accuracy(record: RunRecord) -> AccuracyPlot:
    """Parameters against the headline metric along the run (against output drift when it was not measured)."""
    metric = record.metric if record.metric and any(
        record.metric in s.measured.metrics for s in steps(record)) else None
    points = []
    for step in steps(record):
        if metric is not None:
            y = step.measured.metrics.get(metric)
        elif step.kind == "final":
            continue    # drift is measured per stage, not for the final model
        else:
            y = 0.0 if step.kind == "baseline" else step.output_drift
        if y is not None:
            points.append((float(step.measured.params.total), float(y), step.label))
    if metric is not None:
        title, y_label = f"Parameters vs accuracy ({metric}) along the run", metric
    else:
        title, y_label = "Parameters vs output drift (no accuracy metric in the report)", "output drift vs previous stage"
    png = plots.line_chart_png(points, title=title, x_label="parameters", y_label=y_label)
    return AccuracyPlot(png, title, metric)


# ------------------------------------------------------------------ cell formats


def _int(value: float | None) -> str:
    return f"{int(value):,}" if value is not None else DASH


def format_macs(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value / 1e9:.3f} G" if abs(value) >= 1e9 else f"{value / 1e6:.1f} M"


def _drift(value: float | None) -> str:
    return f"{value:.2e}" if value is not None else DASH


def _metric(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def _metric_cell(metrics: dict[str, float], name: str) -> str:
    """``0.7213 [0.6950, 0.7470]``: the value, and its interval when the family measured one."""
    low, high = (metrics.get(name + suffix) for suffix in INTERVAL_SUFFIXES)
    interval = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
    return _metric(metrics.get(name)) + interval


def _seconds(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else DASH


def _change(new: float | None, old: float | None) -> str:
    if new is None or old is None:
        return DASH
    percent = f" ({(new - old) / old * 100:+.1f}%)" if old else ""
    return f"{int(new - old):+,}{percent}"


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _table(header: list[str], rows: list[list[object]], right: set[int] = frozenset()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    return [_row(header), "| " + " | ".join(align) + " |", *(_row(r) for r in rows), ""]


# ------------------------------------------------------------------ markdown sections


def render_markdown(record: RunRecord) -> str:
    """The report for people: summary, stages, notes, components, budget, plots."""
    metrics = metric_names(record)
    sections: list[Callable[[], list[str]]] = [
        lambda: _summary(record),
        lambda: _stages_table(record, metrics),
        lambda: _test_section(record),
        lambda: _notes(record),
        lambda: _components_table(record),
        lambda: _budget_section(record),
        lambda: _deployed_section(record),
        _plots_section,
    ]
    lines = ["# Compression report", ""]
    for section in sections:
        lines += section()
    return "\n".join(lines)


def _summary(record: RunRecord) -> list[str]:
    model = record.recipe.get("model") or {}
    source = record.family + (f" from `{model['checkpoint']}`" if model.get("checkpoint") else "")
    size = record.recipe.get("input_size")
    done = len(record.completed)
    failed = any(s.status == "failed" for s in record.stages)
    state = "finished" if record.final is not None else ("failed" if failed else "in progress")
    lines = [f"- model: {source}"]
    if size:
        lines.append(f"- input size: {'x'.join(str(s) for s in size)}")
    mode = "finetuned and evaluated" if record.mode.finetune else "structural only (--no-finetune)"
    lines.append(f"- run: {state}, {done} of {len(record.stages)} stages done; {mode}, on {record.mode.device}")
    lines += _data_lines(record)
    base = record.baseline.params.total
    label, latest = record.latest()
    if label != "baseline":
        where = "final model" if label == "final" else f"after stage {label}"
        lines.append(f"- parameters: {base:,} → {latest.params.total:,}, {_change(latest.params.total, base)} "
                     f"vs baseline ({where})")
    else:
        lines.append(f"- parameters: {base:,} (baseline)")
    return [*lines, ""]


def _data_lines(record: RunRecord) -> list[str]:
    """Where finetuning learned from and what the metric is measured on."""
    root = (record.recipe.get("data") or {}).get("root")
    labelled = f"labelled data at `{root}`" if root else "the family's default data"
    images = record.data.images
    lines = [f"- finetuning data: {images}, distillation only (no labels, the task loss is skipped)" if images
             else f"- finetuning data: {labelled}"]
    if record.metric:
        eval_images = record.data.eval_images
        measured = (f"agreement with the starting model on {eval_images}" if eval_images
                    else f"on the validation split of {labelled}")
        lines.append(f"- metric: {record.metric}, {measured}")
    return lines


def _teacher(name: str | None) -> str:
    if name in ("previous", "baseline"):
        return f"from the {name} model"
    return "without a teacher" if name in ("none", None) else f"from teacher `{name}`"


def _stage_row(index: int, stage: StageRecord, previous: int, metrics: list[str]) -> list[object]:
    pass_name = stage.pass_name + (f" ×{stage.repeats}" if stage.repeats and stage.repeats > 1 else "")
    total = stage.params.total if stage.params else None
    return [
        str(index), stage.name, pass_name, f"**{stage.status}**" if stage.status == "failed" else stage.status,
        _int(total), _change(total, previous), format_macs(stage.macs), _drift(stage.output_drift),
        *(_metric_cell(stage.metrics, m) for m in metrics), _seconds(stage.seconds),
    ]


def _stages_table(record: RunRecord, metrics: list[str]) -> list[str]:
    header = ["#", "stage", "pass", "status", "params", "change vs previous", "MACs", "output drift",
              *metrics, "seconds"]
    base = record.baseline
    rows = [["0", "baseline", DASH, DASH, _int(base.params.total), DASH, format_macs(base.macs), DASH,
             *(_metric_cell(base.metrics, m) for m in metrics), DASH]]
    previous = base.params.total
    for index, stage in enumerate(record.stages, start=1):
        rows.append(_stage_row(index, stage, previous, metrics))
        if stage.status == "ok" and stage.params is not None:
            previous = stage.params.total
    if record.final is not None:
        final = record.final
        seconds = sum(s.seconds or 0.0 for s in record.stages)
        rows.append([DASH, "**final**", DASH, DASH, _int(final.params.total),
                     _change(final.params.total, base.params.total) + " vs baseline", format_macs(final.macs), DASH,
                     *(_metric_cell(final.metrics, m) for m in metrics), _seconds(seconds)])
    right = {0, 4, 5, 6, 7, *range(8, 9 + len(metrics))}
    return ["## Stages", "", *_table(header, rows, right)]


def _notes(record: RunRecord) -> list[str]:
    notes = []
    for index, stage in enumerate(record.stages, start=1):
        parts = [stage.message] if stage.message else []
        finetune = stage.finetune
        if finetune is not None and finetune.skipped:
            parts.append(f"finetune skipped ({finetune.skipped})")
        elif finetune is not None:
            losses = f", loss {_metric(finetune.first_loss)} → {_metric(finetune.last_loss)}"
            labels = ", distillation only (labels: none)" if finetune.labels == "none" else ""
            parts.append(f"finetune: {finetune.steps} steps {_teacher(finetune.teacher)}{labels}{losses}, "
                         f"{finetune.seconds:.1f}s")
        if stage.pass_record:
            parts.append(f"pass: {_brief(stage.pass_record)}")
        if parts:
            notes.append(f"- {index} {stage.name}: " + "; ".join(parts))
    return ["Notes:", "", *notes, ""] if notes else []


def _brief(value: object, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _components_table(record: RunRecord) -> list[str]:
    measured = steps(record)
    components = _component_order(measured)
    header = ["component", *(s.label for s in measured)]
    rows: list[list[object]] = [[name, *(_int(s.measured.params.components.get(name)) for s in measured)]
                                for name in components]
    rows.append(["**total**", *(f"**{_int(s.measured.params.total)}**" for s in measured)])
    return ["## Parameters by component", "", *_table(header, rows, set(range(1, len(header))))]


def _budget_section(record: RunRecord) -> list[str]:
    verdict = record.budget_verdict()
    if not verdict.verdicts:
        return []
    lines = ["## Budget", ""]
    unfinished = verdict.against != "final"
    if unfinished:
        lines += [f"The run has not finished: checked against {verdict.against}.", ""]
    lines += [_headline(verdict, " so far" if unfinished else ""), ""]
    rows = []
    for v in verdict.verdicts:
        fmt = format_macs if v.what == "macs" else (_metric if v.what.startswith("accuracy drop") else _int)
        headroom = fmt(v.limit - v.value) if v.value is not None else DASH
        shown = {"pass": "pass", "fail": "**FAIL**"}.get(v.status, f"not checked ({v.why})")
        rows.append([v.what, fmt(v.limit), fmt(v.value), headroom, shown])
    return lines + _table(["limit", "budget", verdict.against, "headroom", "verdict"], rows, {1, 2, 3})


def _headline(verdict: BudgetVerdict, so_far: str) -> str:
    count = len(verdict.verdicts)
    if verdict.failed:
        names = ", ".join(v.what for v in verdict.failed)
        return f"**Budget: FAIL{so_far}** — {len(verdict.failed)} of {count} limits exceeded ({names})"
    if verdict.unchecked:
        names = ", ".join(v.what for v in verdict.unchecked)
        return (f"**Budget: NOT FULLY CHECKED{so_far}** — {count - len(verdict.unchecked)} of {count} limits met, "
                f"{len(verdict.unchecked)} not checked ({names})")
    return f"**Budget: PASS{so_far}** — all {count} limits met"


def _test_section(record: RunRecord) -> list[str]:
    """The held-out test split: the baseline's and the final model's metrics, and the change."""
    rows = [(label, measured) for label, measured in (("baseline", record.baseline), ("final", record.final))
            if measured is not None and any(k.startswith(TEST_PREFIX) for k in measured.metrics)]
    if not rows:
        return []
    names = [k for k in rows[0][1].metrics if k.startswith(TEST_PREFIX)]
    names = [k for k in names if not _is_bound(k, names) and not k.endswith("_drop")]
    table = [[label, _int(measured.params.total), *(_metric_cell(measured.metrics, k) for k in names)]
             for label, measured in rows]
    lines = ["## Held-out test split", "",
             "Measured on the baseline and the final model only; stages and recipes are tuned on the "
             "validation split. Brackets: the 95% bootstrap interval over images.", "",
             *_table(["model", "params", *names], table, set(range(1, 2 + len(names))))]
    drop = f"{TEST_PREFIX}{record.metric}_drop"
    if record.final is not None and drop in record.final.metrics:
        paired = f"{drop}_low" in record.final.metrics
        how = ("; brackets: its 95% paired bootstrap interval, both models scored on each resample of the images"
               if paired else "")
        lines += [f"Drop in {TEST_PREFIX}{record.metric}: {_metric_cell(record.final.metrics, drop)} "
                  f"(baseline minus final{how}).", ""]
    return lines


def _deployed_section(record: RunRecord) -> list[str]:
    """The recipe's ``export``: each artifact's file, size, check and metrics, beside the final model's."""
    deployed = record.deployed
    if deployed is None:
        return []
    metrics = metric_names(record)
    final = record.final.metrics if record.final is not None else {}
    onnx, int8 = deployed.onnx, deployed.int8
    size = "dynamic" if onnx.dynamic else "x".join(map(str, onnx.input_size))
    rows = [["PyTorch (final.pt)", DASH, DASH, *(_metric_cell(final, m) for m in metrics)],
            [f"ONNX float32 ({Path(onnx.path).name})", f"{onnx.bytes:,}",
             f"max |ONNX Runtime - PyTorch| {max(onnx.max_abs_diff.values(), default=0.0):.2e}",
             *(_metric_cell(deployed.metrics.get("onnx", {}), m) for m in metrics)]]
    if int8 is not None:
        rows.append([f"ONNX int8 ({Path(int8.path).name})", f"{int8.bytes:,}",
                     f"{int8.quantized_convs} convs int8, {int8.float_convs} float (< {int8.float_below_channels} "
                     f"channels); calibrated on {int8.calibration_images} images",
                     *(_metric_cell(deployed.metrics.get("int8", {}), m) for m in metrics)])
    header = ["artifact", "bytes", "check", *metrics]
    return ["## Deployed", "", f"Exported at opset {onnx.opset}, input {size}, in {deployed.seconds:.0f} s.", "",
            *_table(header, rows, {1, *range(3, len(header))})]


def _plots_section() -> list[str]:
    return ["## Plots", "", f"![Parameters by component]({PLOTS_DIR}/{COMPONENTS_PNG})", "",
            f"![Parameters vs accuracy]({PLOTS_DIR}/{ACCURACY_PNG})", ""]
