"""Turning decoded images into the network's input convention.

The original FeatherFace was trained on OpenCV images: BGR order, 0..255,
per-channel mean subtracted, no division by a standard deviation. Images
from torchvision.io are RGB, so the channel flip happens here, once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MEAN_BGR", "to_network_input", "pad_to_multiple"]

MEAN_BGR: tuple[float, float, float] = (104.0, 117.0, 123.0)


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 3:
        return images.unsqueeze(0)
    if images.dim() == 4:
        return images
    raise ValueError(f"expected C×H×W or N×C×H×W, got shape {tuple(images.shape)}")


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    # Alpha or other layouts are ambiguous to drop silently; decode with
    # torchvision.io.ImageReadMode.RGB instead.
    raise ValueError(f"expected 1 or 3 channels, got {channels}")


def to_network_input(images: torch.Tensor) -> torch.Tensor:
    """RGB images (uint8 or float, values 0..255) to float32 N×3×H×W BGR - mean.

    Float input is taken to be on the 0..255 scale already; [0, 1] images
    must be multiplied by 255 first, as nothing here can tell them apart.
    """
    rgb = _as_rgb(_as_batch(images))
    bgr = rgb.flip(1).to(torch.float32)
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32, device=bgr.device)
    return bgr - mean.view(1, 3, 1, 1)


def pad_to_multiple(images: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero-pad the bottom and right of N×C×H×W so H and W divide `multiple`.

    Call it after to_network_input: there, 0 is the mean colour, which is what
    the network saw around the image during training. Record each image's
    original (H, W) before padding and pass them to detect(image_sizes=...):
    boxes are decoded against the padded size, and only the original size
    tells detect where to clip them (and which lie wholly in the padding).
    Padding bottom/right only keeps the pixel coordinates of the original
    image unchanged.
    """
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    height, width = images.shape[-2:]
    pad_h = -height % multiple
    pad_w = -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), value=0.0)
