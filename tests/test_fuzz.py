"""A seeded, bounded fuzz of recipes and command-line arguments against the CLI's promise.

The promise: every input ends either in success or in exactly one line on stderr
(`error: ...`) with exit code 2 for bad input, never a traceback, never another
exit code, and nothing written where the command was not told to write.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml
from click.testing import CliRunner

from compressor.cli import cli

SEED = 20261201
RECIPE_CASES = 160
ARGUMENT_CASES = 80

HOSTILE_VALUES = [
    None, True, -1, 0, 1, 2**31, 2**64, -(2**63), 1e300, -1e300, 1e-300, float("nan"), float("inf"), "", " ",
    "x" * 500, "../../etc/passwd", "/proc/self/mem", "a\x00b", "ünï©ødé", "${HOME}", "{{7*7}}", "1e10", "0x10",
    [], [1, 2, 3], [[[]]], {}, {"a": {"b": {"c": {}}}}, {"pass": "prune"}, 0.5, 1.5, -0.5, "prune", "identity",
]
FIELDS = [
    ("model",), ("model", "family"), ("model", "checkpoint"), ("model", "pretrained"), ("input_size",), ("seed",),
    ("plugins",), ("data",), ("data", "root"), ("finetune",), ("finetune", "lr"), ("finetune", "steps"),
    ("finetune", "batch_size"), ("finetune", "milestones"), ("finetune", "teacher"), ("finetune", "schedule"),
    ("stages",), ("stages", 0), ("stages", 0, "pass"), ("stages", 0, "name"), ("stages", 0, "params"),
    ("stages", 0, "params", "ratios"), ("stages", 0, "params", "ratios", "backbone"), ("stages", 0, "params", "ratio"),
    ("stages", 0, "until"), ("stages", 0, "until", "max_repeats"), ("stages", 0, "budget", "components"),
    ("stages", 0, "finetune", "lr"), ("budget",), ("budget", "total"), ("budget", "components", "ssh"),
    ("budget", "max_accuracy_drop"), ("unknown_key",), ("stages", 0, "unknown_key"),
]
BASE = {
    "model": {"family": "featherface"},
    "input_size": 64,
    "seed": 0,
    "finetune": {"steps": 1, "lr": 0.001},
    "stages": [{"pass": "prune", "name": "p", "params": {"ratios": {"backbone": 0.1}}, "until": {"total": 600000}}],
    "budget": {"total": 600000},
}


def _set(data: dict, path: tuple, value: object) -> None:
    node = data
    for part in path[:-1]:
        if isinstance(part, int):
            if not isinstance(node, list) or not node:
                return
            node = node[0]
        else:
            if not isinstance(node, dict):
                return
            node = node.setdefault(part, {})
    if isinstance(node, dict) and not isinstance(path[-1], int):
        node[path[-1]] = value
    elif isinstance(node, list) and node:
        node[0] = value


def _recipe_text(rng: random.Random) -> str | bytes:
    kind = rng.random()
    if kind < 0.08:  # raw bytes: binary, truncated YAML, odd encodings
        return rng.choice([bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))), b"stages: [", b"\xff\xfe",
                           "seed: 1\n".encode("utf-16"), b"a: b: c", b"- - - -", b"{" * 400])
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for _ in range(rng.randint(1, 4)):
        _set(data, rng.choice(FIELDS), rng.choice(HOSTILE_VALUES))
    text = yaml.safe_dump(data, allow_unicode=True)
    if rng.random() < 0.1:  # a duplicated top-level line
        lines = text.splitlines()
        text = "\n".join([*lines, rng.choice(lines)]) + "\n"
    return text


def _check_promise(result, where: str) -> None:
    assert result.exit_code in (0, 2), f"{where}: exit {result.exit_code}: {result.output[-500:]}"
    assert "Traceback" not in result.output, f"{where}: {result.output[-1000:]}"
    if result.exit_code == 2:
        lines = [line for line in result.output.splitlines() if line.strip()]
        # click's own usage errors are "Usage: ... / Try ... / Error: ..."; ours are one "error: " line.
        assert (len(lines) == 1 and lines[0].startswith("error: ")) or any(
            line.startswith("Error: ") for line in lines), f"{where}: {result.output!r}"


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def test_fuzzed_recipes_keep_the_promise(tmp_path, monkeypatch):
    rng = random.Random(SEED)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    outcomes = {0: 0, 2: 0}
    for case in range(RECIPE_CASES):
        path = tmp_path / f"case{case}.yaml"
        text = _recipe_text(rng)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        before = _files(tmp_path)
        result = runner.invoke(cli, ["validate", str(path)])
        _check_promise(result, f"case {case} ({path.name})")
        assert _files(tmp_path) == before, f"case {case}: validate wrote files"
        outcomes[result.exit_code] += 1
    assert outcomes[2] > RECIPE_CASES // 2  # most mutations are hostile; the fuzz is not vacuous


def _arguments(rng: random.Random, tmp_path: Path) -> list[str]:
    command = rng.choice(["validate", "inspect", "passes", "families", "eval", "sensitivity", "run", "train"])
    junk = ["", "-", "--", "x" * 300, "../../..", "/proc/self/mem", str(tmp_path / "missing.yaml"), "-1", "nan",
            "64x", "x64", "0x0", "7", "99999x99999", "64x64x64", "featherface", "no:featherface", "ünï©ødé"]
    # (No NUL bytes: an operating system cannot pass one in argv; recipes can, and the recipe fuzz has them.)
    options = {
        "inspect": ["--input-size", "--latency-runs", "--threads", "--device", "--plugin"],
        "validate": ["--set", "--plugin"],
        "passes": ["--plugin"],
        "families": ["--plugin"],
        "eval": ["--input-size", "--data", "--device", "--save-predictions"],
        "sensitivity": ["--ratios", "--components", "--input-size", "--device"],
        "run": ["--set", "--device", "--out"],
        "train": ["--set", "--device", "--out"],
    }[command]
    args = [command]
    if command in ("validate", "run", "train"):
        args.append(rng.choice(junk[:8]))
    elif command in ("inspect", "eval", "sensitivity") and rng.random() < 0.7:
        args.append(rng.choice(junk))
    for _ in range(rng.randint(0, 3)):
        option = rng.choice(options)
        args += [option, rng.choice(junk)]
    return args


def test_fuzzed_arguments_keep_the_promise(tmp_path, monkeypatch):
    rng = random.Random(SEED + 1)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for case in range(ARGUMENT_CASES):
        args = _arguments(rng, tmp_path)
        if args[0] in ("inspect", "eval", "sensitivity") and "--input-size" not in args:
            args += ["--input-size", "bad"]  # never minutes of real work on the 640x640 baseline
        result = runner.invoke(cli, args)
        _check_promise(result, f"case {case}: {args!r}")
