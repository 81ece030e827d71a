"""Least-squares refits of conv kernels: carry a layer's function, not only its weights, into a new structure.

A pass that changes what a conv reads (a DCN becoming a plain conv, a narrower
input, a shallower block before it) can slice or fold the trained kernel, but the
sliced kernel no longer produces the outputs the rest of the network was trained
on.  Given a few real images, the kernel that best reproduces those outputs is a
linear least-squares problem over the conv's input patches, solved in closed form:

    min_W ||A W - Y||² + λ ||W - W_start||²

with A the patches the new conv sees (one row per output position), Y what the
reference layer produced at the same positions, and a small ridge λ pulling
towards the sliced kernel along directions the images do not excite.  Only the
normal equations (AᵀA, AᵀY, ||Y||²) are kept, so memory does not grow with the
number of images.  Family-agnostic: a pass says which convs to refit against
which reference layers (:class:`FitSite`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The ridge pull towards the starting kernel, relative to the mean feature energy (the diagonal of AᵀA):
#: enough to pin down directions the images never excite, too little to matter elsewhere.
RIDGE = 1e-3
#: The most images a pass's ``fit_images`` may ask for: each costs one forward of both models.
MAX_FIT_IMAGES = 256


def fit_reference(model: nn.Module, fit_images: int,
                  sample_inputs: Callable[[int], Tensor] | None) -> nn.Module | None:
    """What a pass's refits reproduce: a copy of ``model`` as the pass found it, or None when ``fit_images`` is 0.

    Refused (``ValueError`` on the ``fit_images`` field) when the run has no images to fit on.
    """
    if not fit_images:
        return None
    check_fit_images(fit_images, sample_inputs)
    return copy.deepcopy(model)


def check_fit_images(fit_images: int, sample_inputs: Callable[[int], Tensor] | None) -> None:
    """Refuse (``ValueError`` on the ``fit_images`` field) a refit in a run that has no images to fit on."""
    if fit_images and sample_inputs is None:
        raise ValueError("fit_images: this run has no images to fit on")


@dataclass(frozen=True)
class FitSite:
    """One kernel to refit.

    ``reads``: the module (in the model being refitted) whose forward input the
    new kernel sees; ``kernel``: the conv giving the patch geometry (kernel size,
    padding, stride, dilation; groups 1); ``reference``: the module (in the
    reference model) whose forward output the new kernel should reproduce.
    """

    reads: nn.Module
    kernel: nn.Conv2d
    reference: nn.Module


@dataclass(frozen=True)
class ConvRefit:
    """One conv refitted in place on its own input: ``conv`` (in the model being refitted) should reproduce
    the output of ``reference`` (in the reference model), of which it kept the output channels ``keep``
    (None: all of them)."""

    conv: nn.Conv2d
    reference: nn.Module
    keep: Tensor | None = None


@dataclass(frozen=True)
class FitErrors:
    """Relative output error ||A W - Y||² / ||Y||² on the fit images, with the starting and the fitted kernel."""

    start: float
    fitted: float

    def as_record(self) -> dict[str, float]:
        return {"start": round(self.start, 6), "fitted": round(self.fitted, 6)}


@dataclass
class ConvFit:
    """The normal equations of one site, float64: ``gram`` = AᵀA, ``cross`` = AᵀY, ``energy`` = ||Y||² per
    output; with the column sums of A and of Y and the row count, for a kernel whose conv adds a bias."""

    gram: Tensor
    cross: Tensor
    energy: Tensor
    patch_sum: Tensor
    output_sum: Tensor
    rows: int = 0

    @classmethod
    def empty(cls, columns: int, outputs: int, like: Tensor) -> ConvFit:
        return cls(like.new_zeros(columns, columns), like.new_zeros(columns, outputs), like.new_zeros(outputs),
                   like.new_zeros(columns), like.new_zeros(outputs))

    def add(self, patches: Tensor, outputs: Tensor) -> None:
        self.gram += patches.T @ patches
        self.cross += patches.T @ outputs
        self.energy += (outputs * outputs).sum(0)
        self.patch_sum += patches.sum(0)
        self.output_sum += outputs.sum(0)
        self.rows += patches.shape[0]

    def solve(self, start: Tensor, out_index: Tensor | None = None, in_index: Tensor | None = None,
              bias: Tensor | None = None, ridge: float = RIDGE) -> tuple[Tensor, FitErrors]:
        """The refitted kernel, shaped like ``start`` (out, in, kh, kw), and the errors before and after.

        ``out_index`` / ``in_index``: the reference's output channels and the
        input channels the new kernel keeps (``start`` already has only those);
        empty: all of them.  ``bias``: the conv's own bias (kept outputs), which
        stays; the kernel fits the rest, Y - bias.  ``ridge``: relative to the
        mean diagonal of AᵀA.
        """
        points = start.shape[-2] * start.shape[-1]
        device = self.gram.device
        columns = torch.arange(self.gram.shape[0], device=device)
        if in_index is not None:
            taps = torch.arange(points, device=device)
            columns = (in_index.to(device)[:, None] * points + taps[None]).flatten()
        rows = torch.arange(self.cross.shape[1], device=device) if out_index is None else out_index.to(device)
        gram = self.gram[columns][:, columns]
        cross = self.cross[columns][:, rows]
        energy = self.energy[rows].sum()
        if bias is not None:
            # Aᵀ(Y - 1bᵀ) and ||Y - 1bᵀ||², from the sums.
            b = bias.detach().double().to(device)
            cross = cross - self.patch_sum[columns][:, None] * b[None]
            energy = energy - 2 * (b * self.output_sum[rows]).sum() + self.rows * (b * b).sum()
        begin = start.detach().double().flatten(1).T.to(device)  # columns x outputs
        pull = ridge * gram.diagonal().mean()
        fitted = torch.linalg.solve(gram + pull * torch.eye(len(columns), dtype=gram.dtype, device=device),
                                    cross + pull * begin)

        def relative_error(weight: Tensor) -> float:
            # ||AW - Y||² = tr(WᵀAᵀAW) - 2 tr(WᵀAᵀY) + ||Y||², from the normal equations alone.
            residual = (weight * (gram @ weight)).sum() - 2 * (weight * cross).sum() + energy
            return float(residual.clamp(min=0) / energy.clamp(min=1e-30))

        kernel = fitted.T.reshape(start.shape).to(dtype=start.dtype, device=start.device).contiguous()
        return kernel, FitErrors(relative_error(begin), relative_error(fitted))


def conv_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv``'s input patches as rows (batch x positions) by columns (in_channels x kh x kw, as in its weight)."""
    columns = F.unfold(x.double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


@torch.no_grad()
def collect_fits(sites: Sequence[FitSite], model: nn.Module, reference: nn.Module, images: Tensor) -> list[ConvFit]:
    """Run both models on ``images``, one at a time, and accumulate each site's normal equations.

    ``model`` and ``reference`` may be the same module (a layer refitted against
    its own outputs).  A module used several times per forward (shared between
    levels) contributes every use, in order, on both sides.
    """
    patches: dict[int, list[Tensor]] = {i: [] for i in range(len(sites))}
    outputs: dict[int, list[Tensor]] = {i: [] for i in range(len(sites))}
    fits: list[ConvFit | None] = [None] * len(sites)

    def reader(i: int):
        return lambda _m, inputs, _out: patches[i].append(conv_patches(inputs[0], sites[i].kernel))

    def producer(i: int):
        return lambda _m, _in, out: outputs[i].append(out.double().permute(0, 2, 3, 1).reshape(-1, out.shape[1]))

    handles = [site.reads.register_forward_hook(reader(i)) for i, site in enumerate(sites)]
    handles += [site.reference.register_forward_hook(producer(i)) for i, site in enumerate(sites)]
    modes = [(m, m.training) for m in {id(model): model, id(reference): reference}.values()]
    try:
        for m, _ in modes:
            m.eval()
        for image in images:
            for m, _ in modes:
                m(image[None])
            for i in range(len(sites)):
                if len(patches[i]) != len(outputs[i]):
                    raise ValueError(f"refit: layer {i + 1} of {len(sites)} read {len(patches[i])} inputs but its "
                                     f"reference gave {len(outputs[i])} outputs per image (one of them never ran?)")
                for a, y in zip(patches[i], outputs[i]):
                    if fits[i] is None:
                        fits[i] = ConvFit.empty(a.shape[1], y.shape[1], a)
                    fits[i].add(a, y)
                patches[i].clear()
                outputs[i].clear()
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.train(training)
    missing = [i for i, fit in enumerate(fits) if fit is None]
    if missing:
        raise ValueError(f"refit: {len(missing)} of {len(sites)} layers never ran on the fit images")
    return fits  # type: ignore[return-value]


def refit_convs(refits: Sequence[ConvRefit], model: nn.Module, reference: nn.Module,
                images: Tensor) -> list[FitErrors]:
    """Refit each conv's kernel in place (its bias stays) from one pass of both models over ``images``; the
    errors before and after, in order.  Convs that read one another's outputs go in separate calls, the
    reader after what it reads, so that it is fitted on the refitted outputs."""
    sites = [FitSite(reads=r.conv, kernel=r.conv, reference=r.reference) for r in refits]
    errors = []
    for r, fit in zip(refits, collect_fits(sites, model, reference, images)):
        kernel, error = fit.solve(r.conv.weight, out_index=r.keep, bias=r.conv.bias)
        with torch.no_grad():
            r.conv.weight.copy_(kernel)
        errors.append(error)
    return errors
