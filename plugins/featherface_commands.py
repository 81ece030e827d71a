"""FeatherFace's own commands: `compress eval-widerface`, `compress eval`, `compress detect`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compressor import hookimpl
from compressor.atomic import atomic_write_bytes
from compressor.checkpoint import open_model
from compressor.cli import (
    chosen_input_size,
    device_option,
    handle_errors,
    input_size_option,
    json_option,
    plugin_option,
    registry_from,
)
from compressor.errors import UsageError
from compressor.session import resolve_device


@click.command("eval-widerface")
@click.option("--pred", "pred_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Predictions in the standard layout: <event>/<image>.txt.")
@click.option("--gt", "gt_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat.")
@json_option
@handle_errors
def eval_widerface(pred_dir: Path, gt_dir: Path, as_json: bool) -> None:
    """The official WIDER FACE validation protocol: easy / medium / hard AP at IoU 0.5."""
    from featherface.evaluation import evaluate_widerface

    try:
        result = evaluate_widerface(pred_dir, gt_dir)
    except (ValueError, OSError) as err:  # WiderFaceInputError, a missing .mat, an unreadable file
        raise UsageError(str(err)) from err
    if as_json:
        click.echo(json.dumps(result))
    else:
        for setting, ap in result.items():
            click.echo(f"{setting:<7} AP {ap:.4f}")


@click.command("eval")
@click.argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
@click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Dataset root in the RetinaFace label layout (default: the embedded dataset).")
@input_size_option
@click.option("--save-predictions", "pred_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the detections here, in the WIDER FACE layout (<folder>/<image>.txt).")
@device_option
@plugin_option
@json_option
@handle_errors
def eval_model(model: str, data_root: Path | None, input_size: str | None, pred_dir: Path | None, device: str,
               plugins: tuple[str, ...], as_json: bool) -> None:
    """Detect faces on the validation split and report AP at IoU 0.5.

    Images are resized to a square: the input size is one side (default: the
    model's recipe's, else the family's).
    """
    from featherface.data import DataError
    from featherface.training import evaluate_ap

    loaded = open_model(model, registry_from(click.get_current_context(), plugins))
    height, width = chosen_input_size(loaded, input_size)
    if height != width:
        raise UsageError(f"--input-size {height}x{width}: evaluation resizes images to squares; give one side, e.g. 320")
    where = resolve_device(device)
    try:
        metrics = evaluate_ap(loaded.model.to(where), data_root, height, where, predictions_dir=pred_dir)
    except DataError as err:  # the root, a label file, the images
        raise UsageError(str(err)) from err
    except OSError as err:  # writing --save-predictions
        raise UsageError(f"--save-predictions {pred_dir}: {err}") from err
    click.echo(json.dumps(metrics) if as_json else f"AP {metrics['ap']:.4f} on {int(metrics['val_images'])} images")


@click.command("detect")
@click.argument("model", metavar="CHECKPOINT")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The annotated PNG it writes.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Score threshold.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, metavar="N",
              help="Refuse larger images (after padding to multiples of 32), checked from the header before "
                   "decoding. Default: $COMPRESSOR_MAX_PIXELS, else 40,000,000.")
@device_option
@plugin_option
@json_option
@handle_errors
def detect_command(model: str, image: Path, out_path: Path, threshold: float, max_pixels: int | None, device: str,
                   plugins: tuple[str, ...], as_json: bool) -> None:
    """Detect faces in one image; draw boxes, scores and landmarks into a PNG.

    Any common format (JPEG, PNG 8/16-bit, grayscale, RGBA, palette, BMP,
    WebP, ...) is read as 8-bit RGB.
    """
    from torchvision.io import encode_png
    from torchvision.utils import draw_bounding_boxes, draw_keypoints

    from featherface.data.images import MAX_PIXELS_ENV, ImageError, read_image
    from featherface.detect import detect
    from featherface.preprocess import pad_to_multiple, to_network_input

    where = resolve_device(device)
    try:
        # The network sees the image padded to multiples of 32: that is what the limit bounds.
        picture = read_image(image, max_pixels, multiple=32,
                             hint=f"--max-pixels or {MAX_PIXELS_ENV} raise it")
    except ImageError as err:
        raise UsageError(str(err)) from err
    loaded = open_model(model, registry_from(click.get_current_context(), plugins))
    height, width = picture.shape[-2:]
    found = detect(loaded.model.to(where), pad_to_multiple(to_network_input(picture)).to(where),
                   conf_threshold=threshold, image_sizes=[(height, width)])[0]
    boxes, scores, landmarks = found.boxes.cpu(), found.scores.cpu(), found.landmarks.cpu()
    labels = [f"{s:.2f}" for s in scores.tolist()]
    drawn = picture  # no face: the picture as it is (torchvision would warn on stderr about empty boxes)
    if len(boxes):
        drawn = draw_bounding_boxes(picture, boxes, labels=labels, colors="lime", width=2)
        drawn = draw_keypoints(drawn, landmarks.view(-1, 5, 2), colors="red", radius=2)
    png = encode_png(drawn).numpy().tobytes()
    atomic_write_bytes(out_path, lambda handle: handle.write(png))
    if as_json:
        click.echo(json.dumps([{"box": b, "score": s, "landmarks": l} for b, s, l in
                               zip(boxes.tolist(), scores.tolist(), landmarks.tolist())]))
    else:
        click.echo(f"{len(boxes)} faces -> {out_path}")


@hookimpl
def compressor_commands(cli: click.Group) -> None:
    # (The hook also offers ``app``; these commands reach it through click's context.)
    for command in (eval_widerface, eval_model, detect_command):
        cli.add_command(command)
