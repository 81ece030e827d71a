"""Box and landmark encoding relative to priors (SSD-style with variances).

All functions take regressions/targets of shape …×P×4 or …×P×10 and priors
of shape P×4 (cx, cy, w, h), so they work per image and per batch alike.
Corners are (x1, y1, x2, y2) in the same normalised coordinates as priors.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert

__all__ = [
    "VARIANCES",
    "decode_boxes",
    "encode_boxes",
    "decode_landmarks",
    "encode_landmarks",
]

# Scale factors that bring centre offsets and log-size ratios to roughly unit
# variance; the trained heads regress these scaled values, so they are fixed.
VARIANCES: tuple[float, float] = (0.1, 0.2)

_NUM_LANDMARKS = 5


def _prior_parts(priors: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Priors are often built on CPU in float32; follow the regression tensor.
    priors = priors.to(device=like.device, dtype=like.dtype)
    return priors[..., :2], priors[..., 2:]


def decode_boxes(
    loc: torch.Tensor,
    priors: torch.Tensor,
    variances: tuple[float, float] = VARIANCES,
) -> torch.Tensor:
    """Box regressions (…×P×4) to corner boxes (…×P×4)."""
    prior_c, prior_wh = _prior_parts(priors, loc)
    centre = prior_c + loc[..., :2] * variances[0] * prior_wh
    size = prior_wh * torch.exp(loc[..., 2:] * variances[1])
    return box_convert(torch.cat((centre, size), dim=-1), in_fmt="cxcywh", out_fmt="xyxy")


def encode_boxes(
    matched_xyxy: torch.Tensor,
    priors: torch.Tensor,
    variances: tuple[float, float] = VARIANCES,
) -> torch.Tensor:
    """Corner boxes (…×P×4) to regression targets; exact inverse of decode_boxes.

    A box with zero width or height encodes to -inf; matching should never
    assign such a box, so it is not silently clamped here.
    """
    prior_c, prior_wh = _prior_parts(priors, matched_xyxy)
    gt = box_convert(matched_xyxy, in_fmt="xyxy", out_fmt="cxcywh")
    offset = (gt[..., :2] - prior_c) / (variances[0] * prior_wh)
    log_size = torch.log(gt[..., 2:] / prior_wh) / variances[1]
    return torch.cat((offset, log_size), dim=-1)


def _as_points(landmarks: torch.Tensor) -> torch.Tensor:
    # x, y interleaved → …×P×5×2 so one (cx, cy) prior broadcasts over points.
    return landmarks.unflatten(-1, (_NUM_LANDMARKS, 2))


def decode_landmarks(
    ldm: torch.Tensor,
    priors: torch.Tensor,
    variances: tuple[float, float] = VARIANCES,
) -> torch.Tensor:
    """Landmark regressions (…×P×10) to points (…×P×10, x1,y1,…,x5,y5).

    Only the centre variance applies: landmarks are offsets, not sizes.
    """
    prior_c, prior_wh = _prior_parts(priors, ldm)
    prior_c, prior_wh = prior_c.unsqueeze(-2), prior_wh.unsqueeze(-2)
    points = prior_c + _as_points(ldm) * variances[0] * prior_wh
    return points.flatten(-2)


def encode_landmarks(
    matched_ldm: torch.Tensor,
    priors: torch.Tensor,
    variances: tuple[float, float] = VARIANCES,
) -> torch.Tensor:
    """Landmark points (…×P×10) to regression targets; inverse of decode_landmarks."""
    prior_c, prior_wh = _prior_parts(priors, matched_ldm)
    prior_c, prior_wh = prior_c.unsqueeze(-2), prior_wh.unsqueeze(-2)
    offsets = (_as_points(matched_ldm) - prior_c) / (variances[0] * prior_wh)
    return offsets.flatten(-2)
