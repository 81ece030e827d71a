"""NaN and Inf in weights, inputs and offsets: refused in one line naming the place, never a segfault.

torchvision's deform_conv2d reads out of bounds on a NaN offset and kills the
process (SIGSEGV, exit 139, nothing on stderr).  Whatever could reach it runs
in a subprocess here, so a crash fails a test instead of killing pytest.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.finite import all_finite, describe_non_finite, non_finite_tensors

FIXTURES = Path(__file__).parent / "fixtures"
TOY = FIXTURES / "toy_passes.py"
POISON = FIXTURES / "non_finite_passes.py"
CRASHES = {-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT, -signal.SIGILL, 139, 135, 134, 132}


def python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode not in CRASHES, f"crashed with {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def compress(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return python("import sys; from compressor.cli import main; sys.argv = ['compress', *sys.argv[1:]]; main()",
                  *args, "--quiet", timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- the helper, in-process (no DCN)


def test_non_finite_tensors_names_parameters_and_buffers():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Linear(3, 3))
    assert non_finite_tensors(model) == [] and all_finite(model.parameters())
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
        model[1].running_var[1] = float("inf")
        model[2].bias[2] = -float("inf")
    assert non_finite_tensors(model) == ["0.weight", "2.bias", "1.running_var"]  # parameters, then buffers
    assert non_finite_tensors(model, limit=1) == ["0.weight"]
    assert non_finite_tensors(model.state_dict()) == ["0.weight", "1.running_var", "2.bias"]
    assert "0.weight (1 NaN, 0 Inf of 6)" in describe_non_finite(model)
    assert not all_finite(model.parameters())


def test_huge_finite_values_are_finite():
    # A max-abs check cannot overflow; a sum or a 2-norm of these would be inf.
    model = nn.Linear(1000, 1000)
    with torch.no_grad():
        model.weight.fill_(3e38)
    assert non_finite_tensors(model) == [] and all_finite([model.weight, torch.full((4,), 6e4).half()])
    assert not all_finite([torch.tensor([1.0, float("nan")]).half()])


# ---------------------------------------------------------------- the DCN guard, in a subprocess

DCN_CASES = r"""
import json, torch, featherface
from facedet.modules.deform import DeformableConv2d
from compressor.finite import forward_error_message
torch.manual_seed(0)
results = {}

def attempt(name, module, x):
    try:
        with torch.no_grad():
            out = module(x)
        results[name] = {"ok": bool(torch.isfinite(out).all())}
    except FloatingPointError as err:
        results[name] = {"error": str(err), "what": getattr(err, "what", None),
                         "module": getattr(err, "module", None) is module,
                         "named": forward_error_message(module, err)}

x = torch.randn(1, 8, 6, 6)
for value in ("nan", "inf", "-inf"):
    bad = x.clone(); bad[0, 3, 5, 5] = float(value)
    attempt(f"input {value}", DeformableConv2d(8, 4), bad)   # fresh: zero offset weights
for part, param, value in (("offsets", "offset_conv.bias", "nan"), ("offsets", "offset_conv.weight", "-inf"),
                           ("mask", "modulator_conv.bias", "nan")):
    dcn = DeformableConv2d(8, 4)
    with torch.no_grad():
        dict(dcn.named_parameters())[param].view(-1)[0] = float(value)
    attempt(f"{part} {param} {value}", dcn, x)
dcn = DeformableConv2d(8, 4)
with torch.no_grad():
    dcn.offset_conv.weight.fill_(1e37)
attempt("overflowing offsets", dcn, x.abs() + 1)
dcn = DeformableConv2d(8, 4)
with torch.no_grad():
    dcn.offset_conv.bias.fill_(3e38)  # finite offsets whose sum overflows: far outside, samples zero
attempt("huge finite offsets", dcn, x)
model = featherface.featherface_baseline().eval()
with torch.no_grad():
    model.ssh[1].conv5x5_1.conv.offset_conv.weight.fill_(float("nan"))
try:
    with torch.no_grad():
        model(torch.randn(1, 3, 320, 320))
    results["model"] = "no error"
except FloatingPointError as err:
    results["model"] = forward_error_message(model, err)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def dcn_results() -> dict:
    done = python(DCN_CASES)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_dcn_refuses_non_finite_input(dcn_results, value):
    result = dcn_results[f"input {value}"]
    assert result["what"] == "input" and result["module"], result
    assert re.fullmatch(r"DeformableConv2d\(8, 4\): non-finite input \(\d NaN, \d Inf of 288 values\); "
                        r"refused before deform_conv2d", result["error"]), result["error"]


@pytest.mark.parametrize("case", ["offsets offset_conv.bias nan", "offsets offset_conv.weight -inf",
                                  "mask modulator_conv.bias nan"])
def test_dcn_refuses_non_finite_offsets_and_mask(dcn_results, case):
    result = dcn_results[case]
    part, param = case.split()[:2]
    assert result["what"] == part, result
    assert f"non-finite {part} (" in result["error"]
    assert f"{param.split('.')[0]}'s weights are non-finite" in result["error"]


def test_dcn_overflow_is_refused_but_huge_finite_offsets_are_not(dcn_results):
    assert "offset_conv overflowed on a finite input" in dcn_results["overflowing offsets"]["error"]
    assert dcn_results["huge finite offsets"] == {"ok": True}


def test_dcn_error_is_named_in_the_model(dcn_results):
    assert re.match(r"ssh\.1\.conv5x5_1\.conv: DeformableConv2d\(\d+, \d+\): non-finite offsets",
                    dcn_results["model"]), \
        dcn_results["model"]


# ---------------------------------------------------------------- the training loop, called directly

TRAIN_CASES = r"""
import copy, json, sys, torch, featherface
from pathlib import Path
from compressor.errors import CheckFailed
from compressor.recipe import TrainConfig
from compressor.train import train
from compressor_plugins.featherface_family import FAMILY

data = Path(sys.argv[1])
results = {}

def finite(model):
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())

def case(name, model, **settings):
    # model_construct: no recipe validation, which refuses such learning rates
    config = TrainConfig.model_construct(**{**TrainConfig().model_dump(), "steps": 6, "batch_size": 2,
                                            "checkpoint_every": 1, **settings})
    before = copy.deepcopy(model)
    checkpoints = []
    def on_checkpoint(model, state):
        checkpoints.append([state.step, finite(model)])
    torch.manual_seed(0)
    try:
        train(model, FAMILY, config, FAMILY.training_batches(data, (64, 64), 2, 1), device=torch.device("cpu"),
              on_checkpoint=on_checkpoint, where="stage 3 (demo): finetune")
        message = None
    except CheckFailed as err:
        message = str(err)
    results[name] = {"message": message, "checkpoints": checkpoints, "finite": finite(model),
                     "unchanged": all(torch.equal(a, b) for a, b in zip(before.state_dict().values(),
                                                                         model.state_dict().values()))}

case("adamw lr 1e10", featherface.featherface_baseline(), lr=1e10)
case("sgd lr 3e38", featherface.featherface_baseline(), lr=3e38, optimizer="sgd", grad_clip=None)
case("adamw lr 1e38", featherface.featherface_baseline(), lr=1e38)
nan = featherface.featherface_baseline()
with torch.no_grad():
    nan.ssh[0].conv3x3.conv.offset_conv.weight.fill_(float("nan"))
path = Path(sys.argv[2])
torch.save(nan.state_dict(), path)
loaded = featherface.featherface_baseline()
loaded.load_state_dict(torch.load(path, weights_only=True))
case("nan checkpoint", loaded, lr=1e-3)
huge = featherface.featherface_baseline()
with torch.no_grad():
    huge.ssh[2].conv3x3.conv.offset_conv.weight.fill_(1e37)
case("overflowing offsets", huge, lr=1e-3)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def train_results(small_embedded, tmp_path_factory) -> dict:
    done = python(TRAIN_CASES, small_embedded, tmp_path_factory.mktemp("nan") / "nan.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_huge_lr_stops_at_the_step_that_broke_and_keeps_finite_checkpoints(train_results):
    result = train_results["adamw lr 1e10"]
    assert re.fullmatch(r"stage 3 \(demo\): finetune: .*non-finite.* at step [2-6]/6.*"
                        r"\(learning rate \S+ too high\?\); the weights before it are kept",
                        result["message"]), result["message"]
    assert result["checkpoints"] and all(ok for _, ok in result["checkpoints"])
    assert result["finite"]


def test_weights_made_non_finite_by_a_step_are_refused_before_any_checkpoint(train_results):
    result = train_results["sgd lr 3e38"]
    assert result["message"] == ("stage 3 (demo): finetune: weights became non-finite at step 1/6 "
                                 "(learning rate 3e+38 too high?); the weights before it are kept")
    assert result["checkpoints"] == [] and result["finite"] and result["unchanged"]


def test_an_overflowing_optimiser_step_is_a_check_failure(train_results):
    result = train_results["adamw lr 1e38"]
    assert result["message"].startswith("stage 3 (demo): finetune: the optimiser step overflowed at step 1/6 "
                                        "(learning rate 1e+38 too high?)")
    assert result["checkpoints"] == [] and result["unchanged"]


def test_a_nan_checkpoint_is_refused_before_training(train_results):
    result = train_results["nan checkpoint"]
    assert result["message"].startswith("stage 3 (demo): finetune: the starting weights (step 0/6) are non-finite: "
                                        "ssh.0.conv3x3.conv.offset_conv.weight (10,368 NaN, 0 Inf of 10,368)"), \
        result["message"]
    assert result["checkpoints"] == []


def test_a_forward_refusing_non_finite_offsets_names_the_step_and_layer(train_results):
    result = train_results["overflowing offsets"]
    assert result["message"].startswith("stage 3 (demo): finetune: the forward refused non-finite values at step 1/6: "
                                        "ssh.2.conv3x3.conv: DeformableConv2d"), result["message"]
    assert "offset_conv overflowed" in result["message"] and result["unchanged"]


# ---------------------------------------------------------------- the commands, in subprocesses


def test_compress_train_that_diverges_fails_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, small_embedded):
    # Within the recipe's limits: SGD at lr 10 with weight decay 1 and no clipping blows up in a few steps.
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"model: {{family: featherface}}\ninput_size: 64\nseed: 2\ndata: {{root: {small_embedded}}}\n"
                      "train: {steps: 8, batch_size: 2, lr: 10, optimizer: sgd, weight_decay: 1, grad_clip: null, "
                      "checkpoint_every: 1}\n")
    out = tmp_path / "out"
    done = compress("train", recipe, "--out", out, "--no-eval")
    line = one_error_line(done)
    assert done.returncode == 1, line
    match = re.fullmatch(r"error: training: (weights became non-finite|the forward refused non-finite values) "
                         r"at step (\d)/8.*; the weights before it are kept", line)
    assert match, line
    failed = int(match.group(2))
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["train_state"]["step"] == failed - 1
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert not (out / "final.pt").exists()


def run_recipe(tmp_path: Path, data: Path, stages: str,
               finetune: str = "{steps: 2, batch_size: 2, lr: 0.0001}") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{family: featherface}}\nplugins: [{TOY}, {POISON}]\ninput_size: 64\nseed: 1\ndata: {{root: {data}}}\n"
                    f"finetune: {finetune}\nstages:\n{stages}")
    return path


def test_compress_run_with_an_absurd_lr_fails_in_one_line(tmp_path, small_embedded):
    path = run_recipe(tmp_path, small_embedded, "  - pass: identity\n")
    done = compress("run", path, "--out", tmp_path / "run", "--set", "finetune.lr=1e10")
    line = one_error_line(done)
    # Refused by the recipe's validation (exit 2), or by the training loop's guards (exit 1).
    assert (done.returncode == 2 and "finetune.lr" in line) or (done.returncode == 1 and "stage 1" in line), line


def test_compress_run_finetune_that_diverges_fails_its_stage(tmp_path, small_embedded):
    path = run_recipe(tmp_path, small_embedded, "  - pass: identity\n",
                      finetune="{steps: 8, batch_size: 2, lr: 10, optimizer: sgd, weight_decay: 1, grad_clip: null}")
    done = compress("run", path, "--out", tmp_path / "run", timeout=600)
    line = one_error_line(done)
    assert done.returncode == 1, line
    assert re.fullmatch(r"error: stage 1 \(identity\): finetune: .*non-finite.* at step \d/8.*", line), line


@pytest.mark.parametrize("target, value", [
    ("ssh.0.conv3x3.conv.offset_conv.weight", "nan"),      # NaN offsets: the segfault
    ("ssh.1.conv5x5_2.conv.modulator_conv.bias", "nan"),
    ("ssh.2.conv7x7_2.conv.regular_conv.weight", "inf"),
    ("ssh.0.conv3x3.bn.running_var", "inf"),               # the outputs stay finite: only a weights check sees it
])
def test_a_pass_that_writes_non_finite_weights_fails_its_stage(tmp_path, small_embedded, target, value):
    stages = f"  - pass: poison_tensor\n    params: {{target: {target}, value: '{value}', everywhere: false}}\n"
    done = compress("run", run_recipe(tmp_path, small_embedded, stages), "--out", tmp_path / "run", "--no-finetune")
    line = one_error_line(done)
    assert done.returncode == 1, line
    assert line.startswith("error: stage 1 (poison_tensor): ") and ("non-finite" in line or "NaN" in line), line
    assert not (tmp_path / "run" / "final.pt").exists()


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, small_embedded):
    from compressor.checkpoint import save_checkpoint
    from compressor_plugins.featherface_family import FAMILY

    model = FAMILY.baseline()
    with torch.no_grad():
        model.ssh[0].conv3x3.conv.offset_conv.weight.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", model, FAMILY)
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"model: {{checkpoint: {tmp_path / 'nan.pt'}}}\ninput_size: 64\ndata: {{root: {small_embedded}}}\n"
                      "train: {steps: 2, batch_size: 2}\n")
    done = compress("train", recipe, "--out", tmp_path / "out", "--no-eval")
    line = one_error_line(done)
    assert done.returncode in (1, 2) and "non-finite" in line and "offset_conv.weight" in line, line
    assert not (tmp_path / "out" / "last.pt").exists()
