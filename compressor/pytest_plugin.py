"""pytest plugin: a ``compressed_model`` fixture for users' own suites, with budgets via ``assert_budget``.

Registered through the ``pytest11`` entry point, so it is active in every pytest
session of anyone who installed this package.  That is why this module imports
only pytest at import time: torch and the engine are imported inside the
fixture, by the tests that ask for it.

Which model the fixture loads, the first given wins:

1. ``@pytest.mark.compressor_model("runs/exp1")`` on the test, class or module;
2. ``--compressor-run DIR`` on the command line;
3. ``compressor_run = DIR`` in the pytest ini file.

Each names a run folder, a checkpoint file or a model family (its baseline).
A relative path is looked up first from the current directory, then from the
rootdir (marker), the invocation directory (option) or the ini file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from torch import nn

MARKER = "compressor_model"
OPTION = "--compressor-run"
INI = "compressor_run"

HOW_TO = (
    f"compressed_model: no model to load; name a run folder or checkpoint with "
    f'@pytest.mark.{MARKER}("PATH") on the test, {OPTION} PATH on the command line, '
    f"or {INI} = PATH in the pytest ini file"
)

# Per session: located source -> loaded model, or the one-line error it gave.
_CACHE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("compressor", "model compression (compressed_model fixture)")
    group.addoption(
        OPTION,
        dest=INI,
        metavar="DIR",
        default=None,
        help="run folder, checkpoint or model family that the compressed_model fixture loads.",
    )
    parser.addini(INI, type="string", default="", help="default for --compressor-run (relative to the ini file).")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(path): the run folder, checkpoint or model family the compressed_model fixture loads "
        f"(overrides {OPTION}).",
    )
    config.stash[_CACHE] = {}


@pytest.fixture
def compressed_model(request: pytest.FixtureRequest) -> nn.Module:
    """The model named by the ``compressor_model`` marker or ``--compressor-run``, in eval mode.

    Loaded once per session per path; each test gets its own copy, so a test
    that prunes or retrains it cannot change what the next test sees.
    """
    import copy

    source, base = _requested_source(request)
    loaded = _load_cached(request.config, _locate(source, base))
    if isinstance(loaded, str):
        pytest.fail(f"compressed_model: {loaded}", pytrace=False)
    return copy.deepcopy(loaded).eval()


def _requested_source(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(source as written, folder a relative path is relative to); fails with the how-to if none."""
    config = request.config
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        path = marker.args[0] if marker.args else marker.kwargs.get("path")
        if not isinstance(path, (str, Path)) or not str(path):
            pytest.fail(f'compressed_model: use @pytest.mark.{MARKER}("PATH"), got {marker!r}', pytrace=False)
        return str(path), config.rootpath
    option = config.getoption(INI)
    if option:
        return str(option), config.invocation_params.dir
    ini = config.getini(INI)
    if ini:
        return str(ini), config.inipath.parent if config.inipath else config.rootpath
    pytest.fail(HOW_TO, pytrace=False)


def _locate(source: str, base: Path) -> str:
    """``source`` as given when it exists (or may be a family name), else ``base / source`` if that loads."""
    from compressor.checkpoint import resolve_checkpoint_path
    from compressor.errors import CompressorError

    given = Path(source).expanduser()
    if given.is_absolute() or given.exists():
        return str(given)
    candidate = base / given
    if not candidate.exists():
        return source
    try:
        resolve_checkpoint_path(candidate)  # a file, or a folder that really is a run folder
    except CompressorError:
        return source
    return str(candidate)


def _load_cached(config: pytest.Config, source: str) -> nn.Module | str:
    """The model for ``source``, or the one-line error; both remembered for the session."""
    cache = config.stash.setdefault(_CACHE, {})
    if source not in cache:
        from compressor.checkpoint import open_model
        from compressor.errors import CompressorError

        try:
            cache[source] = open_model(source).model.eval()
        except CompressorError as err:
            cache[source] = str(err)
    return cache[source]
