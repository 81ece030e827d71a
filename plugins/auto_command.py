"""`compress auto --budget N`: give a parameter budget, get a recipe that meets it, and its run.

The base recipe (``--recipe``, ``recipes/auto.yaml`` by default) says everything
but the budget: the model, the data, the finetuning, the structural stages that
come first and the ``auto`` stage that decides how much each component is pruned
(appended when the base has none).  The command

1. writes ``<out>/auto.yaml``: the base with the budget filled in (the final
   ``budget.total`` and every ``auto`` stage's ``target``), ``--from`` as the
   model, and every path made absolute, so the folder is self-contained;
2. runs it as ``compress run`` would (validated, finetuned, checkpointed,
   resumable with ``--resume``);
3. writes ``<out>/recipe.yaml``: the same recipe with each ``auto`` stage replaced
   by the ``prune`` stage it decided (its per-component ratios).  That file is the
   reviewable result: ``compress run <out>/recipe.yaml`` redoes the same run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from compressor import hookimpl
from compressor.atomic import atomic_write_text
from compressor.cli import (
    app_from,
    device_option,
    handle_errors,
    json_option,
    no_finetune_option,
    overrides_option,
    plugin_option,
    quiet_option,
)
from compressor.errors import UsageError
from compressor.recipe import load_recipe, validate_data
from compressor.record import RunRecord
from compressor.report import REPORT_JSON
from compressor.runner import RunOptions, recipe_as_record, run_recipe
from compressor.session import open_recipe
from compressor_plugins.auto import Auto, AutoParams, prune_params

DEFAULT_BASE = Path("recipes") / "auto.yaml"
REQUEST_NAME = "auto.yaml"
RESOLVED_NAME = "recipe.yaml"


def request_recipe(base: Path, budget: int, start: Path | None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The base recipe with the budget (and ``start`` as the model) filled in, as a JSON-like record.

    Validated as a recipe relative to ``base``, so every path in it is absolute.
    """
    _, raw = load_recipe(base, overrides)
    if start is not None:
        raw["model"] = {**(raw.get("model") or {}), "checkpoint": str(start.resolve()), "pretrained": None}
    raw["budget"] = {**(raw.get("budget") or {}), "total": budget}
    stages = raw.get("stages") or []
    auto_stages = [stage for stage in stages if isinstance(stage, dict) and stage.get("pass") == Auto.name]
    if not auto_stages:
        stages.append({"name": Auto.name, "pass": Auto.name})
        auto_stages = stages[-1:]
    raw["stages"] = stages
    for stage in auto_stages:
        stage["params"] = {**(stage.get("params") or {}), "target": budget}
    return recipe_as_record(validate_data(raw, base))


def resolved_recipe(request: dict[str, Any], record: RunRecord) -> dict[str, Any]:
    """``request`` with each ``auto`` stage replaced by the ``prune`` stage holding the ratios it chose."""
    resolved = json.loads(json.dumps(request))
    for index, stage in enumerate(resolved["stages"]):
        if stage["pass"] != Auto.name:
            continue
        done = record.stages[index]
        if done.status != "ok" or "allocation" not in done.pass_record:
            raise UsageError(f"stages[{index}] ({stage['name']}): the auto stage did not finish; nothing to resolve")
        stage["pass"] = "prune"
        stage["params"] = prune_params(done.pass_record, AutoParams.model_validate(stage["params"]))
    return resolved


def _write_yaml(path: Path, header: str, data: dict[str, Any]) -> None:
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    atomic_write_text(path, comment + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


@click.command("auto")
@click.option("--budget", type=click.IntRange(min=1), default=None, metavar="PARAMS",
              help="Total parameters (counted once per tensor) the final model may have. Required unless --resume.")
@click.option("--from", "start", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="CHECKPOINT",
              help="The model to compress (default: the base recipe's model).")
@click.option("--recipe", "base", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_BASE,
              show_default=True,
              help="The base recipe: model, data, finetuning, the stages before the allocation, export.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The run folder (default: runs/auto-<budget>); auto.yaml and recipe.yaml are written into it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its auto.yaml.")
@no_finetune_option
@overrides_option
@device_option
@plugin_option
@quiet_option
@json_option
@handle_errors
def auto(budget: int | None, start: Path | None, base: Path, out_dir: Path | None, resume: bool, no_finetune: bool,
         overrides: tuple[str, ...], device: str, plugins: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Compress a model to a parameter budget, deciding each component's share from measured sensitivity.

    Writes the recipe it ran (auto.yaml) and the recipe it decided (recipe.yaml,
    the auto stage as plain prune ratios) into the run folder.
    """
    if resume:
        if out_dir is None:
            raise UsageError("--resume: give the run folder with --out")
        if budget is not None or start is not None or overrides:
            raise UsageError("--resume: the run continues its own auto.yaml; --budget, --from and --set do not apply")
        request_path = out_dir / REQUEST_NAME
        if not request_path.is_file():
            raise UsageError(f"{out_dir}: no {REQUEST_NAME} to resume (start it without --resume)")
        request = recipe_as_record(load_recipe(request_path)[0])
    else:
        if budget is None:
            raise UsageError("--budget: give the total parameters the model may have, e.g. --budget 150000")
        if not base.is_file():
            hint = " (run from the project root, or pass --recipe)" if base == DEFAULT_BASE else ""
            raise UsageError(f"--recipe: {base}: no such recipe file{hint}")
        out_dir = out_dir or Path("runs") / f"auto-{budget}"
        if (out_dir / REPORT_JSON).is_file():
            raise UsageError(f"{out_dir}: already holds a run; continue it with --resume, or choose another --out")
        request = request_recipe(base, budget, start, overrides)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_yaml(out_dir / REQUEST_NAME,
                    f"Written by `compress auto --budget {budget}` from {base}: the recipe this run follows.\n"
                    f"Continue an interrupted run with `compress auto --resume --out {out_dir}`.", request)
    opened = open_recipe(out_dir / REQUEST_NAME, app_from(click.get_current_context(), plugins), device=device,
                         out_dir=out_dir)
    record = run_recipe(opened, RunOptions(resume=resume, finetune=not no_finetune, quiet=quiet))
    resolved = resolved_recipe(request, record)
    _write_yaml(out_dir / RESOLVED_NAME,
                f"The recipe `compress auto` decided in {out_dir}: its auto stage resolved into the prune\n"
                "ratios chosen from measured sensitivity (report.json: that stage's pass_record).\n"
                f"`compress run {out_dir / RESOLVED_NAME} --out OTHER` redoes the run.", resolved)
    if as_json:
        click.echo(record.model_dump_json(indent=2, by_alias=True))
    elif not quiet:
        for index, stage in enumerate(resolved["stages"]):
            if request["stages"][index]["pass"] == Auto.name:
                ratios = ", ".join(f"{c} {r:g}" for c, r in stage["params"]["ratios"].items())
                click.echo(f"allocation ({stage['name']}): {ratios}")
        click.echo(f"recipe: {out_dir / RESOLVED_NAME}")


@hookimpl
def compressor_commands(cli: click.Group) -> None:
    cli.add_command(auto)
