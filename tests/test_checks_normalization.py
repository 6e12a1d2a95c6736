"""The normalization exercise's checks: they accept correct norms and residual blocks, and reject the
known wrong variants with the diagnosis that names them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from handson.exercise_checks import normalization as xchecks

FORBIDDEN = xchecks.norm_delegates()


def _dims(x, shape):
    return tuple(range(x.dim() - len(shape), x.dim()))


def _shape(s):
    return (s,) if isinstance(s, int) else tuple(s)


class GoodLN(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, bias=True, *, variant=None):
        super().__init__()
        self.shape, self.eps, self.variant = _shape(normalized_shape), eps, variant
        self.weight = nn.Parameter(torch.ones(self.shape))
        self.bias = nn.Parameter(torch.zeros(self.shape)) if bias else None

    def forward(self, x):
        dims = _dims(x, self.shape)
        if self.variant == "batch":
            dims = (0,) + dims
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, keepdim=True, correction=1 if self.variant == "unbiased" else 0)
        den = var.sqrt() + self.eps if self.variant == "outside" else (var + self.eps).sqrt()
        y = (x - mean) / den * self.weight
        return y if self.bias is None else y + self.bias


class GoodRMS(nn.Module):
    def __init__(self, normalized_shape, eps=None, *, variant=None, gemma=False):
        super().__init__()
        self.shape, self.eps, self.variant, self.gemma = _shape(normalized_shape), eps, variant, gemma
        self.weight = nn.Parameter(torch.zeros(self.shape) if gemma else torch.ones(self.shape))

    def forward(self, x):
        dims = _dims(x, self.shape)
        if tuple(x.shape[-len(self.shape):]) != self.shape:
            raise ValueError("shape")
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if self.variant == "fixed":
            eps = 1e-6
        if self.variant == "centre":
            x = x - x.mean(dims, keepdim=True)
        if self.variant == "float32":
            return (x.float() * torch.rsqrt(x.float().pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype) * self.weight
        g = (1 + self.weight) if self.gemma else self.weight
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps) * g


def _x(*shape, dtype=torch.float64):
    return (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)


@pytest.mark.parametrize("shape, x", [(8, _x(2, 5, 8)), ((4, 5), _x(2, 3, 4, 5)), (6, _x(3, 6, dtype=torch.float32))])
def test_correct_norms_pass(shape, x):
    xchecks.check_layernorm(GoodLN, shape, x, forbidden=FORBIDDEN)
    xchecks.check_layernorm(GoodLN, shape, x, bias=False, eps=1e-3, forbidden=FORBIDDEN)
    xchecks.check_rmsnorm(GoodRMS, shape, x, forbidden=FORBIDDEN)
    xchecks.check_rmsnorm(GoodRMS, shape, x, eps=1e-6, forbidden=FORBIDDEN)
    xchecks.check_gemma_rmsnorm(lambda s, eps=1e-6: GoodRMS(s, eps, gemma=True), shape, x, forbidden=FORBIDDEN)


@pytest.mark.parametrize("variant, phrase", [("unbiased", "unbiased variance"), ("outside", "eps outside"),
                                             ("batch", "batch dimension")])
def test_layernorm_variants_are_named(variant, phrase):
    with pytest.raises(AssertionError, match=phrase):
        xchecks.check_layernorm(lambda s, bias=True: GoodLN(s, bias=bias, variant=variant), 8, _x(3, 5, 8),
                                forbidden=FORBIDDEN)


@pytest.mark.parametrize("variant, phrase", [("fixed", "eps fixed at 1e-06"), ("centre", "mean is subtracted"),
                                             ("float32", "float32")])
def test_rmsnorm_variants_are_named(variant, phrase):
    with pytest.raises(AssertionError, match=phrase):
        xchecks.check_rmsnorm(lambda s: GoodRMS(s, variant=variant), 8, _x(3, 5, 8), forbidden=FORBIDDEN)


def test_delegation_and_parameters_are_checked():
    with pytest.raises(AssertionError, match="nn.LayerNorm"):
        xchecks.check_layernorm(lambda s, bias=True: nn.LayerNorm(s, bias=bias), 8, _x(2, 3, 8), forbidden=FORBIDDEN)
    with pytest.raises(AssertionError, match="bias was created"):
        xchecks.check_parameters(GoodLN(4), (4,), bias=False)
    with pytest.raises(AssertionError, match="initialised wrong"):
        xchecks.check_parameters(GoodRMS(4, gemma=True), (4,), bias=None)


def test_per_vector_and_shape_checks():
    xchecks.check_per_vector(GoodLN(6).double(), _x(4, 3, 6))
    with pytest.raises(AssertionError, match="batch dimension"):
        xchecks.check_per_vector(GoodLN(6, variant="batch").double(), _x(4, 3, 6))
    xchecks.check_shape_mismatch_raises(GoodRMS((2, 3)), torch.randn(2, 3, 2), "RMSNorm((2, 3))")
    with pytest.raises(AssertionError, match="ValueError"):
        xchecks.check_shape_mismatch_raises(nn.Identity(), torch.randn(2, 3, 2), "Identity")


def _pre(x, f, n, norm_first):
    return x + f(n(x)) if norm_first else n(x + f(x))


def test_residual_and_stack():
    for nf in (False, True):
        xchecks.check_residual(_pre, nf, forbidden={})

    def stack(x, subs, norms, nf, final=None):
        for f, n in zip(subs, norms):
            x = _pre(x, f, n, nf)
        return x if final is None else final(x)

    xchecks.check_stack(stack, True, True, forbidden={})
    xchecks.check_stack(stack, False, False, forbidden={})
    with pytest.raises(AssertionError, match="swapped"):
        xchecks.check_residual(lambda x, f, n, nf: _pre(x, f, n, not nf), True, forbidden={})
    with pytest.raises(AssertionError, match="branch output"):
        xchecks.check_residual(lambda x, f, n, nf: x + n(f(x)), False, forbidden={})
    with pytest.raises(AssertionError, match="final norm 0 times"):
        xchecks.check_stack(lambda x, s, n, nf, final=None: stack(x, s, n, nf), True, True, forbidden={})
