"""Batching for the detection DataLoader."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["collate"]


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack same-sized images into N×3×S×S; keep targets as a list.

    Targets stay separate because images hold different numbers of faces.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    images, targets = zip(*batch)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) != 1:
        raise ValueError(f"images must share one shape to be stacked, got {sorted(shapes)}")
    return torch.stack(images), list(targets)
