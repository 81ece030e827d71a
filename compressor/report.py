"""The run report: ``report.json`` (the record), ``report.md`` (for people) and two PNG plots.

``write_report`` is called after every stage, so it is cheap, and every file it
writes goes through :mod:`compressor.atomic`: a crash at any moment leaves each
file whole, old or new.

The report dict (built by the runner)::

    {"recipe": {...}, "baseline": {"params": {"total", "components"}, "macs", "metrics"},
     "stages": [{"name", "pass", "status", "params", "macs", "output_drift", "metrics",
                 "seconds", "finetune", "message", "repeats"}, ...],
     "final": {"params", "macs", "metrics"} | None}

Stages not run yet are absent or ``"pending"`` without numbers; any extra keys
are kept in the JSON as given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import plots
from .atomic import atomic_write_bytes, atomic_write_text

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
COMPONENTS_PNG = "params_by_component.png"
ACCURACY_PNG = "params_vs_accuracy.png"

#: The accuracy metric preferred for the plot and the budget's ``max_accuracy_drop``.
PREFERRED_METRIC = "ap"

DASH = "—"


# ------------------------------------------------------------------ writing


def write_report(run_dir: Path, report: dict) -> None:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` under ``run_dir``, each atomically."""
    run_dir = Path(run_dir)
    text = json.dumps(report, indent=2, default=_jsonable) + "\n"  # serialise before touching any file
    atomic_write_text(run_dir / REPORT_JSON, text)
    atomic_write_text(run_dir / REPORT_MD, render_markdown(report))
    components = plot_params_by_component(report)
    accuracy = plot_params_vs_accuracy(report)
    atomic_write_bytes(run_dir / PLOTS_DIR / COMPONENTS_PNG, lambda handle: handle.write(components))
    atomic_write_bytes(run_dir / PLOTS_DIR / ACCURACY_PNG, lambda handle: handle.write(accuracy.png))


def _jsonable(value: Any) -> Any:
    """Numpy/torch scalars as numbers, paths and anything else as strings."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# ------------------------------------------------------------------ reading the report


@dataclass(frozen=True)
class Step:
    """One measured point of the run: the baseline, a stage, or the final model."""

    label: str          # "baseline", "1 attention", "final"
    name: str           # "baseline", the stage name, "final"
    kind: str           # "baseline" | "stage" | "final"
    data: dict

    @property
    def total(self) -> int | None:
        params = self.data.get("params")
        return params.get("total") if isinstance(params, dict) else None

    @property
    def components(self) -> dict[str, int]:
        params = self.data.get("params")
        comps = params.get("components") if isinstance(params, dict) else None
        return comps if isinstance(comps, dict) else {}

    @property
    def metrics(self) -> dict[str, float]:
        metrics = self.data.get("metrics")
        return metrics if isinstance(metrics, dict) else {}


def _stages(report: dict) -> list[dict]:
    """The stages as run so far, followed by the recipe's stages not in the report yet (as pending)."""
    stages = [s for s in report.get("stages") or [] if isinstance(s, dict)]
    recipe_stages = (report.get("recipe") or {}).get("stages") or []
    for entry in recipe_stages[len(stages):]:
        if isinstance(entry, dict):
            pass_name = entry.get("pass") or entry.get("pass_name") or "?"
            stages.append({"name": entry.get("name") or pass_name, "pass": pass_name, "status": "pending"})
    return stages


def _measured(stage: dict) -> bool:
    return stage.get("status") == "ok" and isinstance(stage.get("params"), dict)


def steps(report: dict, include_final: bool = True) -> list[Step]:
    """Baseline, each completed stage, and the final model (if any), in run order."""
    out = []
    baseline = report.get("baseline")
    if isinstance(baseline, dict) and isinstance(baseline.get("params"), dict):
        out.append(Step("baseline", "baseline", "baseline", baseline))
    for index, stage in enumerate(_stages(report), start=1):
        if _measured(stage):
            name = str(stage.get("name") or stage.get("pass") or index)
            out.append(Step(f"{index} {name}", name, "stage", stage))
    final = report.get("final")
    if include_final and isinstance(final, dict) and isinstance(final.get("params"), dict):
        out.append(Step("final", "final", "final", final))
    return out


def metric_names(report: dict) -> list[str]:
    """Every metric in the report, in the order first seen."""
    names: dict[str, None] = {}
    for source in [report.get("baseline"), *_stages(report), report.get("final")]:
        if isinstance(source, dict) and isinstance(source.get("metrics"), dict):
            names.update((name, None) for name in source["metrics"])
    return list(names)


def accuracy_metric(report: dict) -> str | None:
    """``"ap"`` when the report has it, else the first metric it has, else None."""
    names = metric_names(report)
    if PREFERRED_METRIC in names:
        return PREFERRED_METRIC
    return names[0] if names else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _component_order(all_steps: list[Step]) -> list[str]:
    order: dict[str, None] = {}
    for step in all_steps:
        order.update((name, None) for name in step.components)
    return list(order)


# ------------------------------------------------------------------ plots


@dataclass(frozen=True)
class AccuracyPlot:
    png: bytes
    title: str
    metric: str | None      # None: no accuracy metric in the report, output drift is plotted instead

    @property
    def is_drift(self) -> bool:
        return self.metric is None


def plot_params_by_component(report: dict) -> bytes:
    """Stacked bars of parameters per component: the baseline and each completed stage."""
    measured = steps(report, include_final=False)
    components = _component_order(measured)
    segments = {name: [float(s.components.get(name, 0) or 0) for s in measured] for name in components}
    return plots.bar_chart_png(
        [s.label for s in measured], segments,
        title="Parameters by component, baseline and each completed stage", y_label="parameters",
    )


def plot_params_vs_accuracy(report: dict) -> AccuracyPlot:
    """Parameters against the accuracy metric along the run (against output drift when there is no metric)."""
    metric = accuracy_metric(report)
    points = []
    for step in steps(report):
        if step.total is None:
            continue
        if metric is not None:
            y = _number(step.metrics.get(metric))
        elif step.kind == "baseline":
            y = 0.0
        elif step.kind == "final":
            continue    # drift is measured per stage, not for the final model
        else:
            y = _number(step.data.get("output_drift"))
        if y is not None:
            points.append((float(step.total), y, step.label))
    if metric is not None:
        title = f"Parameters vs accuracy ({metric}) along the run"
        y_label = metric
    else:
        title = "Parameters vs output drift (no accuracy metric in the report)"
        y_label = "output drift vs previous stage"
    png = plots.line_chart_png(points, title=title, x_label="parameters", y_label=y_label)
    return AccuracyPlot(png, title, metric)


# ------------------------------------------------------------------ markdown


def _int(value: Any) -> str:
    number = _number(value)
    return f"{int(number):,}" if number is not None else DASH


def format_macs(value: Any) -> str:
    number = _number(value)
    if number is None:
        return DASH
    if abs(number) >= 1e9:
        return f"{number / 1e9:.3f} G"
    return f"{number / 1e6:.1f} M"


def _drift(value: Any) -> str:
    number = _number(value)
    return f"{number:.2e}" if number is not None else DASH


def _metric(value: Any) -> str:
    number = _number(value)
    if number is None:
        return DASH
    return f"{number:.4f}" if abs(number) < 1000 else f"{number:,.1f}"


def _seconds(value: Any) -> str:
    number = _number(value)
    return f"{number:.1f}" if number is not None else DASH


def _change(value: Any, previous: Any) -> str:
    new, old = _number(value), _number(previous)
    if new is None or old is None:
        return DASH
    delta = int(new - old)
    percent = f" ({(new - old) / old * 100:+.1f}%)" if old else ""
    return f"{delta:+,}{percent}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]], right: set[int] = frozenset()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    return [_row(header), "| " + " | ".join(align) + " |", *(_row(r) for r in rows)]


def render_markdown(report: dict) -> str:
    """The report for people: summary, stages, components, budget, plots."""
    recipe = report.get("recipe") or {}
    baseline = report.get("baseline") or {}
    final = report.get("final") if isinstance(report.get("final"), dict) else None
    stages = _stages(report)
    metrics = metric_names(report)
    all_steps = steps(report)

    lines = ["# Compression report", ""]
    model = recipe.get("model")
    if isinstance(model, dict):
        source = model.get("family") or "?"
        if model.get("checkpoint"):
            source += f" from `{model['checkpoint']}`"
        lines.append(f"- model: {source}")
    if recipe.get("input_size"):
        size = recipe["input_size"]
        lines.append(f"- input size: {'x'.join(str(s) for s in size) if isinstance(size, (list, tuple)) else size}")
    done = sum(1 for s in stages if s.get("status") == "ok")
    failed = [s for s in stages if s.get("status") == "failed"]
    state = "finished" if final is not None else ("failed" if failed else "in progress")
    lines.append(f"- run: {state}, {done} of {len(stages)} stages done")
    base_total = Step("baseline", "baseline", "baseline", baseline).total
    last = all_steps[-1] if all_steps else None
    if base_total is not None and last is not None and last.kind != "baseline":
        lines.append(
            f"- parameters: {base_total:,} → {last.total:,}, {_change(last.total, base_total)} vs baseline "
            f"({'final model' if last.kind == 'final' else 'after stage ' + last.label})"
        )
    elif base_total is not None:
        lines.append(f"- parameters: {base_total:,} (baseline)")
    lines.append("")

    # stages
    lines += ["## Stages", ""]
    header = ["#", "stage", "pass", "status", "params", "change vs previous", "MACs", "output drift",
              *metrics, "seconds"]
    rows = []
    previous = base_total
    if baseline:
        rows.append(["0", "baseline", DASH, DASH, _int(base_total), DASH, format_macs(baseline.get("macs")), DASH,
                     *(_metric((baseline.get("metrics") or {}).get(m)) for m in metrics), DASH])
    for index, stage in enumerate(stages, start=1):
        status = str(stage.get("status") or "?")
        params = stage.get("params") if isinstance(stage.get("params"), dict) else {}
        total = params.get("total")
        pass_name = str(stage.get("pass") or "?")
        repeats = stage.get("repeats")
        if isinstance(repeats, int) and repeats > 1:
            pass_name += f" ×{repeats}"
        stage_metrics = stage.get("metrics") if isinstance(stage.get("metrics"), dict) else {}
        rows.append([
            str(index), stage.get("name") or pass_name, pass_name,
            f"**{status}**" if status == "failed" else status,
            _int(total), _change(total, previous) if total is not None else DASH,
            format_macs(stage.get("macs")), _drift(stage.get("output_drift")),
            *(_metric(stage_metrics.get(m)) for m in metrics), _seconds(stage.get("seconds")),
        ])
        if status == "ok" and total is not None:
            previous = total
    if final is not None:
        total_seconds = sum(_number(s.get("seconds")) or 0.0 for s in stages)
        final_params = final.get("params") if isinstance(final.get("params"), dict) else {}
        rows.append([
            DASH, "**final**", DASH, DASH, _int(final_params.get("total")),
            _change(final_params.get("total"), base_total) + " vs baseline" if base_total else DASH,
            format_macs(final.get("macs")), DASH,
            *(_metric((final.get("metrics") or {}).get(m)) for m in metrics), _seconds(total_seconds),
        ])
    right = {0, 4, 5, 6, 7, *range(8, 8 + len(metrics)), 8 + len(metrics)}
    lines += _table(header, rows, right)
    lines.append("")
    lines += _notes(stages)

    # components
    measured = steps(report)
    components = _component_order(measured)
    if components:
        lines += ["## Parameters by component", ""]
        header = ["component", *(s.label for s in measured)]
        rows = [[name, *(_int(s.components.get(name)) for s in measured)] for name in components]
        rows.append(["**total**", *(f"**{_int(s.total)}**" for s in measured)])
        lines += _table(header, rows, set(range(1, len(header))))
        lines.append("")

    lines += _budget_section(report, metrics)

    lines += [
        "## Plots", "",
        f"![Parameters by component]({PLOTS_DIR}/{COMPONENTS_PNG})", "",
        f"![Parameters vs accuracy]({PLOTS_DIR}/{ACCURACY_PNG})", "",
    ]
    return "\n".join(lines)


def _notes(stages: list[dict]) -> list[str]:
    notes = []
    for index, stage in enumerate(stages, start=1):
        parts = []
        if stage.get("message"):
            parts.append(str(stage["message"]))
        finetune = stage.get("finetune")
        if isinstance(finetune, str) and finetune:
            parts.append(f"finetune {finetune}")
        elif isinstance(finetune, dict) and finetune:
            summary = ", ".join(
                f"{k}={_metric(v) if isinstance(v, float) else v}" for k, v in finetune.items()
                if isinstance(v, (int, float, str, bool))
            )
            parts.append(f"finetune: {summary}" if summary else "finetuned")
        if parts:
            notes.append(f"- {index} {stage.get('name') or stage.get('pass')}: " + "; ".join(parts))
    return ["Notes:", "", *notes, ""] if notes else []


# ------------------------------------------------------------------ budget


@dataclass(frozen=True)
class Verdict:
    what: str
    limit: float
    value: float | None
    ok: bool | None      # None: cannot tell (not measured, unknown component)
    why: str = ""


def budget_verdicts(report: dict) -> tuple[list[Verdict], Step | None]:
    """Each limit of ``recipe.budget`` checked against the final model (else the latest measured step)."""
    budget = (report.get("recipe") or {}).get("budget")
    if not isinstance(budget, dict):
        return [], None
    all_steps = steps(report)
    against = all_steps[-1] if all_steps else None
    verdicts = []
    params = against.data if against else {}

    def check(what: str, limit: Any, value: Any, why_missing: str) -> None:
        limit_n, value_n = _number(limit), _number(value)
        if limit_n is None:
            return
        if value_n is None:
            verdicts.append(Verdict(what, limit_n, None, None, why_missing))
        else:
            verdicts.append(Verdict(what, limit_n, value_n, value_n <= limit_n))

    if against is not None:
        check("total", budget.get("total"), against.total, "not measured")
        components = budget.get("components") or {}
        for name, limit in components.items() if isinstance(components, dict) else ():
            check(name, limit, against.components.get(name),
                  "not measured" if not against.components else "unknown component")
        check("macs", budget.get("macs"), params.get("macs"), "not measured")
        drop_limit = budget.get("max_accuracy_drop")
        if _number(drop_limit) is not None:
            metric = accuracy_metric(report)
            base = _number(((report.get("baseline") or {}).get("metrics") or {}).get(metric)) if metric else None
            now = _number(against.metrics.get(metric)) if metric else None
            drop = base - now if base is not None and now is not None else None
            check(f"accuracy drop ({metric})" if metric else "accuracy drop", drop_limit, drop, "not evaluated")
    return verdicts, against


def _budget_section(report: dict, metrics: list[str]) -> list[str]:
    budget = (report.get("recipe") or {}).get("budget")
    if not isinstance(budget, dict):
        return []
    verdicts, against = budget_verdicts(report)
    if not verdicts:
        if against is None and any(_number(v) is not None for v in budget.values()):
            return ["## Budget", "", "Nothing measured yet.", ""]
        return []
    lines = ["## Budget", ""]
    if against is not None and against.kind != "final":
        lines += [f"The run has not finished: checked against {against.label}.", ""]
    failed = [v for v in verdicts if v.ok is False]
    unknown = [v for v in verdicts if v.ok is None]
    so_far = " so far" if against is not None and against.kind != "final" else ""
    if failed:
        lines.append(f"**Budget: FAIL{so_far}** — {len(failed)} of {len(verdicts)} limits exceeded "
                     f"({', '.join(v.what for v in failed)})")
    elif unknown:
        lines.append(f"**Budget: PASS{so_far}, partly checked** — {len(verdicts) - len(unknown)} of {len(verdicts)} limits met, "
                     f"{len(unknown)} not checked ({', '.join(v.what for v in unknown)})")
    else:
        lines.append(f"**Budget: PASS{so_far}** — all {len(verdicts)} limits met")
    lines.append("")
    rows = []
    for v in verdicts:
        if v.what == "macs":
            fmt = format_macs
        elif v.what.startswith("accuracy drop"):
            fmt = _metric
        else:
            fmt = _int
        margin = fmt(v.limit - v.value) if v.value is not None else DASH
        verdict = "pass" if v.ok else ("**FAIL**" if v.ok is False else v.why)
        rows.append([v.what, fmt(v.limit), fmt(v.value), margin, verdict])
    lines += _table(["limit", "budget", against.label if against else "value", "headroom", "verdict"], rows,
                    {1, 2, 3})
    lines.append("")
    return lines
