"""ssh_slim: SSH modules with plain, grouped or deformable convs, optionally narrower.

Each chosen SSH is rebuilt with ``SSH(...)`` at its new widths and the trained
weights of the kept channels are copied in.  Every conv is handled through its
dense 3x3 weight (a DCN's ``regular_conv.weight``, a grouped conv's blocks on the
diagonal), which is then written out in the target form:

* plain: the dense weight.  A DCN whose offset and modulator convs are zero
  samples the regular grid with modulation 2*sigmoid(0) = 1, i.e. *is* the plain
  conv with ``regular_conv.weight``, so that replacement is lossless.  With
  ``fold_offsets`` (the default) the input-independent part of a DCN's sampling,
  its offset and modulator biases, is folded into the kernel first (see
  :func:`folded_dcn_weight`); the input-dependent part is lost either way.
* grouped: the diagonal blocks of the dense weight (output channel o of group k
  keeps ``weight[o, k*in/g:(k+1)*in/g]``).  An approximation: the weights across
  groups are dropped, not redistributed.
* deformable: the dense weight as ``regular_conv``; offset and modulator convs
  come from the source DCN (sliced on their inputs) or start at zero, which
  makes a plain source exact.

A DCN's input-dependent sampling is what a fixed kernel cannot keep, and the
dropped channels of a narrower SSH are what its later convs and its reader no
longer see.  With ``fit_images`` > 0 every rebuilt plain conv, depth by depth,
and then every narrowed reader conv gets the kernel that best reproduces what
its counterpart computed before the pass, from what it now reads, on that many
of the run's images (least squares over every output position, see
:mod:`compressor.refit`), in closed form, before any finetuning.  The record
gives each conv's relative output error with the carried and the fitted kernel.

With ``width_ratio`` < 1 the five convs keep their most important output
channels (L1 of the kernel times the BN scale).  The three branch outputs,
concatenated, feed the next layer, which loses the matching input columns: in
FeatherFace the channel-shuffle block's first 1x1 conv, after the shuffle's
permutation of the old and of the new channel count; in RetinaFace, which has
no shuffle, the level's head convs directly (see :func:`reader_of`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import Field
from torch import Tensor, nn

from compressor import Pass, hookimpl
from compressor.passes import PassContext, PassResult
from compressor.refit import MAX_FIT_IMAGES, ConvRefit, fit_reference, refit_convs
from compressor.surgery import batchnorm_keep, conv_keep, dense_conv_weight, grouped_weight, l1_importance, top_k
from facedet.modules.deform import DeformableConv2d
from facedet.modules.heads import SeparateHeads, UnifiedHeads
from facedet.modules.ssh import SSH, ConvBN
from featherface.modules.shuffle import ChannelShuffleBlock, shuffle_permutation

# SSH unit -> (its output width's SSH argument, the unit whose output it reads or None for the SSH input).
UNITS = {
    "conv3x3": ("out3x3", None),
    "conv5x5_1": ("mid5x5", None),
    "conv5x5_2": ("out5x5", "conv5x5_1"),
    "conv7x7_2": ("mid7x7", "conv5x5_1"),
    "conv7x7_3": ("out7x7", "conv7x7_2"),
}
# The units whose outputs are concatenated, in the order of the concatenation.
BRANCHES = ("conv3x3", "conv5x5_2", "conv7x7_3")


class SSHSlimParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    conv: Literal["plain", "grouped", "deformable"] = Field(
        "plain", description="The SSH convs after the pass: 'plain' 3x3 convs, 'grouped' 3x3 convs with `groups` "
                             "groups (an approximation of dense ones), or 'deformable' (DCNv2, kept or added).")
    groups: int = Field(
        1, description="Groups of every 3x3 conv with conv=grouped (at least 2, dividing the input and output "
                       "channels of every conv); 1 otherwise.")
    width_ratio: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of the channels of every SSH branch (out3x3, mid5x5, out5x5, "
                                         "mid7x7, out7x7) to keep, the most important ones; in (0, 1].")
    levels: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Indices of the SSH modules to rebuild (0 = stride 8); empty: all of them.")
    fold_offsets: bool = Field(
        True, description="DCN -> plain/grouped: fold the offset and modulator biases (the input-independent "
                          "sampling shift and scale) into the 3x3 kernel; false copies regular_conv.weight as is. "
                          "Both are exact for a DCN whose offset/modulator convs are zero.")
    fit_images: int = Field(
        0, ge=0, le=MAX_FIT_IMAGES,
        description="Refit every rebuilt conv and narrowed reader by least squares to reproduce its outputs before "
                    f"the pass on this many of the run's images (at most {MAX_FIT_IMAGES}); 0: carried weights only. "
                    "Grouped and deformable convs keep their carried weights.")

    @pydantic.field_validator("levels")
    @classmethod
    def _some_levels(cls, levels: list[int] | None) -> list[int] | None:
        if levels is not None and not levels:
            raise ValueError("empty list; leave it out to rebuild every SSH module")
        return levels

    @pydantic.model_validator(mode="after")
    def _groups_fit_the_kind(self) -> SSHSlimParams:
        if self.conv == "grouped" and self.groups < 2:
            raise ValueError(f"groups: conv=grouped needs at least 2 groups, got {self.groups}")
        if self.conv != "grouped" and self.groups != 1:
            raise ValueError(f"groups: {self.groups} groups only apply with conv=grouped (conv is {self.conv!r})")
        return self


@dataclass(frozen=True)
class Widths:
    """The five SSH widths, by ``SSH(...)`` argument name."""

    out3x3: int
    mid5x5: int
    out5x5: int
    mid7x7: int
    out7x7: int

    def of(self, unit: str) -> int:
        return getattr(self, UNITS[unit][0])

    @property
    def out_channels(self) -> int:
        return self.out3x3 + self.out5x5 + self.out7x7


@dataclass(frozen=True)
class Target:
    """What every rebuilt SSH conv becomes."""

    kind: str
    groups: int
    fold_offsets: bool

    @classmethod
    def of(cls, params: SSHSlimParams) -> Target:
        # Folding replaces sampling by a fixed kernel: pointless when the DCN stays.
        return cls(params.conv, params.groups if params.conv == "grouped" else 1,
                   params.fold_offsets and params.conv != "deformable")


class SSHSlim(Pass):
    """Rebuild SSH modules with plain/grouped/deformable convs and optionally fewer channels, from trained weights."""

    name = "ssh_slim"
    Params = SSHSlimParams

    def applies_to(self, model: nn.Module) -> str | None:
        modules = getattr(model, "ssh", None)
        if isinstance(modules, nn.ModuleList) and any(isinstance(m, SSH) for m in modules):
            return None
        return "the model has no SSH context modules"

    def check(self, model: nn.Module, params: SSHSlimParams, ctx: PassContext) -> None:
        levels = _checked_levels(model, params.levels)
        if params.width_ratio < 1:
            _check_readers(model, levels)
        for level in levels:
            ssh = model.ssh[level]
            widths = new_widths(ssh, params.width_ratio, _divisor(model, level), level)
            if params.conv == "grouped":
                _check_groups_divide(ssh.conv3x3.in_channels, widths, params.groups, level)

    def apply(self, model: nn.Module, params: SSHSlimParams, ctx: PassContext) -> PassResult:
        levels = _checked_levels(model, params.levels)
        target = Target.of(params)
        reference = fit_reference(model, params.fit_images, ctx.sample_inputs)
        names = {id(module): name for name, module in model.named_modules()}
        record: list[dict[str, Any]] = []
        rebuilt: list[Rebuilt] = []
        for level in levels:
            old = model.ssh[level]
            widths = new_widths(old, params.width_ratio, _divisor(model, level), level)
            keep = kept_channels(old, widths, target.fold_offsets)
            model.ssh[level] = rebuild(old, widths, keep, target)
            readers: tuple[str, ...] = ()
            if widths.out_channels != old.out_channels:
                reader = required_reader(model, level)
                readers = tuple(names[id(conv)] for conv in reader.convs)
                reader.narrow(concat_index(old, keep))
            rebuilt.append(Rebuilt(level, keep, readers))
            record.append({"level": level, "conv": target.kind, "groups": target.groups,
                           "before": asdict(widths_of(old)), "after": asdict(widths)})
        if reference is not None:
            errors = refit(model, reference, rebuilt, ctx.sample_inputs(params.fit_images))
            for entry, level_errors in zip(record, errors):
                entry["fit_relative_error"] = level_errors
        return PassResult(model, {"levels": record})


@dataclass(frozen=True)
class Rebuilt:
    """One rebuilt SSH: its level, each unit's kept output channels, and the (dotted names of) layers reading it
    that were narrowed with it."""

    level: int
    keep: dict[str, Tensor]
    readers: tuple[str, ...]


# The SSH units by depth: a unit reads only units of earlier depths, so each depth is refitted on the
# outputs of the depths before it as already refitted.
DEPTHS = (("conv3x3", "conv5x5_1"), ("conv5x5_2", "conv7x7_2"), ("conv7x7_3",))


def refit(model: nn.Module, reference: nn.Module, rebuilt: list[Rebuilt], images: Tensor) -> list[dict[str, Any]]:
    """Refit the rebuilt SSHs' plain kernels, depth by depth, then their narrowed readers, to reproduce the
    reference's outputs (least squares, see :mod:`compressor.refit`); the errors, per rebuilt SSH."""
    errors: list[dict[str, Any]] = [{} for _ in rebuilt]
    jobs: list[list[tuple[int, str, nn.Conv2d, nn.Module, Tensor | None]]] = []
    for depth in DEPTHS:
        jobs.append([(i, unit, getattr(model.ssh[r.level], unit).conv, getattr(reference.ssh[r.level], unit).conv,
                      r.keep[unit]) for i, r in enumerate(rebuilt) for unit in depth])
    jobs.append([(i, name, model.get_submodule(name), reference.get_submodule(name), None)
                 for i, r in enumerate(rebuilt) for name in r.readers])
    for job in jobs:
        job = [item for item in job if _dense(item[2])]
        if not job:
            continue
        fitted = refit_convs([ConvRefit(conv, old, keep) for _, _, conv, old, keep in job], model, reference, images)
        for (i, where, *_), error in zip(job, fitted):
            errors[i][where] = error.as_record()
    return errors


@dataclass(frozen=True)
class Reader:
    """What reads one SSH module's output: it loses the input columns of the channels the SSH drops."""

    #: The layers holding those columns (a layer shared between levels cannot narrow for one of them).
    layers: tuple[nn.Module, ...]
    #: The convs among them whose input columns are narrowed (what a refit refits).
    convs: tuple[nn.Module, ...]
    #: The SSH output width must stay a multiple of this (a channel shuffle's groups).
    divisor: int
    #: Drops the columns of every channel not in ``kept`` (SSH output indices, ascending, old numbering).
    narrow: Callable[[Tensor], None]


def reader_of(model: nn.Module, level: int) -> Reader | None:
    """The reader of ``ssh[level]``'s output, or None when it is nothing this pass can narrow.

    A model with channel-shuffle blocks (FeatherFace) feeds each SSH into its
    level's block; otherwise (RetinaFace) the heads' 1x1 convs of the level read
    the SSH output directly: one per output with SeparateHeads, one with UnifiedHeads.
    """
    shuffle = getattr(model, "shuffle", None)
    if shuffle is not None:
        block = shuffle[level] if level < len(shuffle) else None
        if not isinstance(block, ChannelShuffleBlock):
            return None
        return Reader((block,), (block.reduce,), block.groups, lambda kept: slice_shuffle_input(block, kept))
    lists = head_conv_lists(getattr(model, "heads", None))
    if not lists or not all(level < len(convs) and _dense(convs[level]) for convs in lists):
        return None

    def narrow(kept: Tensor) -> None:
        for convs in lists:
            convs[level] = conv_keep(convs[level], in_index=kept)

    layers = tuple(convs[level] for convs in lists)
    return Reader(layers, layers, 1, narrow)


def head_conv_lists(heads: nn.Module | None) -> list[nn.ModuleList]:
    """The per-level conv lists of detection heads (class, box, landmark; or the unified ones); empty for others."""
    if isinstance(heads, SeparateHeads):
        return [heads.class_convs, heads.box_convs, heads.landmark_convs]
    if isinstance(heads, UnifiedHeads):
        return [heads.convs]
    return []


def _dense(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.groups == 1


def _divisor(model: nn.Module, level: int) -> int:
    # Unchanged widths need no reader: any SSH can change its convs.
    reader = reader_of(model, level)
    return reader.divisor if reader is not None else 1


def _checked_levels(model: nn.Module, levels: list[int] | None) -> list[int]:
    count = len(model.ssh)
    if levels is None:
        levels = list(range(count))
    bad = [level for level in levels if not 0 <= level < count]
    if bad:
        raise ValueError(f"levels: {bad} out of range 0..{count - 1}")
    for level in levels:
        if not isinstance(model.ssh[level], SSH):
            raise ValueError(f"levels: ssh[{level}] is a {type(model.ssh[level]).__name__}, not an SSH")
    return sorted(set(levels))


def required_reader(model: nn.Module, level: int) -> Reader:
    """The reader of ``ssh[level]``, which a narrower SSH needs; ValueError naming ``width_ratio`` without one."""
    reader = reader_of(model, level)
    if reader is None:
        raise ValueError(f"width_ratio: ssh[{level}] feeds neither a channel-shuffle block nor plain 1x1 "
                         "head convs, whose inputs this pass could narrow with it")
    return reader


def _check_readers(model: nn.Module, levels: list[int]) -> None:
    """Every narrowed SSH has a reader to narrow with it, used by no other level."""
    readers = [reader_of(model, level) for level in range(len(model.ssh))]
    for level in levels:
        reader = required_reader(model, level)
        # A shared layer would have its input sliced once per level that uses it.
        others = {id(layer) for other, found in enumerate(readers) if other != level and found is not None
                  for layer in found.layers}
        if any(id(layer) in others for layer in reader.layers):
            raise ValueError(f"levels: the layers reading ssh[{level}] are shared with another level; "
                             "narrowing its SSH would narrow the others' inputs too")


def _check_groups_divide(in_channels: int, widths: Widths, groups: int, level: int) -> None:
    for unit, (_, source) in UNITS.items():
        inputs = in_channels if source is None else widths.of(source)
        if inputs % groups or widths.of(unit) % groups:
            raise ValueError(f"groups: {groups} does not divide ssh[{level}].{unit}'s "
                             f"{inputs} input and {widths.of(unit)} output channels")


def widths_of(ssh: SSH) -> Widths:
    """The five widths ``ssh`` has now."""
    return Widths(**{UNITS[unit][0]: getattr(ssh, unit).out_channels for unit in UNITS})


def new_widths(ssh: SSH, ratio: float, shuffle_groups: int, level: int) -> Widths:
    """The five widths times ``ratio`` (rounded half up), the output width kept divisible by the shuffle groups."""
    current = asdict(widths_of(ssh))
    widths = {name: int(width * ratio + 0.5) for name, width in current.items()}
    empty = [name for name, width in widths.items() if width < 1]
    if empty:
        raise ValueError(f"width_ratio: {ratio} leaves no channel in ssh[{level}] {', '.join(empty)}")
    # The shuffle needs the concatenation divisible by its groups; the widest
    # branch (3x3) absorbs the rounding, down if it can, else up within what it had.
    remainder = (widths["out3x3"] + widths["out5x5"] + widths["out7x7"]) % shuffle_groups
    if remainder:
        down, up = widths["out3x3"] - remainder, widths["out3x3"] + shuffle_groups - remainder
        if down >= 1:
            widths["out3x3"] = down
        elif up <= current["out3x3"]:
            widths["out3x3"] = up
        else:
            raise ValueError(f"width_ratio: {ratio} leaves ssh[{level}] an output width that the "
                             f"{shuffle_groups}-group channel shuffle cannot divide")
    return Widths(**widths)


def dense_weight(conv: nn.Module, fold_offsets: bool = False) -> Tensor:
    """The 3x3 kernel of an SSH conv as a dense (out, in, 3, 3) weight."""
    if isinstance(conv, DeformableConv2d):
        return folded_dcn_weight(conv) if fold_offsets else conv.regular_conv.weight.detach()
    return dense_conv_weight(conv)


def folded_dcn_weight(conv: DeformableConv2d) -> Tensor:
    """The plain kernel closest to a DCN whose offsets and modulation were input-independent.

    The offset and modulator convs' biases are the part of the sampling that
    does not depend on the input: kernel point k samples at its grid position
    shifted by (dy_k, dx_k) = offset bias (torchvision's (y, x) order), scaled by
    m_k = 2*sigmoid(modulator bias).  A fixed fractional shift is a bilinear mix
    of whole-pixel taps, so W_k * m_k is spread over the taps it lands between.
    Taps outside the 3x3 window cannot be represented and are dropped.  With zero
    biases this is ``regular_conv.weight`` exactly.  Why bother: a DCN trained with
    large offsets loses much less when its mean sampling pattern is kept.
    """
    weight = conv.regular_conv.weight.detach()
    kh, kw = weight.shape[-2:]
    shift = conv.offset_conv.bias.detach().view(kh * kw, 2)
    scale = 2.0 * torch.sigmoid(conv.modulator_conv.bias.detach())
    rows = torch.arange(kh, dtype=weight.dtype, device=weight.device)
    cols = torch.arange(kw, dtype=weight.dtype, device=weight.device)
    point_row, point_col = rows.repeat_interleave(kw), cols.repeat(kh)
    # Bilinear weight of each kernel point (rows of these) on each tap row / column.
    on_row = torch.relu(1 - (point_row[:, None] + shift[:, :1] - rows[None]).abs())
    on_col = torch.relu(1 - (point_col[:, None] + shift[:, 1:] - cols[None]).abs())
    spread = scale[:, None, None] * on_row[:, :, None] * on_col[:, None, :]  # point x tap row x tap col
    folded = torch.einsum("oip,prc->oirc", weight.flatten(2), spread)
    return folded.contiguous()


def unit_importance(unit: ConvBN, fold_offsets: bool = False) -> Tensor:
    """Per output channel: L1 of the dense kernel times the BN's scale |gamma| / sqrt(var + eps).

    The BN rescales each channel after the conv, so the kernel's L1 alone would
    rank channels by a magnitude the network never sees.
    """
    bn = unit.bn
    scale = bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    return l1_importance(dense_weight(unit.conv, fold_offsets)) * scale


def kept_channels(ssh: SSH, widths: Widths, fold_offsets: bool = False) -> dict[str, Tensor]:
    """For each unit, the indices of the output channels it keeps (ascending)."""
    return {unit: top_k(unit_importance(getattr(ssh, unit), fold_offsets), widths.of(unit)) for unit in UNITS}


def rebuild(old: SSH, widths: Widths, keep: dict[str, Tensor], target: Target) -> SSH:
    """A new SSH of the target kind and widths, carrying the kept channels' trained weights."""
    like = old.conv3x3.bn.weight  # the device and dtype the model lives in
    in_channels = old.conv3x3.in_channels
    new = SSH(in_channels, widths.out3x3, widths.mid5x5, widths.out5x5, widths.mid7x7, widths.out7x7,
              deformable=target.kind == "deformable", groups=target.groups)
    new = new.to(device=like.device, dtype=like.dtype)
    all_inputs = torch.arange(in_channels, device=like.device)
    for unit, (_, source) in UNITS.items():
        in_index = all_inputs if source is None else keep[source]
        old_unit = getattr(old, unit)
        weight = dense_weight(old_unit.conv, target.fold_offsets)[keep[unit]][:, in_index]
        carry_unit(old_unit, getattr(new, unit), keep[unit], in_index, weight)
    new.train(old.training)
    return new


def carry_unit(old: ConvBN, new: ConvBN, out_index: Tensor, in_index: Tensor, weight: Tensor) -> None:
    """Copy ``weight`` (the kept rows/columns of ``old``'s dense kernel) and the kept BN channels into ``new``."""
    with torch.no_grad():
        if isinstance(new.conv, DeformableConv2d):
            new.conv.regular_conv.weight.copy_(weight)
            if isinstance(old.conv, DeformableConv2d):
                new.conv.offset_conv = conv_keep(old.conv.offset_conv, in_index=in_index)
                new.conv.modulator_conv = conv_keep(old.conv.modulator_conv, in_index=in_index)
            # Otherwise the fresh offset/modulator convs are zero: the DCN equals the source conv.
        else:
            new.conv.weight.copy_(grouped_weight(weight, new.conv.groups))
    new.bn = batchnorm_keep(old.bn, out_index)


def concat_index(ssh: SSH, keep: dict[str, Tensor]) -> Tensor:
    """The kept channels of the SSH output (the concatenation of the branches), in old numbering."""
    parts, offset = [], 0
    for unit in BRANCHES:
        parts.append(keep[unit] + offset)
        offset += getattr(ssh, unit).out_channels
    return torch.cat(parts)


def shuffle_columns(kept: Tensor, channels: int, groups: int) -> Tensor:
    """For each input of the new reduce conv, the input of the old one that saw the same channel.

    Both sides follow :func:`~featherface.modules.shuffle.shuffle_permutation`,
    the block's own shuffle: the new conv's input ``j`` sees channel
    ``kept[p_new[j]]``, which the old shuffle put at ``argsort(p_old)[kept[p_new[j]]]``.
    """
    old_position = torch.argsort(shuffle_permutation(channels, groups))
    new_order = shuffle_permutation(len(kept), groups)
    return old_position[kept.cpu()[new_order]]


def slice_shuffle_input(block: ChannelShuffleBlock, kept: Tensor) -> None:
    """Drop the reduce conv's input columns of the channels the SSH no longer produces."""
    columns = shuffle_columns(kept, block.reduce.in_channels, block.groups)
    block.reduce = conv_keep(block.reduce, in_index=columns)


@hookimpl
def compressor_passes() -> list[type[Pass]]:
    return [SSHSlim]
