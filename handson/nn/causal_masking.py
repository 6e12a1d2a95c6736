"""The book's library, chapter "Causal masking".

Generated from book/causal_masking.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['causal_mask']


def causal_mask(L, S=None, *, device=None):
    """Causal mask (L, S), bool, True = may attend, aligned at the bottom right.

    Query i is the token at position i + S - L of a sequence whose last S tokens are the keys, so it
    may attend key j iff j <= i + S - L. For L == S this is the lower triangle; for L < S (new
    queries over cached keys) the last query sees every key; for L > S the first L - S queries
    see no key at all.
    """
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L)
