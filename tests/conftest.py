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
def tiny_embedded(tmp_path_factory) -> Path:
    """An embedded dataset of 4/2/2 train/val/test images at 64x64: a whole recipe, evaluation included, in
    seconds (the default embedded data evaluates 100 validation and 500 test images per model)."""
    from facedet.data import generate_embedded_dataset

    return generate_embedded_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=4, num_val=2, num_test=2,
                                     size=64)


@pytest.fixture(scope="session")
def small_embedded(tmp_path_factory) -> Path:
    """An embedded dataset of 8/4/2 train/val/test images at 160x160, shared read-only by the training,
    finetuning and command tests: enough images for a batch of 2 on each of two processes."""
    from facedet.data import generate_embedded_dataset

    return generate_embedded_dataset(tmp_path_factory.mktemp("data") / "small", num_train=8, num_val=4, num_test=2,
                                     size=160)


@pytest.fixture(scope="session")
def fewer_fit_images():
    """``fewer_fit_images(recipe)``: ``--set`` arguments giving every stage of ``recipe`` that refits
    (``fit_images``) 4 images: the structure and the parameter counts stay the shipped recipe's, the
    least-squares fits get cheap."""
    import yaml

    def overrides(recipe: Path, images: int = 4) -> list[str]:
        stages = yaml.safe_load(recipe.read_text())["stages"]
        return [arg for i, stage in enumerate(stages) if "fit_images" in (stage.get("params") or {})
                for arg in ("--set", f"stages[{i}].params.fit_images={images}")]

    return overrides


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of ours holding the FeatherFace baseline (random weights)."""
    from compressor.checkpoint import save_checkpoint
    from compressor_plugins.featherface_family import FAMILY
    from featherface import featherface_baseline

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, featherface_baseline().eval(), FAMILY)
    return path
