"""Architecture specs: a plain, JSON-able description from which a model is rebuilt.

A compressed checkpoint must reload without pickled code, and passes change the
architecture (narrower convs, shared gates, swapped modules).  So every module of
the family that has structure worth describing is registered here and can say,
through ``spec_args()``, which constructor arguments would rebuild it *as it is
now* — widths are read off the live layers, so a model pruned in place still
describes itself correctly.

A spec node is ``{"type": name, "args": {...}}``.  Argument values are plain data
(numbers, strings, bools, None, lists) or nested nodes.  When one module instance
appears in several places (weight sharing), its later occurrences are written as
``{"ref": path}`` pointing at the first one, and the builder hands back the very
same instance, so sharing survives a save/load round trip.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

Spec = dict[str, Any]

_REGISTRY: dict[str, type[nn.Module]] = {}

M = TypeVar("M", bound=type[nn.Module])


class SpecError(ValueError):
    """A spec that cannot be built: unknown type, bad arguments, dangling reference."""


def register(cls: M) -> M:
    """Class decorator: make a module type buildable from a spec by its class name."""
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise SpecError(f"two module types registered under the name {name!r}")
    if not callable(getattr(cls, "spec_args", None)):
        raise SpecError(f"{name} must define spec_args() to be registered")
    _REGISTRY[name] = cls
    return cls


def to_spec(module: nn.Module) -> Spec:
    """Describe ``module`` (a registered type) as a JSON-able spec tree."""
    return _describe(module, "", {})


def _describe(value: Any, path: str, seen: dict[int, str]) -> Any:
    if isinstance(value, nn.Module):
        key = id(value)
        if key in seen:
            return {"ref": seen[key]}
        type_name = type(value).__name__
        if _REGISTRY.get(type_name) is not type(value):
            raise SpecError(
                f"{path or 'model'}: module type {type_name} is not registered for specs"
            )
        seen[key] = path
        args = value.spec_args()
        return {
            "type": type_name,
            "args": {k: _describe(v, _join(path, k), seen) for k, v in args.items()},
        }
    if isinstance(value, (list, tuple, nn.ModuleList)):
        return [_describe(v, _join(path, str(i)), seen) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpecError(f"{path}: cannot describe a value of type {type(value).__name__}")


def from_spec(spec: Spec) -> nn.Module:
    """Build a fresh module (random weights) from a spec made by :func:`to_spec`."""
    module = _build(spec, "", {})
    if not isinstance(module, nn.Module):
        raise SpecError("a spec must describe a module at its root")
    return module


def _build(node: Any, path: str, built: dict[str, nn.Module]) -> Any:
    if isinstance(node, dict):
        if "ref" in node:
            target = node["ref"]
            if target not in built:
                raise SpecError(f"{path}: reference to {target!r}, which is not built before it")
            return built[target]
        if set(node) != {"type", "args"}:
            raise SpecError(f"{path or 'spec'}: a node needs exactly the keys 'type' and 'args'")
        cls = _REGISTRY.get(node["type"])
        if cls is None:
            raise SpecError(f"{path or 'spec'}: unknown module type {node['type']!r}")
        built_args: dict[str, Any] = {}
        for key, value in node["args"].items():
            built_args[key] = _build(value, _join(path, key), built)
        try:
            module = cls(**built_args)
        except (TypeError, ValueError) as err:
            raise SpecError(f"{path or 'spec'}: cannot build {node['type']}: {err}") from err
        built[path] = module
        return module
    if isinstance(node, list):
        return [_build(v, _join(path, str(i)), built) for i, v in enumerate(node)]
    return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
