"""Prior (anchor) boxes for the three FeatherFace detection levels.

The order of the priors is part of the model's output contract: the heads
flatten N×C×h×w feature maps as N×h×w×C, so priors must run level by level,
then row by row, then column by column, then anchor size by anchor size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PriorConfig", "make_priors", "num_priors"]


@dataclass(frozen=True)
class PriorConfig:
    """Anchor sizes (in input pixels) and strides, one entry per level.

    Frozen so a config can be a default argument and a dict key without
    anyone mutating the shared instance.
    """

    min_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
    steps: tuple[int, ...] = (8, 16, 32)

    def __post_init__(self) -> None:
        if len(self.min_sizes) != len(self.steps):
            raise ValueError(
                f"need one anchor-size tuple per step, got {len(self.min_sizes)} "
                f"size tuples for {len(self.steps)} steps"
            )


def _grid_shape(image_size: tuple[int, int], step: int) -> tuple[int, int]:
    # ceil, not floor: a partial last cell still gets a feature-map position
    # (stride-2 convs with padding round up), so it must get priors too.
    height, width = image_size
    return math.ceil(height / step), math.ceil(width / step)


def num_priors(image_size: tuple[int, int], config: PriorConfig = PriorConfig()) -> int:
    """Number of priors for an (H, W) input, without building them.

    Cheap enough to check a model's output length against before decoding.
    """
    total = 0
    for sizes, step in zip(config.min_sizes, config.steps):
        rows, cols = _grid_shape(image_size, step)
        total += rows * cols * len(sizes)
    return total


def _level_priors(
    image_size: tuple[int, int], step: int, sizes: tuple[int, ...]
) -> torch.Tensor:
    height, width = image_size
    rows, cols = _grid_shape(image_size, step)
    # float64 so that e.g. 4/96 rounds once, straight to the nearest float32.
    cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
    cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
    size = torch.tensor(sizes, dtype=torch.float64)
    # 'ij' with (cy, cx, size) puts rows outermost and sizes innermost,
    # which is exactly the head's flattening order.
    grid_cy, grid_cx, grid_s = torch.meshgrid(cy, cx, size, indexing="ij")
    level = torch.stack((grid_cx, grid_cy, grid_s / width, grid_s / height), dim=-1)
    return level.reshape(-1, 4)


def make_priors(
    image_size: tuple[int, int],
    config: PriorConfig = PriorConfig(),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Priors as a P×4 float32 tensor of (cx, cy, w, h), normalised by (W, H).

    `image_size` is (H, W) of the network input (after any padding). Priors
    are deliberately not clipped to [0, 1]: the large anchors exceed small
    inputs, and the original decoder relies on their unclipped size.
    """
    levels = [
        _level_priors(image_size, step, sizes)
        for sizes, step in zip(config.min_sizes, config.steps)
    ]
    return torch.cat(levels, dim=0).to(device=device, dtype=torch.float32)
