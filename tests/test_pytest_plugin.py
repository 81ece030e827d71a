"""``assert_budget`` and the pytest plugin (``compressed_model`` fixture, marker, option)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import compressor.checkpoint
import compressor.errors
import compressor.pytest_plugin
import featherface
from compressor import assert_budget
from compressor.checkpoint import save_checkpoint
from compressor_plugins.featherface_family import FAMILY

pytest_plugins = ["pytester"]

# A weight the checkpoint sets, so the user tests can tell it from a fresh baseline.
MARK_VALUE = 0.125


def _entry_point_active() -> bool:
    """True when pytest will load the plugin by itself in the inner sessions."""
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "compressor.pytest_plugin" for ep in metadata.entry_points(group="pytest11"))


# The inner sessions get the plugin from the installed entry point; only where
# that is off (autoload disabled, package not installed) is it named explicitly.
PLUGIN_ARGS = [] if _entry_point_active() else ["-p", "compressor.pytest_plugin"]


@pytest.fixture(scope="module")
def baseline() -> torch.nn.Module:
    return featherface.featherface_baseline().eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A baseline checkpoint whose first weight is set to MARK_VALUE."""
    model = featherface.featherface_baseline()
    with torch.no_grad():
        next(model.parameters()).fill_(MARK_VALUE)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, FAMILY)
    return path


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:cacheprovider", "--strict-markers", *PLUGIN_ARGS, *args)


# --- assert_budget -----------------------------------------------------------


def test_baseline_by_family_name_within_budget() -> None:
    assert_budget("featherface", total=600_000)


def test_over_budget_lists_every_limit(baseline: torch.nn.Module) -> None:
    with pytest.raises(AssertionError) as info:
        assert_budget(baseline, total=500_000, components={"ssh": 60_000, "bifpn": 100_000})
    lines = str(info.value).splitlines()
    assert lines[0] == "model over budget (3 limits):"
    assert "total = 592,371 > budget 500,000 (+92,371)" in lines[1]
    assert "ssh = 232,965 > budget 60,000 (+172,965)" in lines[2]
    assert "bifpn = 112,606 > budget 100,000 (+12,606)" in lines[3]
    assert len(lines) == 4


def test_only_exceeded_limits_are_listed(baseline: torch.nn.Module) -> None:
    with pytest.raises(AssertionError) as info:
        assert_budget(baseline, total=600_000, components={"ssh": 60_000, "heads": 10_000})
    assert str(info.value).splitlines() == [
        "model over budget (1 limit):",
        "  ssh = 232,965 > budget 60,000 (+172,965)",
    ]


def test_unknown_component_is_an_assertion_naming_it(baseline: torch.nn.Module) -> None:
    with pytest.raises(AssertionError) as info:
        assert_budget(baseline, components={"neck": 1})
    message = str(info.value)
    assert "'neck'" in message
    assert "backbone, cbam, bifpn, ssh, channel_shuffle, heads" in message


def test_macs_limit_at_small_input(baseline: torch.nn.Module) -> None:
    with pytest.raises(AssertionError) as info:
        assert_budget(baseline, macs=1_000_000, input_size=64)
    assert "macs = 12,462,352 > budget 1,000,000 (+11,462,352) at 64x64, batch 1" in str(info.value)
    assert_budget(baseline, macs=13_000_000, input_size=(64, 64))


def test_input_size_the_family_refuses(baseline: torch.nn.Module) -> None:
    with pytest.raises(compressor.errors.UsageError, match="multiples of 32"):
        assert_budget(baseline, macs=1, input_size=50)


def test_mistakes_in_the_call_are_not_budget_failures(baseline: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="at least one limit"):
        assert_budget(baseline)
    with pytest.raises(ValueError, match="invalid budget"):
        assert_budget(baseline, total=0)
    with pytest.raises(TypeError, match="nn.Module"):
        assert_budget(42, total=1)  # type: ignore[arg-type]
    with pytest.raises(compressor.errors.UsageError, match="no registered model family"):
        assert_budget(torch.nn.Linear(2, 2), total=1)


# --- the plugin --------------------------------------------------------------


def test_entry_point_is_installed() -> None:
    try:
        metadata.distribution("featherface-compressor")
    except metadata.PackageNotFoundError:
        pytest.skip("the package is not installed, so it has no entry points")
    values = [ep.value for ep in metadata.entry_points(group="pytest11")]
    assert "compressor.pytest_plugin" in values, "pytest11 entry point missing: re-run pip install -e ."


def test_marker_fixture_and_assert_budget(pytester: pytest.Pytester, checkpoint: Path) -> None:
    pytester.makepyfile(
        test_user=f"""
        import pytest
        from compressor import assert_budget

        pytestmark = pytest.mark.compressor_model({str(checkpoint)!r})

        def test_loaded_from_checkpoint(compressed_model):
            assert not compressed_model.training
            assert next(compressed_model.parameters()).flatten()[0].item() == {MARK_VALUE}

        def test_fits(compressed_model):
            assert_budget(compressed_model, total=600_000)

        def test_over(compressed_model):
            assert_budget(compressed_model, total=500_000, components={{"ssh": 60_000}})
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            ">*assert_budget(compressed_model, total=500_000, *",
            "E*model over budget (2 limits):",
            "E*total = 592,371 > budget 500,000 (+92,371)",
            "E*ssh = 232,965 > budget 60,000 (+172,965)",
        ]
    )
    # __tracebackhide__: the failure points at the user's line, not into compressor.
    assert "compressor/testing.py" not in result.stdout.str()


def test_model_loaded_once_per_session_and_copied_per_test(
    pytester: pytest.Pytester, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = compressor.checkpoint.open_model

    def counting_open_model(source, registry=None):
        calls.append(source)
        return original(source, registry)

    monkeypatch.setattr(compressor.checkpoint, "open_model", counting_open_model)
    pytester.makepyfile(
        test_user=f"""
        import pytest, torch

        pytestmark = pytest.mark.compressor_model({str(checkpoint)!r})

        def test_changes_its_copy(compressed_model):
            compressed_model.train()
            with torch.no_grad():
                next(compressed_model.parameters()).fill_(9.0)

        def test_sees_a_fresh_copy(compressed_model):
            assert not compressed_model.training
            assert next(compressed_model.parameters()).flatten()[0].item() == {MARK_VALUE}
        """
    )
    run(pytester).assert_outcomes(passed=2)
    assert calls == [str(checkpoint)]


def test_option_with_relative_run_folder_and_marker_override(pytester: pytest.Pytester, checkpoint: Path) -> None:
    run_dir = pytester.path / "runs" / "exp1"
    run_dir.mkdir(parents=True)
    (run_dir / "final.pt").write_bytes(checkpoint.read_bytes())
    pytester.makepyfile(
        test_user=f"""
        import pytest

        def test_from_option(compressed_model):
            assert next(compressed_model.parameters()).flatten()[0].item() == {MARK_VALUE}

        @pytest.mark.compressor_model("featherface")
        def test_marker_wins(compressed_model):
            assert next(compressed_model.parameters()).flatten()[0].item() != {MARK_VALUE}
        """
    )
    run(pytester, "--compressor-run", "runs/exp1").assert_outcomes(passed=2)


def test_ini_option(pytester: pytest.Pytester, checkpoint: Path) -> None:
    pytester.makeini(f"[pytest]\ncompressor_run = {checkpoint}\n")
    pytester.makepyfile(
        test_user=f"""
        def test_from_ini(compressed_model):
            assert next(compressed_model.parameters()).flatten()[0].item() == {MARK_VALUE}
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_no_model_given_fails_only_the_tests_that_ask(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        def test_unrelated():
            pass

        def test_wants_model(compressed_model):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*compressed_model: no model to load*--compressor-run PATH*"])


def test_path_that_does_not_load_gives_the_one_line_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        import pytest

        @pytest.mark.compressor_model("nowhere/final.pt")
        def test_wants_model(compressed_model):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*compressed_model: nowhere/final.pt: neither a file, a run folder nor a model family*"])
    assert "Traceback" not in result.stdout.str()
    assert "UsageError" not in result.stdout.str()


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.compressor_model(path):*"])


def test_plugin_module_imports_neither_torch_nor_the_engine() -> None:
    """The plugin loads in every pytest session of anyone who installed us, so its own imports stay cheap.

    Loaded from its file, outside the ``compressor`` package, to see this module's
    imports alone.
    """
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('plugin_alone', {compressor.pytest_plugin.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('torch', 'compressor', 'featherface') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"
