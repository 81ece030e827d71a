"""compressor: compress PyTorch models pass by pass, with budgets, checks and checkpoints.

The public API::

    from compressor import hookimpl, Pass, load_model, assert_budget
"""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("compressor")

from .checkpoint import load_model  # noqa: E402
from .passes import Pass, PassContext  # noqa: E402

__all__ = ["Pass", "PassContext", "hookimpl", "load_model"]
