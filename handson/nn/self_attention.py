"""The book's library, chapter "Self-attention".

Generated from book/self_attention.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['softmax', 'scaled_dot_product_attention', 'SelfAttention']


def softmax(s, dim=-1):
    """Softmax written out, with the max subtracted for numerical stability."""
    e = torch.exp(s - s.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(q, k, v, attn_mask=None):
    """Scaled dot-product attention.

    q: (..., L, d_k), k: (..., S, d_k), v: (..., S, d_v).
    attn_mask: optional bool tensor broadcastable to (..., L, S); True = may attend.
    Returns (out, weights) with shapes (..., L, d_v) and (..., L, S).
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale            # (..., L, S)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)               # each row sums to 1
    return weights @ v, weights


class SelfAttention(nn.Module):
    """Single-head self-attention: x -> o(attention(q(x), k(x), v(x)))."""

    def __init__(self, d_model):
        super().__init__()
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x, attn_mask=None):
        """x: (..., L, d_model); attn_mask: bool, broadcastable to (..., L, L), True = may attend."""
        out, weights = scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), attn_mask)
        return self.o(out), weights
