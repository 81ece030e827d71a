"""Plugin loading: three sources, one mechanism, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.errors import UsageError
from compressor.plugins import collect, build_plugin_manager, load_registry

TOY = Path(__file__).parent / "fixtures" / "toy_passes.py"


def test_builtin_family_registers_through_the_hook():
    registry = load_registry()
    assert "featherface" in registry.families


def test_plugin_from_a_py_file():
    registry = load_registry([str(TOY)])
    assert {"scale_heads", "identity", "plain_ssh"} <= set(registry.passes)
    assert registry.pass_sources["identity"] == str(TOY)


def test_relative_plugin_path_resolves_against_the_recipe_folder():
    registry = load_registry(["toy_passes.py"], base_dir=TOY.parent)
    assert "identity" in registry.passes


def test_duplicate_pass_names_name_both_plugins(tmp_path):
    clone = tmp_path / "clone_plugin.py"
    clone.write_text(
        "from compressor import Pass, hookimpl\n"
        "class Other(Pass):\n    '''Another identity.'''\n    name = 'identity'\n"
        "    def apply(self, model, params, ctx):\n        return model\n"
        "@hookimpl\ndef compressor_passes():\n    return [Other]\n"
    )
    with pytest.raises(UsageError) as info:
        collect(build_plugin_manager([str(TOY), str(clone)]))
    assert str(TOY) in str(info.value) and str(clone) in str(info.value) and "'identity'" in str(info.value)


def test_plugin_returning_a_non_pass_is_refused(tmp_path):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("from compressor import hookimpl\n@hookimpl\ndef compressor_passes():\n    return [object]\n")
    with pytest.raises(UsageError, match="bad_plugin.py"):
        load_registry([str(bad)])


def test_module_path_plugin():
    registry = load_registry(["compressor_plugins.featherface_family"])
    assert "featherface" in registry.families
