"""compressor.refit: the least-squares kernel, checked against cases whose answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.refit import ConvRefit, FitSite, collect_fits, refit_convs


class TwoConvs(nn.Module):
    """A reference conv and a candidate conv reading the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.reference = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.candidate = nn.Conv2d(3, 4, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(x) + self.candidate(x)


def test_recovers_the_reference_kernel_exactly():
    torch.manual_seed(0)
    model = TwoConvs()
    (fit,) = collect_fits([FitSite(model.candidate, model.candidate, model.reference)], model, model,
                          torch.randn(3, 3, 12, 12))
    kernel, errors = fit.solve(model.candidate.weight, ridge=0.0)
    torch.testing.assert_close(kernel, model.reference.weight.detach(), atol=1e-5, rtol=1e-5)
    assert errors.fitted < 1e-10 < errors.start
    # The default ridge only pulls a little towards the starting kernel.
    pulled, pulled_errors = fit.solve(model.candidate.weight)
    torch.testing.assert_close(pulled, model.reference.weight.detach(), atol=1e-2, rtol=0)
    assert pulled_errors.fitted < 1e-4


def test_kept_channels_fit_the_kept_outputs_from_the_kept_inputs():
    # The reference reads only inputs 0 and 2 for outputs 1 and 3: dropping input 1 loses nothing there.
    torch.manual_seed(1)
    model = TwoConvs()
    with torch.no_grad():
        model.reference.weight[:, 1] = 0
    (fit,) = collect_fits([FitSite(model.candidate, model.candidate, model.reference)], model, model,
                          torch.randn(2, 3, 10, 10))
    keep_in, keep_out = torch.tensor([0, 2]), torch.tensor([1, 3])
    start = model.candidate.weight.detach()[keep_out][:, keep_in]
    kernel, errors = fit.solve(start, out_index=keep_out, in_index=keep_in, ridge=0.0)
    assert kernel.shape == (2, 2, 3, 3)
    torch.testing.assert_close(kernel, model.reference.weight.detach()[keep_out][:, keep_in], atol=1e-5, rtol=1e-5)
    assert errors.fitted < 1e-10


def test_a_layer_that_never_runs_is_named():
    model = TwoConvs()
    idle = nn.Conv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match="never ran"):
        collect_fits([FitSite(idle, idle, model.reference)], model, model, torch.randn(1, 3, 8, 8))


def test_a_bias_that_stays_is_not_fitted_into_the_kernel():
    torch.manual_seed(2)
    model = TwoConvs()
    model.reference.bias = nn.Parameter(torch.randn(4))
    model.candidate.bias = nn.Parameter(model.reference.bias.detach().clone())
    images = torch.randn(2, 3, 10, 10)
    (fit,) = collect_fits([FitSite(model.candidate, model.candidate, model.reference)], model, model, images)
    kernel, errors = fit.solve(model.candidate.weight, bias=model.candidate.bias, ridge=0.0)
    torch.testing.assert_close(kernel, model.reference.weight.detach(), atol=1e-5, rtol=1e-5)
    assert errors.fitted < 1e-10


def test_refit_convs_writes_the_kernel_in_place_and_keeps_the_bias():
    torch.manual_seed(3)
    model = TwoConvs()
    model.reference.bias = nn.Parameter(torch.randn(4))
    model.candidate.bias = nn.Parameter(model.reference.bias.detach()[[0, 2]].clone())
    model.candidate.weight = nn.Parameter(model.candidate.weight.detach()[[0, 2]].clone())
    model.forward = lambda x: (model.reference(x), model.candidate(x))  # candidate now has 2 of the 4 outputs
    bias = model.candidate.bias.detach().clone()
    (errors,) = refit_convs([ConvRefit(model.candidate, model.reference, keep=torch.tensor([0, 2]))], model, model,
                            torch.randn(2, 3, 10, 10))
    torch.testing.assert_close(model.candidate.weight.detach(), model.reference.weight.detach()[[0, 2]],
                               atol=1e-2, rtol=0)
    assert torch.equal(model.candidate.bias.detach(), bias)
    assert errors.fitted < 1e-4 < errors.start
