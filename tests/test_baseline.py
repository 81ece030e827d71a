"""The baseline is the published FeatherFace: same numbers, same parameters, same checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import facedet.modules
import featherface
from compressor import load_model
from compressor.errors import UsageError
from facedet.original import CheckpointError, load_pretrained_backbone, translate_key
from featherface.original import RULES
from facedet.priors import num_priors
from facedet.spec import from_spec, to_spec

ATOL = 1e-4


def _read(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(reference_dir):
    return torch.load(reference_dir / "featherface_baseline_seed0.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference_model(reference):
    return featherface.load_original_checkpoint(reference["state_dict"])


def test_parameter_count_matches_original():
    model = featherface.featherface_baseline()
    assert sum(p.numel() for p in model.parameters()) == 592_371


def test_reproduces_reference_outputs(reference, reference_model):
    assert not reference_model.training
    with torch.no_grad():
        boxes, logits, landmarks = reference_model(reference["input"])
    expected = reference["eval_outputs"]
    assert torch.allclose(boxes, expected["bbox"], atol=ATOL, rtol=0)
    assert torch.allclose(logits.softmax(-1), expected["conf"], atol=ATOL, rtol=0)
    assert torch.allclose(landmarks, expected["landmarks"], atol=ATOL, rtol=0)
    raw = reference["train_outputs"]
    assert torch.allclose(logits, raw["conf"], atol=ATOL, rtol=0)
    assert torch.allclose(boxes, raw["bbox"], atol=ATOL, rtol=0)
    assert torch.allclose(landmarks, raw["landmarks"], atol=ATOL, rtol=0)
    assert reference["num_parameters"] == 592_371


def test_state_dict_keys_cover_the_original_exactly(reference_dir):
    lines = (reference_dir / "featherface_baseline_state_dict.txt").read_text().splitlines()
    original = {line.split("\t")[0]: line.split("\t")[1] for line in lines if line.strip()}
    ours = featherface.featherface_baseline().state_dict()
    translated = {translate_key(k, RULES): shape for k, shape in original.items()}
    assert None not in translated
    assert set(translated) == set(ours)
    for key, shape in translated.items():
        assert str(tuple(ours[key].shape)) == shape.replace(",)", ",)"), key


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (128, 128), (160, 224)])
def test_any_multiple_of_32_works(reference_model, size):
    x = torch.randn(1, 3, *size) * 40
    with torch.no_grad():
        boxes, logits, landmarks = reference_model(x)
    p = num_priors(size)
    assert boxes.shape == (1, p, 4) and logits.shape == (1, p, 2) and landmarks.shape == (1, p, 10)
    assert torch.isfinite(boxes).all() and torch.isfinite(logits).all()


def test_loads_prefixed_and_wrapped_checkpoints(reference, tmp_path):
    state = reference["state_dict"]
    x = reference["input"][:1]
    with torch.no_grad():
        expected = featherface.load_original_checkpoint(state)(x)[0]
    prefixed = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": prefixed, "epoch": 3}, path)
    # In memory through the family package; from a file through the engine's one checkpoint reader.
    for model in (featherface.load_original_checkpoint(prefixed),
                  featherface.load_original_checkpoint({"state_dict": state}),
                  load_model(path), load_model(str(path))):
        with torch.no_grad():
            assert torch.equal(model(x)[0], expected)


def test_missing_unexpected_and_misshapen_keys_are_named(reference):
    state = dict(reference["state_dict"])
    del state["bifpn.0.p4_w1"]
    state["extra.layer.weight"] = torch.zeros(1)
    state["ClassHead.0.conv1x1.weight"] = torch.zeros(6, 64, 1, 1)
    with pytest.raises(CheckpointError) as info:
        featherface.load_original_checkpoint(state)
    message = str(info.value)
    assert "extra.layer.weight" in message
    assert "bifpn.0.p4_w1" in message
    assert "(6, 64, 1, 1)" in message and "(4, 64, 1, 1)" in message


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(UsageError, match="junk.pth"):
        load_model(junk)
    with pytest.raises(UsageError, match="missing.pth: neither a file"):
        load_model(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        featherface.load_original_checkpoint([1, 2])


def test_other_architecture_is_refused(reference_dir):
    with pytest.raises(CheckpointError, match="unexpected keys"):
        featherface.load_original_checkpoint(_read(reference_dir / "retinaface_mnet025_widerface.pth"))


def test_pretrained_backbone(reference_dir):
    model = featherface.featherface_baseline()
    load_pretrained_backbone(model.backbone, _read(reference_dir / "mobilenetV1X0.25_pretrain.tar"))
    raw = torch.load(reference_dir / "mobilenetV1X0.25_pretrain.tar", map_location="cpu", weights_only=True)
    assert torch.equal(model.backbone.stage3[1].pointwise.weight, raw["state_dict"]["module.stage3.1.3.weight"])


def test_spec_round_trip_rebuilds_the_same_network():
    model = featherface.featherface_baseline().eval()
    spec = json.loads(json.dumps(to_spec(model)))
    rebuilt = from_spec(spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64) * 40
    with torch.no_grad():
        for a, b in zip(model(x), rebuilt(x)):
            assert torch.equal(a, b)


def test_spec_keeps_shared_modules_shared():
    model = featherface.featherface_baseline()
    gate = model.backbone_cbam[0].spatial_gate
    for attention in [*model.backbone_cbam, *model.bifpn_cbam]:
        attention.spatial_gate = gate
    spec = to_spec(model)
    assert spec["args"]["bifpn_cbam"][2]["args"]["spatial_gate"] == {"ref": "backbone_cbam.0.spatial_gate"}
    rebuilt = from_spec(spec)
    assert rebuilt.bifpn_cbam[2].spatial_gate is rebuilt.backbone_cbam[0].spatial_gate
    rebuilt.load_state_dict(model.state_dict())


def test_spec_follows_narrowed_layers():
    model = featherface.featherface_baseline()
    model.ssh[0] = facedet.modules.SSH(64, out3x3=16, mid5x5=8, out5x5=8, mid7x7=8, out7x7=8, deformable=False)
    model.shuffle[0] = featherface.modules.ChannelShuffleBlock(32, 16, 64)
    spec = to_spec(model)
    assert spec["args"]["ssh"][0]["args"]["out3x3"] == 16
    assert spec["args"]["ssh"][0]["args"]["deformable"] is False
    rebuilt = from_spec(spec)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())
