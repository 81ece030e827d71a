"""The RetinaFace family: the original architecture exactly, its checkpoints, its counts."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import retinaface
from compressor import load_model
from compressor.cli import cli
from compressor.errors import UsageError
from compressor_plugins.retinaface_family import FAMILY
from facedet.original import CheckpointError
from facedet.priors import num_priors
from facedet.spec import to_spec

WEIGHTS = "retinaface_mnet025_widerface.pth"
REFERENCE = "retinaface_mnet025_reference.pt"
COMPONENTS = {"backbone": 213_072, "fpn": 103_040, "ssh": 104_256, "heads": 6_240}


def _read(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def original_state(reference_dir):
    return _read(reference_dir / WEIGHTS)


@pytest.fixture(scope="module")
def model(original_state):
    return retinaface.load_original_checkpoint(original_state)


@pytest.fixture(scope="module")
def reference(reference_dir):
    return _read(reference_dir / REFERENCE)


def test_component_counts_match_the_original():
    model = FAMILY.baseline()
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        counts[FAMILY.component_of(name)] += param.numel()
    assert counts == COMPONENTS
    assert sum(counts.values()) == 426_608


def test_reproduces_the_original_code(model, reference):
    with torch.no_grad():
        boxes, logits, landmarks = model(reference["input"])
    expected = reference["eval_outputs"]
    assert torch.allclose(boxes, expected["bbox"], atol=1e-4)
    assert torch.allclose(logits.softmax(-1), expected["conf"], atol=1e-4)
    assert torch.allclose(landmarks, expected["landmarks"], atol=1e-4)
    raw = reference["train_outputs"]  # raw logits: our forward never softmaxes
    assert torch.allclose(logits, raw["conf"], atol=1e-4)


@pytest.mark.parametrize("size", [(301, 457), (97, 161), (33, 33)])
def test_any_input_size(model, reference, size):
    """Not only multiples of 32: every level is upsampled to the finer level's exact size."""
    x = reference["input"][..., : size[0], : size[1]]
    with torch.no_grad():
        boxes, logits, landmarks = model(x)
    assert boxes.shape == (1, num_priors(size), 4)
    assert logits.shape == (1, num_priors(size), 2) and landmarks.shape == (1, num_priors(size), 10)
    FAMILY.check_input_size(*size)  # accepted: no multiple required


def test_a_crop_matches_the_full_image_away_from_the_borders(model, reference):
    """The top-left 301x457 crop sees the same pixels near its origin as the full input:
    the first prior's outputs agree (conv padding only reaches the crop's far borders)."""
    with torch.no_grad():
        full = model(reference["input"])
        crop = model(reference["input"][..., :301, :457])
    assert torch.allclose(full[0][0, :2], crop[0][0, :2], atol=1e-4)


@pytest.mark.parametrize("wrap", ["bare", "module", "state_dict", "both"])
def test_checkpoint_variants(tmp_path, original_state, reference, wrap):
    state = dict(original_state)
    if wrap in ("module", "both"):
        state = {f"module.{k}": v for k, v in state.items()}
    content = {"state_dict": state} if wrap in ("state_dict", "both") else state
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    loaded = load_model(path)
    assert isinstance(loaded, retinaface.RetinaFace)
    with torch.no_grad():
        boxes = loaded.eval()(reference["input"])[0]
    assert torch.allclose(boxes, reference["eval_outputs"]["bbox"], atol=1e-4)


def test_every_bad_key_is_named(tmp_path, original_state):
    state = dict(original_state)
    del state["fpn.merge1.0.weight"]
    state["fpn.output4.0.weight"] = torch.zeros(1)
    state["ssh2.conv3X3.0.weight"] = torch.zeros(16, 64, 3, 3)
    with pytest.raises(CheckpointError) as info:
        retinaface.load_original_checkpoint(state)
    message = str(info.value)
    for fragment in ("fpn.output4.0.weight", "fpn.merge.0.conv.weight", "ssh2.conv3X3.0.weight", "(16, 64, 3, 3)"):
        assert fragment in message
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(UsageError, match="broken.pth: not a RetinaFace"):
        load_model(path)


def test_featherface_checkpoints_are_not_taken_for_retinaface(reference_dir):
    assert load_model(reference_dir / "featherface_baseline_seed0.pt").__class__.__name__ == "FeatherFace"


def test_spec_round_trip(model, reference):
    spec = json.loads(json.dumps(to_spec(model)))
    rebuilt = FAMILY.build(spec)
    rebuilt.load_state_dict(model.state_dict())
    x = reference["input"][..., :97, :161]
    with torch.no_grad():
        for a, b in zip(model(x), rebuilt.eval()(x)):
            assert torch.equal(a, b)
    with pytest.raises(UsageError, match="not a RetinaFace"):
        FAMILY.build(to_spec(model.backbone))


def test_fpn_refuses_widths_that_cannot_be_added():
    from retinaface.modules import FPN

    with pytest.raises(ValueError, match="cannot be added"):
        FPN([64, 128, 256], [64, 32, 64], [64, 64])


def test_inspect_recognises_the_original_checkpoint(reference_dir):
    result = CliRunner().invoke(cli, ["inspect", str(reference_dir / WEIGHTS), "--json", "--input-size", "64"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["family"] == "retinaface"
    assert data["params"]["total"] == 426_608
    assert {k: data["params"]["components"][k] for k in COMPONENTS} == COMPONENTS
