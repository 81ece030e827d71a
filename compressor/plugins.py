"""The plugin manager, and the one object a command hands to everything that needs plugins.

Plugins come from two places, registered the same way: installed packages'
entry points in the ``compressor`` group (this distribution's built-ins among
them) and plugins named explicitly (``--plugin``, a recipe's ``plugins:``), as a
dotted module path or a ``.py`` file.  Any of them can be disabled by name with
``no:NAME`` (``compress -p no:cbam_plus ...``), as pytest's ``-p no:NAME``.

A command builds one :class:`App` and hands it on: to hooks that add commands,
to recipe loading, to model loading.  The registry of passes and families is
collected from the manager once, and again only when a plugin is added.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import UsageError
from .family import ModelFamily
from .passes import Pass

ENTRY_POINT_GROUP = "compressor"
DISABLE_PREFIX = "no:"


def build_plugin_manager(plugins: Iterable[str] = (), base_dir: Path | None = None) -> pluggy.PluginManager:
    """A plugin manager with the entry points and ``plugins`` registered, ``no:NAME`` ones blocked."""
    pm = pluggy.PluginManager("compressor")
    pm.add_hookspecs(hookspecs)
    plugins = list(plugins)
    for reference in plugins:
        if reference.startswith(DISABLE_PREFIX):
            pm.set_blocked(reference[len(DISABLE_PREFIX):])
    _load_entry_points(pm)
    add_plugins(pm, [r for r in plugins if not r.startswith(DISABLE_PREFIX)], base_dir)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every installed ``compressor`` entry point not blocked; a broken one is named."""
    for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if pm.is_blocked(entry_point.name) or pm.get_plugin(entry_point.name) is not None:
            continue
        where = f"plugin {entry_point.name} (entry point {entry_point.value})"
        module = guarded(where, "failed to load", entry_point.load)
        if pm.is_registered(module):
            continue
        pm.register(module, name=entry_point.name)


def add_plugins(pm: pluggy.PluginManager, plugins: Iterable[str], base_dir: Path | None = None) -> None:
    """Register (or, with ``no:NAME``, block) more plugins on an existing manager."""
    for reference in plugins:
        if reference.startswith(DISABLE_PREFIX):
            pm.set_blocked(reference[len(DISABLE_PREFIX):])
            continue
        module = import_plugin(reference, base_dir)
        if pm.is_registered(module) or pm.is_blocked(reference):
            continue
        if pm.get_plugin(reference) is not None:
            raise UsageError(f"plugin {reference}: the name is taken by another registered plugin")
        try:
            pm.register(module, name=reference)
        except ValueError as err:  # pluggy: a hook implementation that does not match its spec, ...
            raise UsageError(f"plugin {reference}: cannot be registered ({err})") from None


def guarded(where: str, what: str, call: Callable[[], Any]) -> Any:
    """Run plugin code; whatever it raises (SystemExit included) becomes one UsageError naming it."""
    try:
        return call()
    except UsageError:
        raise
    except (Exception, SystemExit) as err:
        detail = f": {err}" if str(err) else ""
        raise UsageError(f"{where} {what}: {type(err).__name__}{detail}") from err


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
            guarded(f"plugin {reference}", "failed to import", lambda: spec.loader.exec_module(module))
        except UsageError:
            del sys.modules[module_name]
            raise
        return module
    return guarded(f"plugin {reference}", "failed to import", lambda: importlib.import_module(reference))


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

    def family_for(self, model: object) -> ModelFamily:
        """The registered family that built ``model``."""
        for family in self.families.values():
            if family.recognises(model):  # type: ignore[arg-type]
                return family
        raise UsageError(
            f"no registered model family recognises a {type(model).__name__} "
            f"(families: {', '.join(self.families) or 'none'})"
        )


def suggest(name: str, choices: object) -> str:
    """' (did you mean x?)' for a close match, or the list of choices."""
    names = sorted(choices)  # type: ignore[call-overload]
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" (available: {', '.join(names)})" if names else ""


def _hook_results(pm: pluggy.PluginManager, hook_name: str) -> Iterable[tuple[str, list]]:
    """(plugin name, returned list) for every implementation of a list-returning hook."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        where = f"plugin {impl.plugin_name}"
        result = guarded(where, f"raised in {hook_name}()", impl.function)
        if result is None:
            continue
        if not isinstance(result, (list, tuple)):
            raise UsageError(f"{where}: {hook_name}() returned a {type(result).__name__}, not a list")
        yield impl.plugin_name, list(result)


def collect(pm: pluggy.PluginManager) -> Registry:
    """Gather passes and families, refusing two plugins that claim the same name."""
    passes: dict[str, type[Pass]] = {}
    sources: dict[str, str] = {}
    for plugin_name, classes in _hook_results(pm, "compressor_passes"):
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
                raise UsageError(f"plugin {plugin_name}: {cls!r} is not a Pass subclass with a name")
            if cls.name in passes and passes[cls.name] is not cls:
                raise UsageError(
                    f"pass {cls.name!r} is registered twice: by {sources[cls.name]} and by {plugin_name}"
                )
            passes[cls.name] = cls
            sources[cls.name] = plugin_name
    families: dict[str, ModelFamily] = {}
    for plugin_name, provided in _hook_results(pm, "compressor_models"):
        for family in provided:
            if not isinstance(family, ModelFamily):
                raise UsageError(f"plugin {plugin_name}: {family!r} is not a ModelFamily")
            if family.name in families and families[family.name] is not family:
                raise UsageError(f"model family {family.name!r} is registered twice (again by {plugin_name})")
            families[family.name] = family
    return Registry(passes, sources, families)


class App:
    """What one command shares: the plugin manager, built once, and the registry it gives.

    Hooks that add commands receive it (as Datasette hands plugins its app);
    commands reach it through click's context object.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._registry: Registry | None = None

    @classmethod
    def create(cls, plugins: Iterable[str] = (), base_dir: Path | None = None) -> App:
        return cls(build_plugin_manager(plugins, base_dir))

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = collect(self.pm)
        return self._registry

    def add_plugins(self, plugins: Iterable[str], base_dir: Path | None = None) -> None:
        """Register (or block, ``no:NAME``) more plugins, e.g. a recipe's ``plugins:``."""
        plugins = list(plugins)
        if plugins:
            add_plugins(self.pm, plugins, base_dir)
            self._registry = None


def load_registry(plugins: Iterable[str] = (), base_dir: Path | None = None) -> Registry:
    """The registry of a fresh :class:`App` (for library use and tests)."""
    return App.create(plugins, base_dir).registry
