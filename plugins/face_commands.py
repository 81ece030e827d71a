"""The face-detector commands, for every family with the RetinaFace output contract: `compress eval-widerface`, `compress eval`, `compress detect`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import click
import torch

from compressor import hookimpl
from compressor.atomic import atomic_write_bytes
from compressor.checkpoint import LoadedModel, open_model
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
from compressor.family import ModelFamily
from compressor.onnx_model import OnnxModel
from compressor.plugins import Registry
from compressor.session import resolve_device
from compressor_plugins.face_family import FaceDetectorFamily


@click.command("eval-widerface")
@click.option("--pred", "pred_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Predictions in the standard layout: <event>/<image>.txt.")
@click.option("--gt", "gt_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat.")
@json_option
@handle_errors
def eval_widerface(pred_dir: Path, gt_dir: Path, as_json: bool) -> None:
    """The official WIDER FACE validation protocol: easy / medium / hard AP at IoU 0.5."""
    from facedet.evaluation import evaluate_widerface

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
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="The labelled split: val (what recipes are tuned on) or test (held out).")
@input_size_option
@click.option("--save-predictions", "pred_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the detections here, in the WIDER FACE layout (<folder>/<image>.txt).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Instead of the validation split: real photos, each at its own size (jpg/jpeg/png, "
                   "recursively); with --against or --labels.")
@click.option("--against", "teacher", default=None, metavar="TEACHER",
              help="With --images: the reference detector (run folder, checkpoint or original checkpoint of any "
                   "family) whose detections of score above 0.5 are the ground truth.")
@click.option("--labels", is_flag=True,
              help="With --images: DIR is a split folder (label.txt, images/) whose boxes are the ground truth.")
@device_option
@plugin_option
@json_option
@handle_errors
def eval_model(model: str, data_root: Path | None, split: str, input_size: str | None, pred_dir: Path | None,
               images_dir: Path | None, teacher: str | None, labels: bool, device: str,
               plugins: tuple[str, ...], as_json: bool) -> None:
    """Detect faces and report AP at IoU 0.5 with its 95% bootstrap interval: on a labelled split, or on real photos.

    On a split (--split val or test), images are resized to a square: the input size
    is one side (default: the model's recipe's, else the family's).  With
    --images, every photo keeps its own size (padded bottom/right when a
    family needs sides of a multiple; with --against, one that suits both)
    and detections of score above 0.02 (NMS 0.4, at most 750 per photo) are
    scored, all photos pooled, against a reference detector's confident
    faces (--against) or the folder's labels (--labels).

    The model (or the reference) may be a .onnx file from `compress export`,
    run by ONNX Runtime on the CPU.
    """
    _check_eval_options(data_root, input_size, pred_dir, images_dir, teacher, labels)
    if images_dir is not None and split != "val":
        raise UsageError("--split: with --images the photos are the data; leave --split out")
    where = resolve_device(device)
    registry = registry_from(click.get_current_context(), plugins)
    loaded = _open_runnable(model, registry, where)
    if images_dir is not None:
        _eval_on_photos(loaded, images_dir, teacher, registry, where, as_json)
        return

    from facedet.data import DataError
    from facedet.training import evaluate_ap

    height, width = chosen_input_size(loaded, input_size)
    if height != width:
        raise UsageError(f"--input-size {height}x{width}: evaluation resizes images to squares; give one side, e.g. 320")
    try:
        metrics = evaluate_ap(loaded.model.to(where), data_root, height, where, predictions_dir=pred_dir, split=split)
    except DataError as err:  # the root, a label file, the images
        raise UsageError(str(err)) from err
    except OSError as err:  # writing --save-predictions
        raise UsageError(f"--save-predictions {pred_dir}: {err}") from err
    click.echo(json.dumps(metrics) if as_json else
               f"AP {metrics['ap']:.4f} [{metrics['ap_low']:.4f}, {metrics['ap_high']:.4f}] "
               f"on {int(metrics[f'{split}_images'])} images of the {split} split")


def _check_eval_options(data_root: Path | None, input_size: str | None, pred_dir: Path | None,
                        images_dir: Path | None, teacher: str | None, labels: bool) -> None:
    """Refuse option combinations that mean nothing, before any model is opened."""
    if images_dir is None:
        if teacher is not None or labels:
            raise UsageError(f"{'--against' if teacher is not None else '--labels'} needs --images DIR")
        return
    if teacher is not None and labels:
        raise UsageError("--against and --labels exclude each other: the ground truth is either a reference "
                         "detector's faces or the folder's labels")
    if teacher is None and not labels:
        raise UsageError("--images needs --against TEACHER (agreement with a reference detector) or --labels "
                         "(DIR/label.txt holds the boxes)")
    for given, option, why in ((input_size, "--input-size", "every photo is evaluated at its own size"),
                               (data_root, "--data", "the photos are the data"),
                               (pred_dir, "--save-predictions", "it writes the validation split's detections")):
        if given is not None:
            raise UsageError(f"{option} does not apply with --images: {why}")


def _open_runnable(source: str, registry: Registry, where: torch.device) -> LoadedModel:
    """A model these commands run: also an exported ONNX model, which computes on the CPU only."""
    loaded = open_model(source, registry, allow_onnx=True)
    if isinstance(loaded.model, OnnxModel):
        loaded.model.to(where)  # refuses any device but the CPU, in one line
    return loaded


def _size_multiple(family: ModelFamily) -> int:
    # Face-detector families declare the multiple their input sides need; another family's model takes any size.
    return family.size_multiple if isinstance(family, FaceDetectorFamily) else 1


def _eval_on_photos(loaded: LoadedModel, images_dir: Path, teacher: str | None, registry: Registry,
                    where: torch.device, as_json: bool) -> None:
    """``compress eval --images``: AP against a reference detector or against the folder's labels."""
    from facedet.agreement import agreement_ap, labelled_ap
    from facedet.data import DataError
    from facedet.data.folder import image_files

    try:
        if teacher is None:
            result = labelled_ap(loaded.model, images_dir, _size_multiple(loaded.family), where)
            source = f"labelled faces from {images_dir / 'label.txt'}"
        else:
            reference = _open_runnable(teacher, registry, where)
            # Both models see the same padded photo, so it must suit both families.
            multiple = math.lcm(_size_multiple(loaded.family), _size_multiple(reference.family))
            result = agreement_ap(loaded.model, reference.model, image_files(images_dir), size_multiple=multiple,
                                  device=where)
            source = f"reference faces from {teacher}"
    except DataError as err:  # the folder, a photo, a label file, no face at all
        raise UsageError(str(err)) from err
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result)))
    else:
        kind = "agreement AP" if teacher is not None else "AP"
        click.echo(f"{kind} {result.ap:.4f} on {result.images} photos ({result.reference_faces} {source})")


@click.command("detect")
@click.argument("model", metavar="CHECKPOINT")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The annotated PNG it writes.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Score threshold.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, metavar="N",
              help="Refuse larger images (after padding to the family's size multiple, if it has one), checked "
                   "from the header before decoding. Default: $COMPRESSOR_MAX_PIXELS, else 40,000,000.")
@device_option
@plugin_option
@json_option
@handle_errors
def detect_command(model: str, image: Path, out_path: Path, threshold: float, max_pixels: int | None, device: str,
                   plugins: tuple[str, ...], as_json: bool) -> None:
    """Detect faces in one image at its own size; draw boxes, scores and landmarks into a PNG.

    Any common format (JPEG, PNG 8/16-bit, grayscale, RGBA, palette, BMP,
    WebP, ...) is read as 8-bit RGB.  The image is padded bottom/right only
    when the model's family needs sides of a multiple (FeatherFace: 32).
    The model may be a .onnx file from `compress export` (run by ONNX Runtime
    on the CPU; one exported without --dynamic takes only its own input size).
    """
    from torchvision.io import encode_png
    from torchvision.utils import draw_bounding_boxes, draw_keypoints

    from facedet.data.images import MAX_PIXELS_ENV, ImageError, read_image
    from facedet.detect import detect
    from facedet.preprocess import pad_to_multiple, to_network_input

    where = resolve_device(device)
    loaded = _open_runnable(model, registry_from(click.get_current_context(), plugins), where)
    multiple = _size_multiple(loaded.family)
    try:
        # The network sees the image padded to the family's multiple: that is what the limit bounds.
        picture = read_image(image, max_pixels, multiple=multiple,
                             hint=f"--max-pixels or {MAX_PIXELS_ENV} raise it")
    except ImageError as err:
        raise UsageError(str(err)) from err
    height, width = picture.shape[-2:]
    # pad_to_multiple leaves the image as it is for a multiple of 1; image_sizes clips boxes to the image.
    found = detect(loaded.model.to(where), pad_to_multiple(to_network_input(picture), multiple).to(where),
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
