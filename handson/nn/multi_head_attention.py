"""The book's library, chapter "Multi-head attention".

Generated from book/multi_head_attention.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['split_heads', 'merge_heads', 'attention', 'MultiHeadAttention']


def split_heads(t, n_head):
    """(..., L, n_head * d_head) -> (..., n_head, L, d_head): head h takes columns h*d_head ... (h+1)*d_head - 1."""
    return t.unflatten(-1, (n_head, -1)).transpose(-3, -2)


def merge_heads(t):
    """(..., n_head, L, d_head) -> (..., L, n_head * d_head), the inverse of split_heads."""
    return t.transpose(-3, -2).flatten(-2)


def attention(q, k, v, attn_mask=None, scale=None):
    """Scaled dot-product attention over the last two dimensions; returns (out, weights).

    attn_mask: bool, broadcastable to (..., L, S), True = may attend. scale defaults to 1/sqrt(d_k).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention: x (B, L, d_model) -> (out (B, L, d_model), weights (B, H, L, L))."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.d_head = d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def split_heads(self, t):
        """(B, L, d_model) -> (B, n_head, L, d_head), by the module-level split_heads."""
        return split_heads(t, self.n_head)

    def merge_heads(self, t):
        """(B, n_head, L, d_head) -> (B, L, d_model), by the module-level merge_heads."""
        return merge_heads(t)

    def forward(self, x, attn_mask=None):
        q = self.split_heads(self.q(x))
        k = self.split_heads(self.k(x))
        v = self.split_heads(self.v(x))
        out, weights = attention(q, k, v, attn_mask)       # (B, H, L, d_head), (B, H, L, L)
        return self.o(self.merge_heads(out)), weights
