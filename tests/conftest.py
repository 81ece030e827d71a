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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small forwards: on a shared 2-core machine, OpenMP
    threads spinning against other processes make each small forward tens of times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of ours holding the FeatherFace baseline (random weights)."""
    from compressor.checkpoint import save_checkpoint
    from compressor_plugins.featherface_family import FAMILY
    from featherface import featherface_baseline

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, featherface_baseline().eval(), FAMILY)
    return path
