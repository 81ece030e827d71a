"""FeatherFace's pruning customisations: what the generic ``prune`` pass must know about its layers.

``FeatherFaceFamily.pruning_hints`` hands these to the pass as a
:class:`compressor.family.PruningHints`; the pass itself names no FeatherFace
module.  Each item is something torch-pruning's dependency graph cannot see
through on its own (the tests in ``tests/test_pass_prune.py`` show each one):

* ``DeformableConv2d`` calls ``deform_conv2d`` with ``regular_conv.weight``, so
  it is registered as a customised layer (:class:`DeformableConvPruner`): out
  channels slice ``regular_conv``'s rows, in channels slice the input columns of
  ``offset_conv``, ``modulator_conv`` and ``regular_conv`` together; the 2*k*k
  offset and k*k mask outputs are never touched.  Importance scores it as its
  ``regular_conv`` (:meth:`DeformableConvPruner.importance_layer`).
* ``FusionWeights`` (BiFPN's per-input scalars) is registered as a customised
  layer that prunes nothing (:class:`UntouchedPruner`), so its weights are never
  taken for a channel dimension (torch-pruning would otherwise treat them as free
  parameters with a prunable last dimension).
* ``SpatialGate``'s conv reads [max, mean] over the channels, which has no
  channel index: its conv and BN are left out of tracing, so the graph sees
  channel-preserving no-ops there and never gives the 2-channel conv the
  features' indices (it would, through ``amax``/``mean``, which it takes for
  element-wise ops).
* A BiFPN cell has one width for all its layers: each cell is a tied set, so the
  groups that prune inside BiFPN cells remove the same number of channels.
* The channel shuffle (reshape -> transpose -> reshape) is a fixed permutation
  followed by the 1x1 ``reduce`` conv.  torch-pruning maps it as the identity,
  which removes the wrong columns of ``reduce``.  So the permutation is folded
  into ``reduce``'s input columns and the shuffle switched off while the graph is
  built and pruned (:class:`shuffles_folded`, the hints' context), then put back:
  ``reduce``'s columns are re-ordered for the permutation of the new width.
  Exact: the pruned block computes what the original computes with the removed
  channels zeroed.  The new width must stay divisible by the shuffle's groups:
  each ``reduce`` conv's input width has the block's group count as divisor.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch_pruning.pruner import function

from compressor.family import PruningHints
from facedet.modules import DeformableConv2d
from featherface.modules import BiFPNCell, ChannelShuffleBlock, SpatialGate
from featherface.modules.bifpn import FusionWeights
from featherface.modules.shuffle import shuffle_permutation


class DeformableConvPruner(function.BasePruningFunc):
    """Prunes a :class:`DeformableConv2d` as one layer.

    Out channels are ``regular_conv``'s rows.  In channels are the input columns
    of ``offset_conv``, ``modulator_conv`` and ``regular_conv`` together; the
    offset and mask outputs (2*k*k and k*k sampling parameters) are never pruned.
    """

    TARGET_MODULES = DeformableConv2d

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        conv = layer.regular_conv
        keep = _keep(conv.out_channels, idxs)
        conv.weight = self._prune_parameter_and_grad(conv.weight, keep, 0)
        if conv.bias is not None:
            conv.bias = self._prune_parameter_and_grad(conv.bias, keep, 0)
        conv.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = _keep(layer.regular_conv.in_channels, idxs)
        for conv in (layer.offset_conv, layer.modulator_conv, layer.regular_conv):
            conv.weight = self._prune_parameter_and_grad(conv.weight, keep, 1)
            conv.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.regular_conv.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.regular_conv.in_channels

    def importance_layer(self, layer: nn.Module) -> nn.Module:
        """The standard layer whose weights stand for this one's channels in importance scores."""
        return layer.regular_conv


class UntouchedPruner(function.BasePruningFunc):
    """A layer the graph passes through and never prunes (no channel dimension of its own).

    ``prune_in_channels is prune_out_channels`` makes the graph couple the
    layer's input and output channels, as for an element-wise op.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


DEFORMABLE_PRUNER = DeformableConvPruner()
UNTOUCHED_PRUNER = UntouchedPruner()
CUSTOM_PRUNERS = {
    DeformableConv2d: DEFORMABLE_PRUNER,
    FusionWeights: UNTOUCHED_PRUNER,
}


def pruning_hints(model: nn.Module) -> PruningHints:
    """The hints for any module holding FeatherFace layers (a whole model or a part of one)."""
    blocks = [m for m in model.modules() if isinstance(m, ChannelShuffleBlock)]
    return PruningHints(
        custom_pruners=dict(CUSTOM_PRUNERS),
        # One entry per submodule of every gate (a gate shared by several levels couples nothing).
        untraced=[sub for gate in model.modules() if isinstance(gate, SpatialGate)
                  for sub in gate.modules() if sub is not gate],
        tied=[[cell] for cell in model.modules() if isinstance(cell, BiFPNCell)],
        divisors=[(block.reduce, block.groups) for block in blocks],
        context=shuffles_folded,
    )


# --- the channel shuffle ------------------------------------------------------


class shuffles_folded:
    """Fold each block's shuffle into its ``reduce`` conv (exactly) for the duration of a with-block.

    ``reduce(shuffle(x)) == reduce'(x)`` with ``reduce'.weight[:, k] = reduce.weight[:, p^-1[k]]``
    (``p`` is :func:`~featherface.modules.shuffle.shuffle_permutation`): inside
    the block the shuffle is skipped, so the graph sees a plain
    channel-preserving path and couples SSH's channel ``k`` with column ``k``.
    On exit the permutation of the (possibly narrower) width is folded back out.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, ChannelShuffleBlock)]

    def __enter__(self) -> shuffles_folded:
        for block in self.blocks:
            perm = shuffle_permutation(block.reduce.in_channels, block.groups).to(block.reduce.weight.device)
            _permute_columns(block.reduce.weight, perm.argsort())
            block.forward = _unshuffled_forward.__get__(block)  # instance attribute: the shuffle is skipped
        return self

    def __exit__(self, *exc: object) -> None:
        problems = []
        for block in self.blocks:
            del block.forward
            channels = block.reduce.in_channels
            if channels % block.groups:
                problems.append(f"{channels} channels into a {block.groups}-group shuffle")
                continue
            perm = shuffle_permutation(channels, block.groups).to(block.reduce.weight.device)
            _permute_columns(block.reduce.weight, perm)
        if problems and exc[0] is None:
            raise RuntimeError(f"prune: left {'; '.join(problems)}")


def _unshuffled_forward(self: ChannelShuffleBlock, x: Tensor) -> Tensor:
    x = self.reduce_bn(self.reduce(x))
    x = self.depthwise_bn(self.depthwise(x))
    return self.act(self.expand_bn(self.expand(x)))


def _permute_columns(weight: nn.Parameter, index: Tensor) -> None:
    """``weight[:, k] <- weight[:, index[k]]`` in place (and the gradient, when there is one)."""
    weight.data = weight.data[:, index].contiguous()
    if weight.grad is not None:
        weight.grad = weight.grad[:, index].contiguous()


def _keep(channels: int, idxs: list[int]) -> list[int]:
    removed = set(int(i) for i in idxs)
    return [i for i in range(channels) if i not in removed]
