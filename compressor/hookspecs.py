"""The hooks a compressor plugin can implement.

Built-in features (the FeatherFace family, every built-in pass) implement these
exactly as a third-party plugin would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from .family import ModelFamily
    from .passes import Pass
    from .plugins import App

hookspec = pluggy.HookspecMarker("compressor")


@hookspec
def compressor_passes() -> list[type[Pass]]:
    """Return the compression pass classes this plugin provides."""


@hookspec
def compressor_models() -> list[ModelFamily]:
    """Return the model families (builders, specs, losses, data) this plugin provides."""


@hookspec
def compressor_commands(cli: click.Group, app: App) -> None:
    """Add commands to the ``compress`` CLI (e.g. family-specific evaluation).

    ``app`` is the command's :class:`compressor.plugins.App`: the plugin manager
    and registry, built once; a command reaches it again as click's ``ctx.obj``.
    """
