from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"shared reference material not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of ours holding the FeatherFace baseline (random weights)."""
    from compressor.checkpoint import save_checkpoint
    from compressor_plugins.featherface_family import FAMILY
    from featherface import featherface_baseline

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, featherface_baseline().eval(), FAMILY)
    return path
