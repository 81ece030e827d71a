"""Errors that are the user's to fix: shown as one clear line, never as a traceback."""

from __future__ import annotations


class CompressorError(Exception):
    """Base for errors reported to the user.  ``exit_code`` follows the CLI convention."""

    exit_code = 1


class UsageError(CompressorError):
    """Bad input: a recipe, a file, an argument.  Exit code 2."""

    exit_code = 2


class CheckFailed(CompressorError):
    """A check ran and failed: a budget, a contract, a validation.  Exit code 1."""

    exit_code = 1


class OutputError(UsageError, OSError):
    """A file or folder cannot be written (a bad path, no permission, a full disk).  Exit code 2.

    Also an ``OSError``, so code that handles failed writes as such keeps working.
    """
