"""Hostile inputs to the data side: prediction and ground-truth files, dataset roots, images.

The promise: one line ``error: ...`` naming the file (and line) and what is
wrong, exit 2, no traceback, nothing written.  Each class is tried with
several members, through the CLI where the promise is about the CLI.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from click.testing import CliRunner
from PIL import Image

from compressor.cli import cli
from compressor.errors import UsageError
from compressor_plugins.featherface_family import FAMILY
from featherface import featherface_baseline
from facedet.data import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    DataError,
    FaceDataset,
    ImageError,
    read_image,
)

TOY = Path(__file__).parent / "fixtures" / "toy_passes.py"
EVENT, IMAGE_A, IMAGE_B = "0--Parade", "0_Parade_a", "0_Parade_b"


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


def one_line_error(result, *names: str, code: int = 2) -> str:
    """The single ``error:`` line, checked to name every one of ``names``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ------------------------------------------------------------------ fixtures


def copy_of(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "root"))


def images_of(root: Path, split: str) -> list[Path]:
    return sorted((root / split / "images").rglob("*.jpg"))


def train_recipe(tmp_path: Path, root: Path, batch_size: int = 2) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {{family: featherface}}\ninput_size: 64\nseed: 2\ndata: {{root: {root}}}\n"
                    f"train: {{steps: 1, batch_size: {batch_size}, lr: 0.001, warmup_steps: 0, checkpoint_every: 1}}\n")
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png16_rgb(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
                     + _chunk(b"IEND", b""))
    return path


def write_huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 8×8 PNG whose IHDR then declares width × height (CRC fixed): a few hundred bytes."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def corrupt_png_data(flip_at: float = 1.0) -> bytes:
    """A PNG whose IDAT (zlib) data is damaged, its chunk CRC fixed: torchvision 0.29's decode_image
    segfaults on these ("libpng error: IDAT: incorrect data check")."""
    buffer = io.BytesIO()
    Image.fromarray(_rgb()).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4:start])[0]
    data[start + 4 + min(int(length * flip_at), length - 1)] ^= 0x55
    data[start + 4 + length:start + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 4 + length])))
    return bytes(data)


def write_huge_jpeg(path: Path, width: int, height: int) -> Path:
    """A valid small JPEG whose frame header (SOF0) then declares width × height."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="JPEG", quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


# ------------------------------------------------------------------ 1. evaluation input


def _cell(items: list) -> np.ndarray:
    """A MATLAB column cell array, as scipy.io writes and reads it."""
    cell = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        cell[i, 0] = item
    return cell


GT_FACES = {IMAGE_A: [[10, 10, 20, 20]], IMAGE_B: [[5, 5, 8, 8], [40, 40, 30, 30]]}


def write_gt(folder: Path, faces: dict[str, list] = GT_FACES, **override: dict) -> Path:
    """A tiny but complete WIDER FACE ground truth (one event); ``override`` replaces a file's variables."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(faces)
    main = {
        "event_list": _cell([EVENT]),
        "file_list": _cell([_cell(names)]),
        "face_bbx_list": _cell([_cell([np.array(faces[n], dtype=np.float64).reshape(-1, 4) for n in names])]),
    }
    keep = {"gt_list": _cell([_cell([np.arange(1, len(faces[n]) + 1, dtype=np.uint8).reshape(-1, 1)
                                     for n in names])])}
    files = {"wider_face_val.mat": main, **{f"wider_{s}_val.mat": keep for s in ("easy", "medium", "hard")}}
    for name, variables in files.items():
        scipy.io.savemat(folder / name, override.get(name, variables))
    return folder


def write_predictions(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def prediction(image: str, *lines: str) -> str:
    return "\n".join([image, str(len(lines)), *lines]) + "\n"


PERFECT = {
    f"{EVENT}/{IMAGE_A}.txt": prediction(IMAGE_A, "10 10 20 20 0.9"),
    f"{EVENT}/{IMAGE_B}.txt": prediction(IMAGE_B, "5 5 8 8 0.8", "40 40 30 30 0.7"),
}


def eval_widerface(pred: Path, gt: Path):
    return invoke("eval-widerface", "--pred", str(pred), "--gt", str(gt), "--json")


def test_the_tiny_ground_truth_is_valid(tmp_path):
    result = eval_widerface(write_predictions(tmp_path / "pred", PERFECT), write_gt(tmp_path / "gt"))
    assert result.exit_code == 0, result.output
    assert '"easy": 1.0' in result.output


@pytest.mark.parametrize(("files", "expected"), [
    ({}, "no prediction files found"),
    ({"notes.md": "hello"}, "no prediction files found"),
    ({f"{EVENT}/readme.md": "x"}, "no prediction files found"),
    ({f"{IMAGE_A}.txt": PERFECT[f"{EVENT}/{IMAGE_A}.txt"]}, "directly in"),
    ({**PERFECT, "stray.txt": "stray\n0\n"}, "directly in"),
    ({f"pred0/{EVENT}/{IMAGE_A}.txt": PERFECT[f"{EVENT}/{IMAGE_A}.txt"]}, "one level deeper"),
    ({**PERFECT, f"{EVENT}/sub/{IMAGE_A}.txt": "x"}, "folder inside event folder"),
])
def test_prediction_folder_not_in_the_event_layout(tmp_path, files, expected):
    pred = write_predictions(tmp_path / "pred", files)
    line = one_line_error(eval_widerface(pred, write_gt(tmp_path / "gt")), str(pred))
    assert expected in line and "<event>/<image>.txt" in line


@pytest.mark.parametrize(("box", "expected"), [
    ("1 2 -3 4 0.5", "negative width or height"),
    ("1 2 3 -0.1 0.5", "negative width or height"),
    ("1 2 3 4 nan", "non-finite"),
    ("1 2 inf 4 0.5", "non-finite"),
    ("1 2 3 4 1e999", "non-finite"),
    ("1 2 three 4 0.5", "non-numeric"),
    ("1 2 3 4 0.5 7", "expected 5 values"),
])
def test_bad_prediction_line_names_file_and_line(tmp_path, box, expected):
    files = {**PERFECT, f"{EVENT}/{IMAGE_B}.txt": prediction(IMAGE_B, "5 5 8 8 0.8", box)}
    line = one_line_error(eval_widerface(write_predictions(tmp_path / "pred", files), write_gt(tmp_path / "gt")),
                          f"{IMAGE_B}.txt", "line 4")
    assert expected in line


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    IMAGE_B.encode() + b"\n1\n1 2 3 4 0.\xe9\n",  # latin-1, not UTF-8
    IMAGE_B.encode() + b"\n1\n1 2 3 4 0.5\x00\n",
])
def test_binary_prediction_file_is_named(tmp_path, content):
    files = {**PERFECT, f"{EVENT}/{IMAGE_B}.txt": content}
    line = one_line_error(eval_widerface(write_predictions(tmp_path / "pred", files), write_gt(tmp_path / "gt")),
                          f"{IMAGE_B}.txt", "line ")
    assert "binary" in line


@pytest.mark.parametrize(("files", "expected"), [
    ({f"{EVENT}/other.txt": prediction("other")}, "none of the 1 prediction files"),
    ({f"9--Press/{IMAGE_A}.txt": prediction(IMAGE_A)}, "none of the 1 prediction files"),
    ({**PERFECT, f"{EVENT}/other.txt": prediction("other")}, "other.txt: image 'other' is not in event"),
    ({**PERFECT, f"0--Parde/{IMAGE_A}.txt": prediction(IMAGE_A)}, "did you mean '0--Parade'"),
])
def test_predictions_for_images_the_ground_truth_does_not_know(tmp_path, files, expected):
    line = one_line_error(eval_widerface(write_predictions(tmp_path / "pred", files), write_gt(tmp_path / "gt")),
                          "wider_face_val.mat")
    assert expected in line


def _no_face_bbx():
    return {"event_list": _cell([EVENT]), "file_list": _cell([_cell([IMAGE_A, IMAGE_B])])}


def _event_list_numbers():
    return {"event_list": np.zeros(3), "file_list": np.zeros(3), "face_bbx_list": np.zeros(3)}


def _boxes_not_n_by_4():
    return {"event_list": _cell([EVENT]), "file_list": _cell([_cell([IMAGE_A, IMAGE_B])]),
            "face_bbx_list": _cell([_cell([np.zeros((1, 3)), np.zeros((1, 4))])])}


def _too_few_images():
    return {"event_list": _cell([EVENT]), "file_list": _cell([_cell([IMAGE_A, IMAGE_B])]),
            "face_bbx_list": _cell([_cell([np.ones((1, 4))])])}


def _index_out_of_range():
    return {"gt_list": _cell([_cell([np.array([[1]], np.uint8), np.array([[3]], np.uint8)])])}


@pytest.mark.parametrize(("file", "variables", "expected"), [
    ("wider_face_val.mat", _no_face_bbx, "no variable 'face_bbx_list'"),
    ("wider_face_val.mat", lambda: {"something": np.zeros(2)}, "no variable 'event_list'"),
    ("wider_easy_val.mat", lambda: {"foo": np.zeros(3)}, "no variable 'gt_list'"),
    ("wider_face_val.mat", _event_list_numbers, "event_list: expected a cell array"),
    ("wider_face_val.mat", _boxes_not_n_by_4, "expected N×4 boxes"),
    ("wider_face_val.mat", _too_few_images, "1 entries for 2 images"),
    ("wider_hard_val.mat", _index_out_of_range, "face indices must be whole numbers 1..2"),
])
def test_keyless_or_misshapen_ground_truth(tmp_path, file, variables, expected):
    gt = write_gt(tmp_path / "gt", **{file: variables()})
    line = one_line_error(eval_widerface(write_predictions(tmp_path / "pred", PERFECT), gt), str(gt / file))
    assert expected in line


@pytest.mark.parametrize("corrupt", [
    lambda data: data[:len(data) // 2],  # truncated
    lambda data: data[:100],
    lambda data: b"",
    lambda data: b"this is not a MATLAB file at all\n" * 20,
    lambda data: bytes(range(256)) * 8,
])
@pytest.mark.parametrize("file", ["wider_face_val.mat", "wider_medium_val.mat"])
def test_corrupt_ground_truth_file(tmp_path, corrupt, file):
    gt = write_gt(tmp_path / "gt")
    (gt / file).write_bytes(corrupt((gt / file).read_bytes()))
    line = one_line_error(eval_widerface(write_predictions(tmp_path / "pred", PERFECT), gt), str(gt / file))
    assert "MATLAB" in line or "no variable" in line


def test_reference_ground_truth_refuses_unknown_images(reference_dir, tmp_path):
    gt = reference_dir / "widerface_eval" / "ground_truth"
    pred = write_predictions(tmp_path / "pred", {f"{EVENT}/{IMAGE_A}.txt": prediction(IMAGE_A, "1 2 3 4 0.5")})
    one_line_error(eval_widerface(pred, gt), str(pred), "wider_face_val.mat", "none of the 1 prediction files")


# ------------------------------------------------------------------ 2. data roots


def _empty(path: Path) -> None:
    path.write_text("")


def _binary(path: Path) -> None:
    path.write_bytes(b"# ok.jpg\n" + bytes(range(256)))


def _nul(path: Path) -> None:
    path.write_bytes(b"# ok.jpg\n1 2 3 4\x00\n")


def _latin1(path: Path) -> None:
    path.write_bytes("# caf\xe9.jpg\n1 2 3 4\n".encode("latin-1"))


def _no_faces(path: Path) -> None:
    path.write_text("# a.jpg\n1 2 0 0\n# b.jpg\n")


def _no_images(path: Path) -> None:
    path.write_text("1 2 3 4\n5 6 7 8\n")


def _missing(path: Path) -> None:
    path.unlink()
    (path.parent / "wider_val.txt").unlink(missing_ok=True)


def _escape(path: Path) -> None:
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#"))
    lines[first] = "# ../../../outside.jpg"
    path.write_text("\n".join(lines) + "\n")


LABEL_DAMAGE = {
    "escape": (_escape, "line 1: image path '../../../outside.jpg' leaves the split's images/ folder"),
    "empty": (_empty, "empty file"),
    "binary": (_binary, "line 3: not UTF-8"),  # bytes(range(256)) holds a newline before 0x80
    "nul": (_nul, "line 2: NUL byte"),
    "latin1": (_latin1, "line 1: not UTF-8"),
    "no_faces": (_no_faces, "no usable face annotation; line 2: box of non-positive size"),
    "no_images": (_no_images, "line 1: face line before any '# image' line"),
    "missing": (_missing, "neither label.txt nor wider_val.txt"),
}


@pytest.mark.parametrize("damage", list(LABEL_DAMAGE))
def test_train_refuses_a_bad_train_label_file(tiny_embedded, tmp_path, damage):
    root = copy_of(tiny_embedded, tmp_path)
    corrupt, expected = LABEL_DAMAGE[damage]
    corrupt(root / "train" / "label.txt")
    out = tmp_path / "out"
    line = one_line_error(invoke("train", str(train_recipe(tmp_path, root)), "--out", str(out), "--quiet"),
                          str(root / "train"))
    assert expected in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("damage", list(LABEL_DAMAGE))
def test_eval_refuses_a_bad_val_label_file(tiny_embedded, checkpoint, tmp_path, damage):
    root = copy_of(tiny_embedded, tmp_path)
    corrupt, expected = LABEL_DAMAGE[damage]
    corrupt(root / "val" / "label.txt")
    pred = tmp_path / "pred"
    result = invoke("eval", str(checkpoint), "--data", str(root), "--input-size", "64", "--save-predictions", str(pred))
    assert expected in one_line_error(result, str(root / "val"))
    assert not pred.exists()


def _garbage(path: Path) -> None:
    path.write_bytes(b"not an image at all")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _html(path: Path) -> None:
    path.write_text("<html>404 not found</html>")


@pytest.mark.parametrize("damage", [_garbage, _truncate, _html, Path.unlink])
def test_a_split_without_a_decodable_image(tiny_embedded, checkpoint, tmp_path, damage):
    root = copy_of(tiny_embedded, tmp_path)
    for split in ("train", "val"):
        for image in images_of(root, split):
            damage(image)
    line = one_line_error(invoke("train", str(train_recipe(tmp_path, root)), "--out", str(tmp_path / "out"),
                                 "--quiet"), str(root / "train"))
    assert "none of the 4 images listed in label.txt could be decoded" in line
    line = one_line_error(invoke("eval", str(checkpoint), "--data", str(root), "--input-size", "64"), str(root / "val"))
    assert "none of the 2 images" in line


def test_a_missing_images_folder_or_split(tiny_embedded, checkpoint, tmp_path):
    root = copy_of(tiny_embedded, tmp_path)
    shutil.rmtree(root / "val" / "images")
    one_line_error(invoke("eval", str(checkpoint), "--data", str(root), "--input-size", "64"),
                   str(root / "val" / "images"), "folder not found")
    shutil.rmtree(root / "val")
    one_line_error(invoke("eval", str(checkpoint), "--data", str(root), "--input-size", "64"), str(root), "no val/")


def test_an_undecodable_image_is_skipped_and_counted(tiny_embedded, checkpoint, tmp_path, caplog):
    root = copy_of(tiny_embedded, tmp_path)
    bad = images_of(root, "val")[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = invoke("eval", str(checkpoint), "--data", str(root), "--input-size", "64", "--json")
    assert result.exit_code == 0, result.output
    assert '"val_images": 1.0' in result.output
    with caplog.at_level(logging.WARNING, logger="facedet.data.widerface"):
        dataset_ = FaceDataset(root, "val")
    assert len(dataset_) == 1 and dataset_.skipped == [bad]
    assert any(str(bad) in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("batch_size", [5, 64])
def test_a_batch_larger_than_the_data_set(tiny_embedded, tmp_path, batch_size):
    line = one_line_error(invoke("train", str(train_recipe(tmp_path, tiny_embedded, batch_size)), "--out",
                                 str(tmp_path / "out"), "--quiet"), str(tiny_embedded / "train"))
    assert f"4 usable images, fewer than {batch_size}: one batch of batch_size {batch_size}" in line
    assert not (tmp_path / "out").exists()


def test_finetuning_in_a_run_refuses_bad_data_in_one_line(tiny_embedded, tmp_path):
    root = copy_of(tiny_embedded, tmp_path)
    (root / "train" / "label.txt").write_bytes(b"\xff\xfe\x00binary")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"model: {{family: featherface}}\nplugins: [{TOY}]\ninput_size: 64\nseed: 1\ndata: {{root: {root}}}\n"
                      "finetune: {steps: 2, batch_size: 2}\nstages:\n  - pass: identity\n")
    out = tmp_path / "run"
    one_line_error(invoke("run", str(recipe), "--out", str(out), "--quiet"), str(root / "train" / "label.txt"))
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_family_training_batches_checks_eagerly_and_raises_usage_errors(tiny_embedded, tmp_path):
    root = copy_of(tiny_embedded, tmp_path)
    with pytest.raises(UsageError, match="batch_size 5"):
        FAMILY.training_batches(root, (64, 64), 5, seed=0)  # no next(): the check is at creation
    (root / "train" / "label.txt").write_text("")
    with pytest.raises(UsageError, match="label.txt: empty file"):
        FAMILY.training_batches(root, (64, 64), 2, seed=0)
    with pytest.raises(UsageError, match="no such folder|dataset root not found"):
        FAMILY.training_batches(tmp_path / "nowhere", (64, 64), 2, seed=0)


def test_family_batches_turn_a_later_data_error_into_a_usage_error(tiny_embedded, tmp_path):
    root = copy_of(tiny_embedded, tmp_path)
    batches = FAMILY.training_batches(root, (64, 64), 2, seed=0)
    images, targets = next(batches)
    assert images.shape == (2, 3, 64, 64) and len(targets) == 2
    for image in images_of(root, "train"):  # broken after the check: found at the next batch
        image.write_bytes(b"gone")
    with pytest.raises(UsageError, match="no image could be decoded"):
        for _ in range(4):
            next(batches)


def test_family_evaluate_raises_usage_errors(tiny_embedded, tmp_path):
    root = copy_of(tiny_embedded, tmp_path)
    (root / "val" / "label.txt").write_bytes(bytes(range(256)))
    with pytest.raises(UsageError, match=r"val/label\.txt: line 2: not UTF-8"):
        FAMILY.evaluate(featherface_baseline().eval(), root, (64, 64))


def test_a_val_split_without_faces_is_refused(tiny_embedded, checkpoint, tmp_path):
    root = copy_of(tiny_embedded, tmp_path)
    (root / "val" / "label.txt").unlink()  # only wider_val.txt is left: images without ground truth
    line = one_line_error(invoke("eval", str(checkpoint), "--data", str(root), "--input-size", "64"),
                          str(root / "val"))
    assert "has a face annotation" in line


# ------------------------------------------------------------------ 3. images


def _rgb(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(("name", "mode"), [
    ("rgb.jpg", "RGB"), ("gray.jpg", "L"), ("cmyk.jpg", "CMYK"),
    ("rgb.png", "RGB"), ("gray.png", "L"), ("rgba.png", "RGBA"), ("palette.png", "P"), ("bw.png", "1"),
    ("la.png", "LA"), ("rgb.bmp", "RGB"), ("palette.bmp", "P"), ("rgb.gif", "P"), ("rgb.tiff", "RGB"),
    ("rgb.webp", "RGB"), ("rgba.webp", "RGBA"),
])
def test_every_common_format_decodes_to_8_bit_rgb(tmp_path, name, mode):
    if name.endswith(".webp"):
        from PIL import features

        if not features.check("webp"):
            pytest.skip("PIL without WebP")
    path = tmp_path / name
    Image.fromarray(_rgb()).convert(mode).save(path)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 56)
    if name in ("rgb.png", "rgb.bmp", "rgb.tiff"):  # lossless: exactly the pixels
        assert torch.equal(image, torch.from_numpy(_rgb()).permute(2, 0, 1))


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    gray = tmp_path / "gray16.png"
    Image.fromarray(values).save(gray)
    assert Image.open(gray).mode.startswith("I;16")
    assert read_image(gray)[:, 0].tolist() == [[0, 1, 128, 255]] * 3
    rgb = write_png16_rgb(tmp_path / "rgb16.png", np.stack([values, values // 2, 65535 - values], axis=-1))
    decoded = read_image(rgb)
    assert decoded.dtype == torch.uint8
    assert decoded[:, 0].tolist() == [[0, 1, 128, 255], [0, 0, 64, 127], [255, 254, 127, 0]]


def test_detect_draws_on_16_bit_and_unusual_pngs(checkpoint, tmp_path):
    samples = {
        "gray16.png": lambda p: Image.fromarray((_rgb()[..., 0].astype(np.uint16) * 257)).save(p),
        "rgb16.png": lambda p: write_png16_rgb(p, _rgb().astype(np.uint16) * 257),
    }
    for name, write in samples.items():
        write(tmp_path / name)
        out = tmp_path / f"out-{name}.png"
        result = invoke("detect", str(checkpoint), str(tmp_path / name), "--out", str(out), "--threshold", "0.99")
        assert result.exit_code == 0, (name, result.output)
        with Image.open(out) as drawn:
            assert drawn.mode == "RGB" and drawn.size == (56, 40)


@pytest.mark.parametrize(("name", "width", "height"), [
    ("square.png", 20_000, 20_000),
    ("wide.png", 1_000_000, 100),
    ("thin.png", 40_000_000, 1),  # within the limit unpadded; 32 rows once padded
    ("huge.jpg", 60_000, 60_000),
    ("just-over.jpg", 8_000, 5_000),
])
def test_detect_refuses_huge_images_from_the_header(checkpoint, tmp_path, monkeypatch, name, width, height):
    import torchvision.io

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image that is over the limit")

    monkeypatch.setattr(torchvision.io, "decode_image", no_decoding)
    path = (write_huge_png if name.endswith(".png") else write_huge_jpeg)(tmp_path / name, width, height)
    assert path.stat().st_size < 2_000
    out = tmp_path / "annotated.png"
    line = one_line_error(invoke("detect", str(checkpoint), str(path), "--out", str(out)), str(path))
    assert "image too large" in line and f"over the limit of {DEFAULT_MAX_PIXELS:,}" in line
    assert "--max-pixels" in line and MAX_PIXELS_ENV in line
    assert not out.exists()


def test_the_pixel_limit_is_overridable(checkpoint, tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(_rgb()).save(path)
    out = tmp_path / "annotated.png"
    line = one_line_error(invoke("detect", str(checkpoint), str(path), "--out", str(out), "--max-pixels", "1000"),
                          str(path))
    assert "padded to width 64, height 64 = 4,096 pixels, over the limit of 1,000" in line
    one_line_error(invoke("detect", str(checkpoint), str(path), "--out", str(out), env={MAX_PIXELS_ENV: "1000"}),
                   str(path), "over the limit of 1,000")
    line = one_line_error(invoke("detect", str(checkpoint), str(path), "--out", str(out),
                                 env={MAX_PIXELS_ENV: "many"}), MAX_PIXELS_ENV)
    assert "'many'" in line and not out.exists()
    result = invoke("detect", str(checkpoint), str(path), "--out", str(out), "--max-pixels", "4096",
                    env={MAX_PIXELS_ENV: "10"})  # the option wins over the environment
    assert result.exit_code == 0, result.output
    huge = write_huge_png(tmp_path / "huge.png", 20_000, 20_000)
    with pytest.raises(ImageError, match="= 400,000,000 pixels, over the limit of 399,999,999") as info:
        read_image(huge, 400_000_000 - 1)
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("content", [
    b"", b"hello", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff", b"\xff\xd8\x00\x00",
    b"BM" + b"\x00" * 60, b"GIF89a\x00", "corrupt IDAT end", "corrupt IDAT middle",
])
def test_detect_refuses_broken_images_in_one_line(checkpoint, tmp_path, content):
    if content == "corrupt IDAT end":
        content = corrupt_png_data(1.0)
    elif content == "corrupt IDAT middle":
        content = corrupt_png_data(0.5)
    path = tmp_path / "broken.img"
    path.write_bytes(content)
    out = tmp_path / "annotated.png"
    one_line_error(invoke("detect", str(checkpoint), str(path), "--out", str(out)), str(path))
    assert not out.exists()


def test_the_data_layer_honours_the_pixel_limit(tiny_embedded, tmp_path, monkeypatch, caplog):
    root = copy_of(tiny_embedded, tmp_path)
    first, *rest = images_of(root, "train")
    write_huge_png(first, 20_000, 20_000)  # a PNG under a .jpg name: the content decides
    big = Image.fromarray(_rgb(48, 80))
    big.save(rest[0], format="PNG")  # 80 wide: padded to an 80×80 square = 6,400 pixels
    # 16-bit images are read as 8 bits in the data set too.
    write_png16_rgb(rest[1], _rgb(64, 64).astype(np.uint16) * 257)
    dataset_ = FaceDataset(root, "train")
    assert first in dataset_.skipped and len(dataset_) == 3
    damaged = rest[2].read_bytes()
    rest[2].write_bytes(corrupt_png_data())  # would crash the process through torchvision
    assert rest[2] in FaceDataset(root, "train").skipped
    rest[2].write_bytes(damaged)
    image, _ = dataset_[dataset_.samples.index(next(s for s in dataset_.samples if s.image.endswith(rest[1].name)))]
    assert image.dtype == torch.uint8

    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    assert {first, rest[0]} <= set(FaceDataset(root, "train").skipped)
    monkeypatch.setenv(MAX_PIXELS_ENV, "10")
    with pytest.raises(DataError, match="none of the 4 images .* over the limit of 10 "):
        FaceDataset(root, "train")
    monkeypatch.setenv(MAX_PIXELS_ENV, "-3")
    with pytest.raises(UsageError, match=MAX_PIXELS_ENV):
        FAMILY.training_batches(root, (64, 64), 2, seed=0)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    one_line_error(invoke("train", str(train_recipe(tmp_path, root, batch_size=4)), "--out", str(tmp_path / "out"),
                          "--quiet"), "3 usable images (1 more could not be decoded), fewer than 4")


def test_read_image_names_the_file_for_directories_and_missing_files(tmp_path):
    with pytest.raises(ImageError, match=f"{tmp_path}: not a regular file"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="nope.png: no such file"):
        read_image(tmp_path / "nope.png")
    os.mkfifo(tmp_path / "fifo.png") if hasattr(os, "mkfifo") else None
    if (tmp_path / "fifo.png").exists():
        with pytest.raises(ImageError, match="not a regular file"):
            read_image(tmp_path / "fifo.png")
