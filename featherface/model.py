"""The FeatherFace detector, assembled from its parts."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from facedet.modules import SSH, MobileNetV1, SeparateHeads
from facedet.spec import register

from .modules import BiFPNCell, ChannelShuffleBlock, cbam

# Top-level attribute -> accounting component.  Everything a pass adds must live
# under one of these attributes, or it is counted as "other".
COMPONENTS = {
    "backbone": "backbone",
    "backbone_cbam": "cbam",
    "bifpn": "bifpn",
    "bifpn_cbam": "cbam",
    "ssh": "ssh",
    "shuffle": "channel_shuffle",
    "heads": "heads",
}


@register
class FeatherFace(nn.Module):
    """MobileNetV1 -> CBAM -> BiFPN -> CBAM -> SSH -> channel shuffle -> heads.

    ``forward`` returns ``(boxes N x P x 4, class logits N x P x 2, landmarks N x P x 10)``
    in train and eval mode alike: the class scores are raw logits, never
    softmaxed (post-processing applies the softmax).  The input is a BGR,
    mean-subtracted float batch (see :mod:`facedet.preprocess`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        backbone_cbam: list[nn.Module],
        bifpn: list[nn.Module],
        bifpn_cbam: list[nn.Module],
        ssh: list[nn.Module],
        shuffle: list[nn.Module],
        heads: nn.Module,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_cbam = nn.ModuleList(backbone_cbam)
        self.bifpn = nn.ModuleList(bifpn)
        self.bifpn_cbam = nn.ModuleList(bifpn_cbam)
        self.ssh = nn.ModuleList(ssh)
        self.shuffle = nn.ModuleList(shuffle)
        self.heads = heads

    def spec_args(self) -> dict:
        return {
            "backbone": self.backbone,
            "backbone_cbam": list(self.backbone_cbam),
            "bifpn": list(self.bifpn),
            "bifpn_cbam": list(self.bifpn_cbam),
            "ssh": list(self.ssh),
            "shuffle": list(self.shuffle),
            "heads": self.heads,
        }

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.backbone(x)
        features = [F.relu(attention(f) + f) for attention, f in zip(self.backbone_cbam, features)]
        for cell in self.bifpn:
            features = cell(features)
        features = [F.relu(attention(f) + f) for attention, f in zip(self.bifpn_cbam, features)]
        features = [shuffle(ssh(f)) for ssh, shuffle, f in zip(self.ssh, self.shuffle, features)]
        return self.heads(features)


def featherface_baseline(channels: int = 64, num_cells: int = 3, num_anchors: int = 2) -> FeatherFace:
    """The published FeatherFace: MobileNetV1-0.25, 64-channel BiFPN x3, DCN SSH (592,371 parameters)."""
    backbone = MobileNetV1()
    levels = backbone.out_channels
    cells = [BiFPNCell(channels, in_channels=levels if i == 0 else None) for i in range(num_cells)]
    return FeatherFace(
        backbone=backbone,
        backbone_cbam=[cbam(c) for c in levels],
        bifpn=cells,
        bifpn_cbam=[cbam(channels) for _ in levels],
        ssh=[SSH(channels) for _ in levels],
        shuffle=[ChannelShuffleBlock(channels, channels // 2, channels) for _ in levels],
        heads=SeparateHeads([channels] * len(levels), num_anchors),
    )
