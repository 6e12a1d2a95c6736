"""The book's library, chapter "The encoder".

Generated from book/encoder.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['FeedForward', 'EncoderLayer', 'Encoder']


class FeedForward(nn.Module):
    """The position-wise feed-forward network: linear2(dropout(activation(linear1(x)))).

    FeedForward(d_model, d_ff, activation="relu", dropout=0.0): Linear layers linear1
    (d_model -> d_ff) and linear2 (d_ff -> d_model); activation "relu" or "gelu" (the exact,
    erf-based GELU, as nn.TransformerEncoderLayer's "gelu"); dropout after the activation, where
    nn.TransformerEncoderLayer puts it. Each position is transformed on its own.
    """

    def __init__(self, d_model, d_ff, activation="relu", dropout=0.0):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f'activation must be "relu" or "gelu", not {activation!r}')
        self.activation = activation
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        h = F.relu(self.linear1(x)) if self.activation == "relu" else F.gelu(self.linear1(x))
        return self.linear2(self.dropout(h))


from handson.nn import MultiHeadAttention
from handson.nn.normalization import LayerNorm, residual


class EncoderLayer(nn.Module):
    """One encoder layer: self-attention, then the feed-forward network, each in a residual sub-block.

    EncoderLayer(d_model, n_head, d_ff, dropout=0.0, norm_first=False, activation="relu")
    post-LN (norm_first=False, the paper):  x = norm1(x + dropout(attn(x)));  x = norm2(x + dropout(ff(x)))
    pre-LN  (norm_first=True):              x = x + dropout(attn(norm1(x)));  x = x + dropout(ff(norm2(x)))
    dropout also acts on the attention weights and inside the feed-forward (after the activation),
    as in nn.TransformerEncoderLayer. forward(x, attn_mask=None): x (B, L, d_model); attn_mask bool,
    True = may attend, broadcastable to (B, n_head, L, L) -> (B, L, d_model).
    """

    def __init__(self, d_model, n_head, d_ff, dropout=0.0, norm_first=False, activation="relu"):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, activation, dropout)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _attend(self, x, attn_mask):
        out, _ = self.self_attn(x, attn_mask, need_weights=False)
        return self.dropout1(out)

    def forward(self, x, attn_mask=None):
        x = residual(x, lambda h: self._attend(h, attn_mask), self.norm1, self.norm_first)
        return residual(x, lambda h: self.dropout2(self.ff(h)), self.norm2, self.norm_first)


class Encoder(nn.Module):
    """A stack of n_layers independent EncoderLayers; pre-LN stacks end with a final LayerNorm.

    Encoder(n_layers, d_model, n_head, d_ff, dropout=0.0, norm_first=False, activation="relu")
    with layers (nn.ModuleList) and norm (LayerNorm(d_model) when norm_first, else None: a post-LN
    layer already ends with a norm). forward(x, attn_mask=None): the same mask for every layer.
    """

    def __init__(self, n_layers, d_model, n_head, d_ff, dropout=0.0, norm_first=False, activation="relu"):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_head, d_ff, dropout, norm_first, activation)
                                    for _ in range(n_layers))
        self.norm = LayerNorm(d_model) if norm_first else None

    def forward(self, x, attn_mask=None):
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x if self.norm is None else self.norm(x)
