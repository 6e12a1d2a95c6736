"""The book's library, chapter "Normalization".

Generated from book/normalization.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['LayerNorm', 'RMSNorm', 'residual']


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension, as nn.LayerNorm(d, eps, bias=bias).

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance (divide by d)
    and eps inside the square root; weight starts at ones, bias at zeros (None when bias=False).
    """

    def __init__(self, d, eps=1e-5, bias=True, *, device=None, dtype=None):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=-1, keepdim=True)  # biased: divide by d, not d - 1
        y = (x - mean) / torch.sqrt(var + self.eps)
        y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self):
        return f"{self.d}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, as nn.RMSNorm(d, eps).

    y = x / sqrt(mean(x^2) + eps) * weight; weight starts at ones. eps=None uses
    torch.finfo(x.dtype).eps, the machine epsilon of the input's dtype, as nn.RMSNorm does.
    """

    def __init__(self, d, eps=None, *, device=None, dtype=None):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x):
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * self.weight

    def extra_repr(self):
        return f"{self.d}, eps={self.eps}"


def residual(x, sublayer, norm, norm_first):
    """One residual sub-block: pre-LN x + sublayer(norm(x)) if norm_first, else post-LN norm(x + sublayer(x))."""
    if norm_first:
        return x + sublayer(norm(x))
    return norm(x + sublayer(x))
