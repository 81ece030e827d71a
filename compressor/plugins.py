"""Building the plugin manager and collecting what plugins provide.

Plugins come from three places, all registered the same way: the built-in
modules listed in ``DEFAULT_PLUGINS``, installed packages' entry points in the
``compressor`` group, and a recipe's ``plugins:`` list (a dotted module path or a
``.py`` file).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pluggy

from . import hookspecs
from .errors import UsageError
from .family import ModelFamily
from .passes import Pass

# Datasette-style: the built-ins are ordinary plugin modules, named here and
# imported lazily, never special-cased anywhere else.
DEFAULT_PLUGINS = (
    "plugins.featherface_family",
    "plugins.featherface_commands",
    "plugins.cbam_plus",
    "plugins.shared_cbam",
    "plugins.unify_heads",
    "plugins.bifpn_slim",
    "plugins.ssh_slim",
    "plugins.prune",
    "plugins.sensitivity",
)

ENTRY_POINT_GROUP = "compressor"


def get_plugin_manager(extra: list[str] | tuple[str, ...] = (), base_dir: Path | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager with built-ins, entry points and ``extra`` plugins registered."""
    pm = pluggy.PluginManager("compressor")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except Exception as err:  # a broken third-party install must not read as our crash
        raise UsageError(f"an installed compressor plugin failed to load: {type(err).__name__}: {err}") from err
    for reference in extra:
        module = import_plugin(reference, base_dir)
        if pm.is_registered(module):
            continue
        pm.register(module, name=reference)
    return pm


def import_plugin(reference: str, base_dir: Path | None = None) -> ModuleType:
    """Import a plugin given as a dotted module path or a path to a ``.py`` file."""
    if reference.endswith(".py") or "/" in reference or "\\" in reference:
        path = Path(reference)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise UsageError(f"plugin {reference}: no such file ({path})")
        module_name = f"compressor_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise UsageError(f"plugin {reference} failed to import: {type(err).__name__}: {err}") from err
        return module
    try:
        return importlib.import_module(reference)
    except Exception as err:
        raise UsageError(f"plugin {reference} failed to import: {type(err).__name__}: {err}") from err


@dataclass
class Registry:
    """What the registered plugins provide, by name."""

    passes: dict[str, type[Pass]]
    pass_sources: dict[str, str]
    families: dict[str, ModelFamily]

    def get_pass(self, name: str, where: str = "") -> type[Pass]:
        if name not in self.passes:
            raise UsageError(f"{where}unknown pass {name!r}{suggest(name, self.passes)}")
        return self.passes[name]

    def get_family(self, name: str, where: str = "") -> ModelFamily:
        if name not in self.families:
            raise UsageError(f"{where}unknown model family {name!r}{suggest(name, self.families)}")
        return self.families[name]


def suggest(name: str, choices: object) -> str:
    """' (did you mean x?)' for a close match, or the list of choices."""
    names = sorted(choices)  # type: ignore[call-overload]
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" (available: {', '.join(names)})" if names else ""


def collect(pm: pluggy.PluginManager) -> Registry:
    """Gather passes and families, refusing two plugins that claim the same name."""
    passes: dict[str, type[Pass]] = {}
    sources: dict[str, str] = {}
    for impl in pm.hook.compressor_passes.get_hookimpls():
        plugin_name = impl.plugin_name
        for cls in impl.function() or []:
            if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
                raise UsageError(f"plugin {plugin_name}: {cls!r} is not a Pass subclass with a name")
            if cls.name in passes and passes[cls.name] is not cls:
                raise UsageError(
                    f"pass {cls.name!r} is registered twice: by {sources[cls.name]} and by {plugin_name}"
                )
            passes[cls.name] = cls
            sources[cls.name] = plugin_name
    families: dict[str, ModelFamily] = {}
    for impl in pm.hook.compressor_models.get_hookimpls():
        for family in impl.function() or []:
            if family.name in families and families[family.name] is not family:
                raise UsageError(f"model family {family.name!r} is registered twice (again by {impl.plugin_name})")
            families[family.name] = family
    return Registry(passes, sources, families)


def load_registry(extra: list[str] | tuple[str, ...] = (), base_dir: Path | None = None) -> Registry:
    return collect(get_plugin_manager(extra, base_dir))


def family_for(model: object, registry: Registry) -> ModelFamily:
    """The registered family that built ``model``."""
    for family in registry.families.values():
        if family.recognises(model):  # type: ignore[arg-type]
            return family
    raise UsageError(
        f"no registered model family recognises a {type(model).__name__} "
        f"(families: {', '.join(registry.families) or 'none'})"
    )
