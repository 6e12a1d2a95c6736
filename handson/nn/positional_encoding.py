"""The book's library, chapter "Positional encoding".

Generated from book/positional_encoding.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['sinusoidal_encoding', 'rope_cos_sin', 'rotate_half', 'apply_rope', 'alibi_slopes', 'alibi_bias']


def sinusoidal_encoding(n_positions, d_model, base=10000.0, *, dtype=None, device=None):
    """Sinusoidal encodings of positions 0 .. n_positions - 1, (n_positions, d_model) (Vaswani et al. 3.5).

    PE[p, 2i] = sin(p / base^(2i / d_model)) and PE[p, 2i + 1] = cos(p / base^(2i / d_model)): sine and
    cosine interleaved, pair i turning at the frequency base^(-2i / d_model). Computed in float64, then
    cast to dtype (default torch.get_default_dtype()); an odd d_model ends with a sine column.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    pos = torch.arange(n_positions, dtype=torch.float64, device=device)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
    angle = pos[:, None] / base ** (two_i / d_model)               # (n_positions, ceil(d_model / 2))
    pe = torch.empty(n_positions, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.to(dtype)


def rope_cos_sin(n_positions, head_dim, base=10000.0, *, offset=0, dtype=None, device=None):
    """cos, sin of the rotary angles, each (n_positions, head_dim), in the rotate-half layout.

    Position m = offset, ..., offset + n_positions - 1 (offset: the number of tokens before these, e.g.
    the length of a KV cache) turns pair i = (i, i + head_dim / 2) by the angle m * theta_i with
    theta_i = base^(-2i / head_dim); cos = cat(cos(m theta), cos(m theta)) and likewise sin.
    Computed in float64, then cast to dtype (default torch.get_default_dtype()).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions: head_dim={head_dim} must be even")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    pos = torch.arange(offset, offset + n_positions, dtype=torch.float64, device=device)
    angle = pos[:, None] * theta                                    # (n_positions, head_dim / 2)
    angle = torch.cat([angle, angle], dim=-1)                       # rotate-half layout
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotary position embedding of x (..., L, head_dim), rotate-half pairing (i, i + head_dim / 2).

    cos, sin: (L, head_dim) from rope_cos_sin, or anything broadcastable to x (e.g. (B, 1, L, head_dim)
    for per-row positions); they are cast to x.dtype, so the result has x's shape and dtype.
    Apply it to queries and keys after their projection, never to values.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def alibi_slopes(n_head, *, dtype=None, device=None):
    """The ALiBi slope of each head, (n_head,), as the reference code's get_slopes (Press et al.).

    For n a power of two: 2^(-8/n), 2^(-16/n), ..., 2^(-8) (a geometric sequence starting at its ratio).
    Otherwise, with p the largest power of two below n_head: the p slopes of p heads, then every other
    slope of 2p heads (2^(-4/p), 2^(-12/p), ...), as many as are missing.
    """
    if n_head < 1:
        raise ValueError(f"n_head={n_head} must be at least 1")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    p = 1 << (n_head.bit_length() - 1)                               # largest power of two <= n_head
    slopes = [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]
    slopes += [2.0 ** (-8.0 * k / (2 * p)) for k in range(1, 2 * p + 1, 2)][: n_head - p]
    return torch.tensor(slopes, dtype=torch.float64, device=device).to(dtype)


def alibi_bias(n_head, n_queries, n_keys=None, *, dtype=None, device=None):
    """ALiBi's additive bias, (n_head, n_queries, n_keys), float, aligned at the bottom right.

    Query i is position i + S - L of the S keys (S = n_keys, default n_queries = L), as the library's
    causal mask; head h adds slope_h * (j - position of query i) to the score of key j: 0 on the
    (shifted) diagonal, -slope_h * distance for a key `distance` tokens before the query. Keys after
    the query get positive values: the bias does not mask the future, combine it with a causal mask.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    S = n_queries if n_keys is None else n_keys
    q_pos = torch.arange(n_queries, dtype=torch.float64, device=device) + (S - n_queries)
    k_pos = torch.arange(S, dtype=torch.float64, device=device)
    relative = k_pos[None, :] - q_pos[:, None]                      # (L, S): j - i, <= 0 in the past
    slopes = alibi_slopes(n_head, dtype=torch.float64, device=device)
    return (slopes[:, None, None] * relative).to(dtype)
