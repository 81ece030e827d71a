"""FeatherFace's own building blocks, each registered for architecture specs.

The body, the SSH context module and the heads FeatherFace shares with other
face detectors live in :mod:`facedet.modules`.
"""

from .bifpn import BiFPNCell
from .cbam import CBAM, ChannelGate, SpatialGate, cbam
from .shuffle import ChannelShuffleBlock

__all__ = ["CBAM", "BiFPNCell", "ChannelGate", "ChannelShuffleBlock", "SpatialGate", "cbam"]
