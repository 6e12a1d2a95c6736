"""The book's library, chapter "Cross-attention".

Generated from book/cross_attention.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CrossAttention']


from handson.nn.multi_head_attention import attention


class CrossAttention(nn.Module):
    """Single-head cross-attention: queries from x, keys and values from context."""

    def __init__(self, d_model):
        super().__init__()
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x, context, attn_mask=None):
        """x: (B, L, d_model), the target; context: (B, S, d_model), the source.

        attn_mask: bool, broadcastable to (B, 1, L, S), True = may attend.
        Returns out (B, L, d_model) and weights (B, 1, L, S).
        """
        q = self.q(x).unsqueeze(1)              # (B, 1, L, d_model): one head
        k = self.k(context).unsqueeze(1)        # (B, 1, S, d_model)
        v = self.v(context).unsqueeze(1)        # (B, 1, S, d_model)
        out, weights = attention(q, k, v, attn_mask)
        return self.o(out.squeeze(1)), weights
