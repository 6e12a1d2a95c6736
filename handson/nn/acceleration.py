"""The book's library, chapter "Accelerating attention".

Generated from book/acceleration.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['online_softmax', 'tiled_attention', 'naive_attention', 'LargestTensor']


def online_softmax(x, block_size):
    """Softmax over the last dimension of x, reading it block_size columns at a time.

    One pass keeps, for every row, the running maximum m and the running sum l of exp(x - m),
    rescaling l by exp(m_old - m_new) whenever the maximum grows; a second pass writes exp(x - m) / l.
    """
    shape = x.shape[:-1]
    m = torch.full(shape, float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros(shape, dtype=x.dtype, device=x.device)
    for j in range(0, x.size(-1), block_size):
        block = x[..., j:j + block_size]
        m_new = torch.maximum(m, block.amax(dim=-1))
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)     # a row with only -inf so far
        l = l * torch.exp(m - m_safe) + torch.exp(block - m_safe[..., None]).sum(dim=-1)
        m = m_new
    return torch.exp(x - m[..., None]) / l[..., None]


def tiled_attention(q, k, v, block_q=64, block_k=64, causal=False, scale=None):
    """FlashAttention's tiled algorithm in plain PyTorch; -> (out, logsumexp).

    q (..., L, d), k (..., S, d), v (..., S, d_v) -> out (..., L, d_v), logsumexp (..., L) of the
    scaled (and masked) scores. Queries are taken block_q at a time and keys block_k at a time;
    each query block keeps a running maximum m, a running sum l and an unnormalised output o, and
    no tensor larger than a (block_q, block_k) tile of scores is ever built. causal is aligned at
    the bottom right; tiles entirely above the diagonal are skipped. A query with no key gets a
    zero output and a logsumexp of -inf.
    """
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    offset = S - L                                   # query i is position i + offset
    batch = q.shape[:-2]
    outs, lses = [], []
    for i0 in range(0, L, block_q):
        i1 = min(i0 + block_q, L)
        q_tile = q[..., i0:i1, :] * scale
        m = torch.full((*batch, i1 - i0), float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros((*batch, i1 - i0), dtype=q.dtype, device=q.device)
        o = torch.zeros((*batch, i1 - i0, v.size(-1)), dtype=q.dtype, device=q.device)
        for j0 in range(0, S, block_k):
            j1 = min(j0 + block_k, S)
            if causal and j0 > i1 - 1 + offset:      # every key of the tile is after every query
                break
            s = q_tile @ k[..., j0:j1, :].transpose(-2, -1)           # (..., i1 - i0, j1 - j0)
            if causal and j1 - 1 > i0 + offset:      # the tile crosses the diagonal
                rows = torch.arange(i0, i1, device=q.device)[:, None] + offset   # global positions
                cols = torch.arange(j0, j1, device=q.device)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)   # no key yet: avoid -inf - -inf
            alpha = torch.exp(m - m_safe)                              # rescales what was summed so far
            p = torch.exp(s - m_safe[..., None])
            l = alpha * l + p.sum(dim=-1)
            o = alpha[..., None] * o + p @ v[..., j0:j1, :]
            m = m_new
        has_key = l > 0
        l_safe = torch.where(has_key, l, 1.0)
        outs.append(o / l_safe[..., None])           # the division, once, at the end (FlashAttention-2)
        lses.append(torch.where(has_key, m + torch.log(l_safe), float("-inf")))
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def naive_attention(q, k, v, causal=False, scale=None):
    """Attention the direct way, building the (..., L, S) scores; -> (out, logsumexp).

    causal is aligned at the bottom right (query i is position i + S - L). A query with no key
    gets a zero output and a logsumexp of -inf.
    """
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    has_key = lse > float("-inf")
    w = torch.exp(s - torch.where(has_key, lse, 0.0)[..., None])
    return w @ v, lse


from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) that any operation creates while the mode is on.

    with LargestTensor() as rec: f(...); then rec.numel, rec.shape and rec.op (the ATen operator).
    Views count too (they are at most as large as the tensor they view).
    """

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, None, None

    @classmethod
    def _should_skip_dynamo(cls):
        return False                  # an eager measuring tool: keep __torch_dispatch__ unwrapped

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape, self.op = t.numel(), tuple(t.shape), str(func.overloadpacket)
        return out
