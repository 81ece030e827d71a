"""The ``compress`` command line."""

from __future__ import annotations

import functools
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import accounting
from .checkpoint import open_model
from .errors import CompressorError
from .inputs import parse_input_size
from .plugins import App, Registry


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(command: Callable) -> Callable:
    """User mistakes become one line on stderr and an exit code, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return command(*args, **kwargs)
        except CompressorError as err:
            if debug:
                raise
            _fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


def registry_from(ctx: click.Context) -> Registry:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = App.create()
    return root.obj.registry


class CompressGroup(click.Group):
    """Lets plugins add commands before the command line is parsed."""

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            try:
                app = App.create()
                click.get_current_context().find_root().obj = app
                app.pm.hook.compressor_commands(cli=self, app=app)
            except CompressorError as err:
                _fail(str(err), err.exit_code)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load_plugin_commands()
        return super().get_command(ctx, name)


@click.group(cls=CompressGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="featherface-compressor", prog_name="compress")
def cli(debug: bool) -> None:
    """Compress PyTorch models pass by pass, with budgets, checks and resumable checkpoints.

    Exit codes: 0 ok, 1 a check failed, 2 bad input or usage.
    """


def format_count(value: int) -> str:
    return f"{value:,}"


def component_table(components: dict[str, int], total: int) -> list[str]:
    width = max([len(name) for name in components] + [len("total")])
    lines = []
    for name, count in components.items():
        share = 100.0 * count / total if total else 0.0
        lines.append(f"  {name:<{width}}  {format_count(count):>10}  {share:5.1f}%")
    lines.append(f"  {'total':<{width}}  {format_count(total):>10}  100.0%")
    return lines


@cli.command()
@click.argument("model", metavar="[FAMILY | CHECKPOINT | RUN_DIR]", default="featherface")
@click.option("--input-size", "input_size", default="640", show_default=True, help="H or HxW for MACs and latency.")
@click.option("--latency-runs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also time this many CPU forwards at batch 1 (median reported); 0 skips timing.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="CPU threads for timing.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def inspect(model: str, input_size: str, latency_runs: int, threads: int, as_json: bool) -> None:
    """Parameters per component, MACs and (optionally) CPU latency of a model.

    MODEL is a model family's name (its baseline architecture), a checkpoint
    (ours, or one the family knows, e.g. the original FeatherFace's), or a run
    folder (its final model).
    """
    loaded = open_model(model, registry_from(click.get_current_context()))
    family = loaded.family
    height, width = parse_input_size(input_size)
    family.check_input_size(height, width)
    params = accounting.count_parameters(loaded.model, family.component_of, family.components)
    example = family.example_input(height, width, batch_size=1)
    macs = accounting.count_macs(loaded.model, example)
    result: dict[str, Any] = {
        "total": params.total,
        "components": params.components,
        "macs": macs.macs,
        "input_size": [height, width],
        "extra_macs": macs.extra,
        "model": loaded.source,
        "family": family.name,
    }
    if latency_runs:
        result["latency"] = accounting.measure_latency(loaded.model, example, runs=latency_runs, threads=threads).to_dict()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{loaded.source} ({family.name})")
    click.echo("parameters (each tensor counted once):")
    for line in component_table(params.components, params.total):
        click.echo(line)
    click.echo(f"MACs at {height}x{width}, batch 1: {format_count(macs.macs)} ({macs.macs / 1e9:.3f} G)"
               "  [convs and linear layers; BN, activations, pooling, resizing not counted]")
    for kind, value in macs.extra.items():
        click.echo(f"  plus {kind}: {format_count(value)}  [not in MACs above; 4 MACs per bilinear sample + 1 for modulation]"
                   if kind == "deform_sampling_macs" else f"  plus {kind}: {format_count(value)}")
    if latency_runs:
        lat = result["latency"]
        click.echo(f"CPU latency: median {lat['median_ms']:.1f} ms over {lat['runs']} runs "
                   f"(after {lat['warmup']} warm-up), {lat['threads']} thread(s), batch 1")


def type_name(annotation: Any) -> str:
    """A readable type: ``'l1' | 'bn'`` for Literals, ``dict[str, float]``, ``int | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", str(origin))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _params_lines(params_model: type) -> list[str]:
    lines = []
    for name, field in params_model.model_fields.items():
        annotation = type_name(field.annotation)
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        doc = f"  {field.description}" if field.description else ""
        lines.append(f"    {name}: {annotation} ({default}){doc}")
    return lines


@cli.command()
@click.option("--plugin", "plugins", multiple=True, help="Also load this plugin (module path or .py file).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def passes(plugins: tuple[str, ...], as_json: bool) -> None:
    """List every registered pass with its description and params."""
    registry = App.create(plugins).registry if plugins else registry_from(click.get_current_context())
    if as_json:
        click.echo(json.dumps({
            name: {"summary": cls.summary(), "plugin": registry.pass_sources[name], "lossless": cls.lossless,
                   "params": cls.Params.model_json_schema()}
            for name, cls in sorted(registry.passes.items())
        }, indent=2))
        return
    if not registry.passes:
        click.echo("no passes registered")
    for name, cls in sorted(registry.passes.items()):
        click.echo(f"{name}  - {cls.summary()}  [{registry.pass_sources[name]}]")
        click.echo("\n".join(_params_lines(cls.Params)) or "    (no params)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def families(as_json: bool) -> None:
    """List the registered model families."""
    registry = registry_from(click.get_current_context())
    if as_json:
        click.echo(json.dumps({n: {"description": f.description, "components": list(f.components)}
                               for n, f in registry.families.items()}, indent=2))
        return
    for name, family in registry.families.items():
        click.echo(f"{name}  - {family.description}")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of recipes (for editors' YAML completion)."""
    from .recipe import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe field (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def validate(recipe: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check a recipe without running it: keys, types, passes, params, files, budgets."""
    from .plugins import load_registry
    from .recipe import check_against_registry, load_recipe

    parsed, _ = load_recipe(recipe, overrides)
    registry = load_registry(parsed.plugins, base_dir=recipe.parent)
    check_against_registry(parsed, registry, recipe)
    registry.get_family(parsed.model.family).check_input_size(*parsed.input_size)
    if as_json:
        click.echo(json.dumps({"ok": True, "stages": [s.label for s in parsed.stages]}))
    else:
        click.echo(f"{recipe}: ok ({len(parsed.stages)} stages: {', '.join(s.label for s in parsed.stages)})")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default: runs/<recipe name>).")
@click.option("--resume", is_flag=True, help="Continue the run in the run folder after its last completed stage.")
@click.option("--no-finetune", is_flag=True, help="Apply passes with structural and budget checks only (fast).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe field (repeatable).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON on stdout.")
@handle_errors
def run(recipe: Path, out_dir: Path | None, resume: bool, no_finetune: bool, overrides: tuple[str, ...],
        device: str, quiet: bool, as_json: bool) -> None:
    """Run a compression recipe: apply each stage's pass, validate, finetune, measure, checkpoint.

    The run folder holds a checkpoint per stage, report.json / report.md / plots,
    and final.pt.  Interrupted runs continue with --resume.
    """
    from .runner import RunOptions, run_recipe

    options = RunOptions(out_dir=out_dir, resume=resume, finetune=not no_finetune, device=device,
                         overrides=list(overrides), quiet=quiet)
    report = run_recipe(recipe, options)
    if as_json:
        click.echo(json.dumps(report, indent=2))


@cli.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: runs/<recipe name>).")
@click.option("--resume", is_flag=True, help="Continue from the folder's last checkpoint.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe field (repeatable).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--no-eval", is_flag=True, help="Skip the evaluation at the end.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the training report as JSON on stdout.")
@handle_errors
def train_command(recipe: Path, out_dir: Path | None, resume: bool, overrides: tuple[str, ...], device: str,
                  no_eval: bool, quiet: bool, as_json: bool) -> None:
    """Train a model from a training recipe (model, data, train settings).

    Writes last.pt (resumable, every train.checkpoint_every steps), final.pt and
    train_report.json into the output folder.
    """
    from .train_run import TrainOptions, train_recipe

    report = train_recipe(recipe, TrainOptions(out_dir=out_dir, resume=resume, device=device,
                                               overrides=list(overrides), quiet=quiet, evaluate=not no_eval))
    if as_json:
        click.echo(json.dumps(report, indent=2))


def main() -> None:
    cli()
