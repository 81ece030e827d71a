"""`compress sensitivity`: how much each component minds being pruned.

Prunes one component at a time, at a few ratios, with the ``prune`` pass, and
reports the parameters saved and the output drift against the unpruned model
(and, with ``--metric``, the accuracy drop): the measurement to decide where a
recipe's parameter cuts should come from.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from compressor import hookimpl
from compressor.accounting import measure
from compressor.atomic import atomic_write_bytes, atomic_write_text
from compressor.checkpoint import open_model
from compressor.cli import (
    app_from,
    chosen_input_size,
    device_option,
    handle_errors,
    input_size_option,
    json_option,
    plugin_option,
)
from compressor.errors import UsageError
from compressor.family import ModelFamily
from compressor.inputs import parse_input_size
from compressor.passes import PassContext, PassResult
from compressor.plots import bar_chart_png
from compressor.validate import forward_eval, output_drift
from compressor_plugins.prune import Prune, PruneParams, prunable_components

DEFAULT_RATIOS = (0.1, 0.25, 0.5)


def sensitivity_rows(model: nn.Module, family: ModelFamily, components: list[str], ratios: list[float],
                     input_size: tuple[int, int], data_root: Path | None = None, metric: bool = False,
                     device: torch.device | None = None) -> list[dict]:
    """One row per (component, ratio): parameters after, share removed, output drift (and metric drop)."""
    device = device or torch.device("cpu")
    model = model.to(device)
    example = family.example_input(*input_size, batch_size=2).to(device)
    reference = forward_eval(model, example)
    before = measure(model, family, input_size, macs=False).params
    metric_name = family.metric
    if metric and not metric_name:
        raise UsageError(f"--metric: model family {family.name} has no accuracy metric")
    baseline_metrics = family.evaluate(model, data_root, input_size, device) if metric else {}
    ctx = PassContext(family=family, example_input=example, device=device)
    prune = Prune()
    rows = []
    for component in components:
        for ratio in ratios:
            params = PruneParams(ratios={component: ratio})
            candidate = copy.deepcopy(model)
            try:
                prune.check(candidate, params, ctx)
            except ValueError as err:
                raise UsageError(f"{component} at {ratio}: {err}") from err
            result = prune.apply(candidate, params, ctx)
            pruned = result.model if isinstance(result, PassResult) else result
            after = measure(pruned, family, input_size, macs=False).params
            row: dict[str, Any] = {
                "component": component,
                "ratio": ratio,
                "params": after.total,
                "removed": before.total - after.total,
                "component_params": after.components[component],
                "output_drift": output_drift(reference, forward_eval(pruned, example)),
            }
            if metric:
                metrics = family.evaluate(pruned, data_root, input_size, device)
                row[metric_name] = metrics[metric_name]
                row["metric_drop"] = baseline_metrics[metric_name] - metrics[metric_name]
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    has_metric = any("metric_drop" in r for r in rows)
    header = f"{'component':<16} {'ratio':>5} {'params':>9} {'removed':>9} {'drift':>9}"
    header += f" {'metric drop':>11}" if has_metric else ""
    lines = [header]
    for r in rows:
        line = (f"{r['component']:<16} {r['ratio']:>5.2f} {r['params']:>9,} {r['removed']:>9,} "
                f"{r['output_drift']:>9.3g}")
        if has_metric:
            line += f" {r['metric_drop']:>11.4f}"
        lines.append(line)
    return "\n".join(lines)


def _load(source: str, input_size: str | None, plugins: tuple[str, ...],
          device: str) -> tuple[ModelFamily, nn.Module, tuple[int, int], Path | None, torch.device]:
    """A recipe (its starting model, size and data, through the same path as `compress run`) or a model."""
    ctx = click.get_current_context()
    app = app_from(ctx, plugins)
    if source.endswith((".yaml", ".yml")):
        from compressor.session import open_recipe

        opened = open_recipe(Path(source), app, device=device)
        size = parse_input_size(input_size) if input_size else opened.recipe.input_size
        opened.family.check_input_size(*size)
        return opened.family, opened.starting_model(), size, opened.recipe.data.root, opened.device
    from compressor.session import resolve_device

    loaded = open_model(source, app.registry)
    return loaded.family, loaded.model, chosen_input_size(loaded, input_size), None, resolve_device(device)


@click.command()
@click.argument("source", metavar="RECIPE_OR_MODEL")
@click.option("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS), show_default=True,
              help="Comma-separated pruning ratios to try per component.")
@click.option("--components", default=None, help="Comma-separated components (default: all prunable ones).")
@input_size_option
@click.option("--metric", is_flag=True, help="Also evaluate the family's accuracy metric after each pruning (slow).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The folder it writes sensitivity.json, sensitivity.md and sensitivity.png into.")
@device_option
@plugin_option
@json_option
@handle_errors
def sensitivity(source: str, ratios: str, components: str | None, input_size: str | None, metric: bool,
                out_dir: Path | None, device: str, plugins: tuple[str, ...], as_json: bool) -> None:
    """Prune each component alone at a few ratios; report parameters saved and output drift."""
    family, model, size, data_root, where = _load(source, input_size, plugins, device)
    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError as err:
        raise UsageError(f"--ratios {ratios!r}: expected numbers like 0.1,0.25") from err
    if not ratio_list or not all(0 < r < 1 for r in ratio_list):
        raise UsageError(f"--ratios {ratios!r}: each ratio must be between 0 and 1")
    prunable = prunable_components(model, family)
    chosen = [c.strip() for c in components.split(",")] if components else prunable
    unknown = [c for c in chosen if c not in prunable]
    if unknown:
        raise UsageError(f"--components: {', '.join(unknown)} not prunable here (choose from {', '.join(prunable)})")
    rows = sensitivity_rows(model, family, chosen, ratio_list, size, data_root, metric, where)
    if out_dir is not None:
        _write(out_dir, rows)
    click.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


def _write(out_dir: Path, rows: list[dict]) -> None:
    atomic_write_text(out_dir / "sensitivity.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out_dir / "sensitivity.md", "```\n" + format_table(rows) + "\n```\n")
    labels = [f"{r['component']} {r['ratio']:.0%}" for r in rows]
    png = bar_chart_png(labels, {"output drift": [r["output_drift"] for r in rows]},
                        title="Output drift when one component is pruned", y_label="max |output change|",
                        tick_format=lambda v, step=None: f"{v:.2g}", show_totals=False)
    atomic_write_bytes(out_dir / "sensitivity.png", lambda handle: handle.write(png))


@hookimpl
def compressor_commands(cli: click.Group) -> None:
    cli.add_command(sensitivity)
