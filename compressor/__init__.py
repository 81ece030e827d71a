"""compressor: compress PyTorch models pass by pass, with budgets, checks and checkpoints.

The public API::

    from compressor import hookimpl, Pass, load_model, assert_budget
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

hookimpl = pluggy.HookimplMarker("compressor")

# The rest is imported on first use: the pytest plugin imports this package in
# every pytest session of anyone who installed it, and torch is slow to import.
_LAZY = {
    "Pass": ".passes",
    "PassContext": ".passes",
    "PassResult": ".passes",
    "load_model": ".checkpoint",
    "assert_budget": ".testing",
}

if TYPE_CHECKING:
    from .checkpoint import load_model
    from .passes import Pass, PassContext, PassResult
    from .testing import assert_budget


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


__all__ = ["Pass", "PassContext", "PassResult", "assert_budget", "hookimpl", "load_model"]
