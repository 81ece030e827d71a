"""The ``compress`` command line."""

from __future__ import annotations

import functools
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import accounting
from .checkpoint import LoadedModel, open_model, resolve_checkpoint_path
from .errors import CompressorError, UsageError
from .inputs import parse_input_size
from .onnx_model import OnnxModel
from .plugins import App, Registry, guarded
from .quantize import DEFAULT_CALIBRATION_COUNT
from .session import DEVICES, resolve_device

if TYPE_CHECKING:
    from .export import ExportRecord


def _version() -> str:
    """This distribution's version, found by the package rather than by a hard-coded name."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for distribution in packages_distributions().get(__package__ or "compressor", []):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "unknown"


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
        except OSError as err:  # a path the user gave that the system refuses (too long, no permission, ...)
            if debug:
                raise
            where = f"{err.filename}: " if err.filename else ""
            _fail(f"{where}{err.strerror or err}", 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


# ------------------------------------------------------------ the command's App

def app_from(ctx: click.Context, plugins: tuple[str, ...] | list[str] = ()) -> App:
    """The command's one :class:`App`, with the command's ``--plugin`` options added."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = App.create(root.params.get("plugins") or ())
    app: App = root.obj
    app.add_plugins(plugins)
    return app


def registry_from(ctx: click.Context, plugins: tuple[str, ...] | list[str] = ()) -> Registry:
    return app_from(ctx, plugins).registry


class CompressGroup(click.Group):
    """Adds the commands plugins provide, collected once per invocation from its App."""

    def _plugin_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        meta = ctx.find_root().meta
        if "compressor.commands" not in meta:
            collector = click.Group()
            meta["compressor.commands"] = collector.commands
            try:
                app = app_from(ctx)
                for impl in app.pm.hook.compressor_commands.get_hookimpls():
                    guarded(f"plugin {impl.plugin_name}", "raised in compressor_commands()",
                            lambda: impl.function(**{k: v for k, v in (("cli", collector), ("app", app))
                                                     if k in impl.argnames}))
            except CompressorError as err:
                _fail(str(err), err.exit_code)
        return meta["compressor.commands"]

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugin_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        plugin_commands = self._plugin_commands(ctx)  # always: a broken plugin is reported, whatever the command
        return super().get_command(ctx, name) or plugin_commands.get(name)


# ------------------------------------------------------------ options every command spells the same way

PLUGIN_HELP = "Load a plugin (dotted module path or .py file), or disable one by name with no:NAME. Repeatable."


def plugin_option(command: Callable) -> Callable:
    return click.option("-p", "--plugin", "plugins", multiple=True, metavar="PLUGIN", help=PLUGIN_HELP)(command)


def device_option(command: Callable) -> Callable:
    return click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
                        help="Where to compute; an unavailable device is refused.")(command)


def json_option(command: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(command)


def input_size_option(command: Callable) -> Callable:
    return click.option("--input-size", "input_size", default=None, metavar="H|HxW",
                        help="Input size (height x width); default: the model's recipe's, else its family's.")(command)


def no_finetune_option(command: Callable) -> Callable:
    return click.option("--no-finetune", is_flag=True,
                        help="Skip finetuning and accuracy evaluation: passes, structural checks and budgets only "
                             "(fast); an accuracy budget is then reported as not checked.")(command)


def quiet_option(command: Callable) -> Callable:
    return click.option("--quiet", is_flag=True, help="No progress output.")(command)


def overrides_option(command: Callable) -> Callable:
    return click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                        help="Override a recipe field (repeatable), e.g. --set finetune.lr=0.0005.")(command)


def chosen_input_size(loaded: LoadedModel, given: str | None) -> tuple[int, int]:
    """``--input-size`` if given, else the model's own size; checked against its family."""
    size = parse_input_size(given) if given else loaded.input_size
    loaded.family.check_input_size(*size)
    return size


@click.group(cls=CompressGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-p", "--plugin", "plugins", multiple=True, metavar="PLUGIN",
              help=PLUGIN_HELP + " Given here, it applies to every command (and may add commands).")
@click.version_option(prog_name="compress", version=_version())
def cli(debug: bool, plugins: tuple[str, ...]) -> None:
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
@click.argument("model", metavar="[FAMILY | CHECKPOINT | RUN_DIR]", required=False)
@input_size_option
@click.option("--latency-runs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also time this many CPU forwards at batch 1 (median reported); 0 skips timing.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="CPU threads for timing.")
@device_option
@plugin_option
@json_option
@handle_errors
def inspect(model: str | None, input_size: str | None, latency_runs: int, threads: int, device: str,
            plugins: tuple[str, ...], as_json: bool) -> None:
    """Parameters per component, MACs and (optionally) CPU latency of a model.

    MODEL is a model family's name (its baseline architecture), a checkpoint
    (ours, or one a family reads natively, such as an original implementation's
    weights), or a run folder (its final model).  Left out, it is the baseline
    of the only registered family.
    """
    ctx = click.get_current_context()
    registry = registry_from(ctx, plugins)
    if model is None:
        if len(registry.families) != 1:
            raise UsageError(f"give a MODEL (families: {', '.join(registry.families) or 'none registered'})")
        model = next(iter(registry.families))
    where = resolve_device(device)
    loaded = open_model(model, registry, allow_onnx=True)
    if isinstance(loaded.model, OnnxModel):
        refused = [option for option, given in (("--input-size", input_size is not None),
                                                ("--latency-runs", latency_runs > 0), ("--device", where.type != "cpu"))
                   if given]
        if refused:
            raise UsageError(f"{refused[0]} does not apply to an ONNX model: inspect prints what its file holds")
        _inspect_onnx(loaded, as_json)
        return
    size = chosen_input_size(loaded, input_size)
    measurement = accounting.measure(loaded.model.to(where), loaded.family, size, device=where,
                                     latency_runs=latency_runs, threads=threads)
    if as_json:
        click.echo(json.dumps({"model": loaded.source, "family": loaded.family.name,
                               **measurement.model_dump(mode="json")}, indent=2))
        return
    params = measurement.params
    click.echo(f"{loaded.source} ({loaded.family.name})")
    click.echo("parameters (each tensor counted once):")
    for line in component_table(params.components, params.total):
        click.echo(line)
    height, width = size
    click.echo(f"MACs at {height}x{width}, batch 1: {format_count(measurement.macs)} ({measurement.macs / 1e9:.3f} G)"
               "  [convs and linear layers; BN, activations, pooling, resizing not counted]")
    for kind, value in measurement.extra_macs.items():
        note = measurement.counting_notes.get(kind)
        click.echo(f"  plus {kind}: {format_count(value)}" + (f"  [{note}]" if note else ""))
    if measurement.latency is not None:
        lat = measurement.latency
        click.echo(f"CPU latency: median {lat.median_ms:.1f} ms over {lat.runs} runs "
                   f"(after {lat.warmup} warm-up), {lat.threads} thread(s), batch 1")


def _inspect_onnx(loaded: LoadedModel, as_json: bool) -> None:
    """An exported model's file: its size, opset, input and outputs, and the metadata compress export wrote."""
    model = loaded.model
    described = {"model": loaded.source, "family": loaded.family.name, "format": "onnx",
                 "bytes": Path(loaded.source).stat().st_size, "opset": model.opset,
                 "input": {"name": model.input_name, "shape": list(model.input_shape)},
                 "outputs": list(model.output_names), "metadata": model.metadata}
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    shape = " x ".join("?" if d is None else str(d) for d in model.input_shape)
    click.echo(f"{loaded.source} ({loaded.family.name}, ONNX opset {model.opset}, {format_count(described['bytes'])} "
               f"bytes)")
    click.echo(f"input {model.input_name}: {shape} (? = dynamic); outputs: {', '.join(model.output_names)}")
    click.echo("metadata:")
    for key, value in model.metadata.items():
        shown = value if len(value) <= 300 else f"{value[:120]}... ({len(value):,} characters; --json shows all)"
        click.echo(f"  {key}: {shown}")


EXPORT_FORMATS = ("onnx",)


@cli.command("export")
@click.argument("model", metavar="CHECKPOINT | RUN_DIR | FAMILY")
@click.option("--format", "export_format", type=click.Choice(EXPORT_FORMATS), required=True,
              help="The file format to write.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The file to write (default: <run folder>/final.onnx for a finished run, else beside the "
                   "checkpoint of its last stage; <name>.onnx in the current folder for a file or family); its "
                   "record goes beside it as <file>.json.")
@input_size_option
@click.option("--dynamic", is_flag=True,
              help="Dynamic batch, height and width (slower to export); else fixed at --input-size, batch 1.")
@click.option("--int8", is_flag=True,
              help="Write an int8 model (static post-training quantization of the checked float export; "
                   "default name <name>.int8.onnx).")
@click.option("--calibration-images", "calibration_images", type=click.Path(path_type=Path), default=None,
              metavar="DIR", help="With --int8: calibrate on these images (jpg/png, recursively); default: the "
                                  "model's recipe's data, else the family's default data.")
@click.option("--calibration-count", type=click.IntRange(min=1, max=10_000), default=DEFAULT_CALIBRATION_COUNT,
              show_default=True, help="With --int8: how many images calibrate it.")
@plugin_option
@json_option
@handle_errors
def export_command(model: str, export_format: str, out_path: Path | None, input_size: str | None, dynamic: bool,
                   int8: bool, calibration_images: Path | None, calibration_count: int,
                   plugins: tuple[str, ...], as_json: bool) -> None:
    """Export a model to ONNX, checked in ONNX Runtime against PyTorch before it is written.

    The export (torch.onnx's dynamo exporter, opset 20) is run in ONNX Runtime on
    the family's example input at --input-size (default: the model's recipe's,
    else its family's) and every output compared with PyTorch's; a difference
    above 1e-4 writes nothing and exits 1.  The file's metadata holds the family,
    the architecture spec, the model's input size and what a runtime needs to
    use it (input layout and preprocessing, the meaning of each output, the
    postprocessing); `compress inspect FILE.onnx` prints it, and `compress eval`
    and `compress detect` run the file.  Without --dynamic the file takes only
    that input size (any batch: the commands run it image by image); with it,
    it is also checked on a batch of 2 at twice --input-size, where a graph that
    still depends on the traced size fails (export at a larger size then).

    Deformable convolutions (torchvision's deform_conv2d, in the baseline's SSH)
    become ONNX DeformConv, so the runtime must support DeformConv (opset 19);
    the ssh_slim pass with conv: plain removes them.

    With --int8 the checked float export is quantized with ONNX Runtime's static
    quantizer (QDQ; activations uint8 per tensor, weights int8 per channel,
    MinMax calibration) and only the int8 file is written, with a record of both
    steps beside it.  Convolutions and their activations are quantized; other
    operators stay float, and so do convolutions with fewer than 16 input or
    output channels: ONNX Runtime's integer kernels are slower than its float
    ones there, and those thin layers lose the most accuracy.
    """
    from .export import export_onnx

    given_count = click.get_current_context().get_parameter_source("calibration_count")
    if not int8 and (calibration_images is not None or given_count is click.core.ParameterSource.COMMANDLINE):
        raise UsageError("--calibration-images and --calibration-count need --int8")
    loaded = open_model(model, registry_from(click.get_current_context(), plugins))
    size = chosen_input_size(loaded, input_size)
    if out_path is None:
        source, suffix = Path(model), (".int8." if int8 else ".") + export_format
        out_path = (resolve_checkpoint_path(source).with_suffix(suffix) if source.is_dir()
                    else Path(f"{source.stem}{suffix}"))
    if not int8:
        _echo_export(export_onnx(loaded, out_path, input_size=size, dynamic=dynamic), as_json)
        return
    from .quantize import export_int8

    from .recipe import DataConfig

    # The recipe a checkpoint carries was validated (paths absolute) when its run began.
    data = DataConfig.model_validate((loaded.checkpoint.get("recipe") or {}).get("data") or {})
    images = calibration_images or data.images
    if images is not None and not images.is_dir():
        where = "--calibration-images" if calibration_images is not None else "the model's recipe's data.images"
        raise UsageError(f"{where}: no such folder: {images}")
    calibration = loaded.family.calibration_inputs(data.root, images, size, calibration_count)
    record = export_int8(loaded, out_path, input_size=size, dynamic=dynamic, calibration=calibration.images,
                         calibration_from=calibration.source)
    if as_json:
        click.echo(record.model_dump_json(indent=2))
        return
    quantization = record.quantization
    click.echo(f"{quantization.path}: {format_count(quantization.bytes)} bytes, int8 ({quantization.quantized_convs} "
               f"convs int8, {quantization.float_convs} float), calibrated on {quantization.calibration_images} "
               f"images: {quantization.calibration}; the float export it came from agreed with PyTorch to "
               f"{max(record.float_model.max_abs_diff.values(), default=0.0):.2g}")


def _echo_export(record: ExportRecord, as_json: bool) -> None:
    """One exported file: the record as JSON, or its path, size and agreement with PyTorch."""
    if as_json:
        click.echo(record.model_dump_json(indent=2))
        return
    height, width = record.input_size
    shape = "dynamic batch, height and width" if record.dynamic else f"fixed {height}x{width} input, batch 1"
    checked = f"{height}x{width}" + (" and twice that" if record.dynamic else "")
    worst = max(record.max_abs_diff.values(), default=0.0)
    click.echo(f"{record.path}: {format_count(record.bytes)} bytes, {record.format} opset {record.opset}, {shape}; "
               f"max |ONNX Runtime - PyTorch| {worst:.2g} at {checked} (tolerance {record.tolerance:g})")


def type_name(annotation: Any) -> str:
    """A readable type: ``'l1' | 'bn'`` for Literals, ``dict[str, float]``, ``int | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
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
@plugin_option
@json_option
@handle_errors
def passes(plugins: tuple[str, ...], as_json: bool) -> None:
    """List every registered pass with its description and params."""
    registry = registry_from(click.get_current_context(), plugins)
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
@plugin_option
@json_option
@handle_errors
def families(plugins: tuple[str, ...], as_json: bool) -> None:
    """List the registered model families: components, metric, default data."""
    registry = registry_from(click.get_current_context(), plugins)
    described = {
        name: {"description": f.description, "components": list(f.components), "metric": f.metric or None,
               "default_input_size": list(f.default_input_size), "default_data": f.default_data or None}
        for name, f in registry.families.items()
    }
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for name, info in described.items():
        click.echo(f"{name}  - {info['description']}")
        click.echo(f"    components: {', '.join(info['components'])}; metric: {info['metric'] or 'none'}; "
                   f"input size {'x'.join(map(str, info['default_input_size']))}")
        if info["default_data"]:
            click.echo(f"    default data: {info['default_data']}")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of recipes (for editors' YAML completion)."""
    from .recipe import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
@plugin_option
@json_option
@handle_errors
def validate(recipe: Path, overrides: tuple[str, ...], plugins: tuple[str, ...], as_json: bool) -> None:
    """Check a recipe without running it: keys, types, passes, params, files, budgets.

    It also loads the starting model (its checkpoint, or the family's baseline)
    and checks that every stage's pass applies to it; nothing is computed.
    """
    from .passes import check_stages_apply
    from .session import open_recipe

    opened = open_recipe(recipe, app_from(click.get_current_context(), plugins), overrides=overrides)
    check_stages_apply(opened, opened.starting_model())
    labels = [s.label for s in opened.recipe.stages]
    if as_json:
        click.echo(json.dumps({"ok": True, "family": opened.family.name, "stages": labels}))
    else:
        click.echo(f"{recipe}: ok ({opened.family.name}, {len(labels)} stages: {', '.join(labels)})")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The run folder it writes (default: runs/<recipe name>).")
@click.option("--resume", is_flag=True, help="Continue the run in the run folder after its last completed stage.")
@no_finetune_option
@overrides_option
@device_option
@plugin_option
@quiet_option
@json_option
@handle_errors
def run(recipe: Path, out_dir: Path | None, resume: bool, no_finetune: bool, overrides: tuple[str, ...],
        device: str, plugins: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Run a compression recipe: apply each stage's pass, validate, finetune, measure, checkpoint.

    The run folder holds a checkpoint per stage, report.json / report.md / plots,
    and final.pt.  Interrupted runs continue with --resume (with the same options).
    """
    from .runner import RunOptions, run_recipe
    from .session import open_recipe

    opened = open_recipe(recipe, app_from(click.get_current_context(), plugins), overrides=overrides,
                         device=device, out_dir=out_dir)
    record = run_recipe(opened, RunOptions(resume=resume, finetune=not no_finetune, quiet=quiet))
    if as_json:
        click.echo(record.model_dump_json(indent=2, by_alias=True))


@cli.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The training folder it writes (default: runs/<recipe name>).")
@click.option("--resume", is_flag=True, help="Continue from the folder's last checkpoint.")
@overrides_option
@device_option
@plugin_option
@click.option("--no-eval", is_flag=True, help="Skip the accuracy evaluation of the trained model at the end.")
@quiet_option
@json_option
@handle_errors
def train_command(recipe: Path, out_dir: Path | None, resume: bool, overrides: tuple[str, ...], device: str,
                  plugins: tuple[str, ...], no_eval: bool, quiet: bool, as_json: bool) -> None:
    """Train a model from a training recipe (model, data, train settings).

    Writes last.pt (resumable, every train.checkpoint_every steps), final.pt and
    train_report.json into the output folder.
    """
    from .recipe import TrainRecipe
    from .session import open_recipe
    from .train_run import TrainOptions, train_recipe

    opened = open_recipe(recipe, app_from(click.get_current_context(), plugins), overrides=overrides,
                         kind=TrainRecipe, device=device, out_dir=out_dir)
    report = train_recipe(opened, TrainOptions(resume=resume, quiet=quiet, evaluate=not no_eval))
    if as_json:
        click.echo(json.dumps(report, indent=2))


def main() -> None:
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C during start-up (imports, plugins), before a command's own handler
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
