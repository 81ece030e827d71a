"""The RetinaFace detector (MobileNetV1-0.25 variant), assembled from its parts."""

from __future__ import annotations

from torch import Tensor, nn

from facedet.modules import SSH, MobileNetV1, SeparateHeads
from facedet.spec import register

from .modules import FPN

# Top-level attribute -> accounting component.  Everything a pass adds must live
# under one of these attributes, or it is counted as "other".
COMPONENTS = {"backbone": "backbone", "fpn": "fpn", "ssh": "ssh", "heads": "heads"}


@register
class RetinaFace(nn.Module):
    """MobileNetV1 body -> FPN -> SSH per level -> heads.

    ``forward`` returns ``(boxes N x P x 4, class logits N x P x 2, landmarks N x P x 10)``
    in train and eval mode alike, like FeatherFace: the class scores are raw
    logits (the original softmaxes them in eval mode; post-processing does it
    here).  The input is a BGR, mean-subtracted float batch of any size
    (see :mod:`facedet.preprocess`).
    """

    def __init__(self, backbone: nn.Module, fpn: nn.Module, ssh: list[nn.Module], heads: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.ssh = nn.ModuleList(ssh)
        self.heads = heads

    def spec_args(self) -> dict:
        return {"backbone": self.backbone, "fpn": self.fpn, "ssh": list(self.ssh), "heads": self.heads}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.fpn(self.backbone(x))
        return self.heads([ssh(f) for ssh, f in zip(self.ssh, features)])


def retinaface_mnet025(channels: int = 64, num_anchors: int = 2) -> RetinaFace:
    """The published RetinaFace-MobileNet0.25: 64-channel FPN, plain-conv SSH (426,608 parameters)."""
    backbone = MobileNetV1()
    levels = backbone.out_channels
    return RetinaFace(
        backbone=backbone,
        fpn=FPN(levels, [channels] * len(levels), [channels] * (len(levels) - 1)),
        ssh=[SSH(channels, deformable=False) for _ in levels],
        heads=SeparateHeads([channels] * len(levels), num_anchors),
    )
