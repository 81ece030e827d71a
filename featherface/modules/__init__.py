"""FeatherFace building blocks, each registered for architecture specs."""

from .backbone import MobileNetV1
from .bifpn import BiFPNCell
from .cbam import CBAM, ChannelGate, SpatialGate, cbam
from .deform import DeformableConv2d
from .heads import SeparateHeads, UnifiedHeads
from .shuffle import ChannelShuffleBlock
from .ssh import SSH

__all__ = [
    "CBAM",
    "BiFPNCell",
    "ChannelGate",
    "ChannelShuffleBlock",
    "DeformableConv2d",
    "MobileNetV1",
    "SSH",
    "SeparateHeads",
    "SpatialGate",
    "UnifiedHeads",
    "cbam",
]
