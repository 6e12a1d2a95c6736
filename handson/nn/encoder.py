"""The book's library, chapter "The encoder".

Generated from book/encoder.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['FeedForward']


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
