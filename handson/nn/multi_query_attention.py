"""The book's library, chapter "Multi-query and grouped-query attention".

Generated from book/multi_query_attention.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['repeat_kv', 'GroupedQueryAttention', 'mha_to_gqa', 'attention', 'MultiHeadAttention']


from handson.nn.multi_head_attention import merge_heads, split_heads
from handson.nn.self_attention import scaled_dot_product_attention


def repeat_kv(x, n_rep):
    """(B, H_kv, L, d) -> (B, H_kv * n_rep, L, d); head j is repeated at positions j*n_rep ... j*n_rep + n_rep - 1."""
    B, n_kv, L, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(B, n_kv, n_rep, L, d).reshape(B, n_kv * n_rep, L, d)


class GroupedQueryAttention(nn.Module):
    """Grouped-query self-attention, chapter version: no mask, not causal."""

    def __init__(self, d_model, n_head, n_kv_head):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.d_head = d_model // n_head
        self.q = nn.Linear(d_model, n_head * self.d_head)
        self.k = nn.Linear(d_model, n_kv_head * self.d_head)
        self.v = nn.Linear(d_model, n_kv_head * self.d_head)
        self.o = nn.Linear(n_head * self.d_head, d_model)

    def forward(self, x):
        """x: (B, L, d_model) -> (out (B, L, d_model), weights (B, n_head, L, L))."""
        g = self.n_head // self.n_kv_head
        q = split_heads(self.q(x), self.n_head)
        k = repeat_kv(split_heads(self.k(x), self.n_kv_head), g)
        v = repeat_kv(split_heads(self.v(x), self.n_kv_head), g)
        out, weights = scaled_dot_product_attention(q, k, v)
        return self.o(merge_heads(out)), weights


def mha_to_gqa(mha, n_kv_head):
    """A GroupedQueryAttention whose K/V heads are the means of the MHA's K/V heads in each group."""
    n_head, d_head = mha.n_head, mha.d_head
    d_model = mha.q.in_features
    gqa = GroupedQueryAttention(d_model, n_head, n_kv_head).to(mha.q.weight.dtype)
    g = n_head // n_kv_head
    with torch.no_grad():
        for name in "qo":                                        # queries and output: unchanged
            getattr(gqa, name).load_state_dict(getattr(mha, name).state_dict())
        for name in "kv":                                        # (H*d, D) -> (H_kv, g, d, D) -> mean over g
            src, dst = getattr(mha, name), getattr(gqa, name)
            dst.weight.copy_(src.weight.view(n_kv_head, g, d_head, d_model).mean(1).reshape(-1, d_model))
            dst.bias.copy_(src.bias.view(n_kv_head, g, d_head).mean(1).reshape(-1))
    return gqa


from handson.nn.causal_masking import causal_mask


def attention(q, k, v, attn_mask=None, *, scale=None, is_causal=False, need_weights=True,
              dropout_p=0.0, enable_gqa=False):
    """Scaled dot-product attention over the last two dimensions; returns (out, weights).

    q (..., L, d), k (..., S, d), v (..., S, d_v) -> out (..., L, d_v), weights (..., L, S).
    attn_mask: bool (True = may attend) or float (added to the scores: ALiBi, relative biases),
        broadcastable to (..., L, S).
    scale: multiplies the scores; None means 1/sqrt(d).
    is_causal: adds the causal mask, aligned at the bottom right (query i is position i + S - L).
    need_weights: False computes with F.scaled_dot_product_attention and returns (out, None),
        never materialising the (..., L, S) weights.
    dropout_p: dropout on the weights (pass 0.0 in evaluation).
    enable_gqa: k, v have H_kv heads (dim -3) and q has H = g * H_kv; query head h uses K/V head h // g.
    A query with no allowed key gets zero weights and a zero result, and finite gradients.
    """
    L, S = q.size(-2), k.size(-2)
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = may attend) or float (added to the scores), "
                        f"not {attn_mask.dtype}")
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)
    sdpa_causal = is_causal and attn_mask is None and L == S and not need_weights
    if is_causal and L == 1:
        is_causal = False            # one query at the last position: it may attend every key
    if is_causal and not sdpa_causal:
        causal = causal_mask(L, S, device=q.device)
        if attn_mask is None:
            attn_mask = causal
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
    if enable_gqa and q.size(-3) % k.size(-3):
        raise ValueError(f"{q.size(-3)} query heads cannot share {k.size(-3)} key/value heads")
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))

    if attn_mask is None:
        has_key = None
    elif attn_mask.dtype == torch.bool:
        has_key = attn_mask.any(-1, keepdim=True)                      # (..., L, 1)
    else:
        has_key = (attn_mask > float("-inf")).any(-1, keepdim=True)

    if not need_weights:
        if has_key is not None:      # a row with no key attends everything (finite), zeroed below
            attn_mask = (attn_mask | ~has_key if attn_mask.dtype == torch.bool
                         else attn_mask.masked_fill(~has_key, 0.0))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=sdpa_causal, scale=scale, enable_gqa=enable_gqa)
        if has_key is not None:
            out = out.masked_fill(~has_key, 0.0)
        return out, None

    if enable_gqa and k.size(-3) != q.size(-3):
        g = q.size(-3) // k.size(-3)
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    scores = (q @ k.transpose(-2, -1)).mul_(scale)   # in place: the product is not saved for backward
    if has_key is not None and has_key.device.type != "meta" and bool(has_key.all()):
        has_key = None                                    # every row has a key: nothing to zero
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, float("-inf"))
        else:
            scores = scores + attn_mask
    if has_key is not None:
        scores = scores.masked_fill(~has_key, 0.0)       # a row with no key: finite, zeroed below
    weights = torch.softmax(scores, dim=-1)
    if has_key is not None:
        weights = weights.masked_fill(~has_key, 0.0)
    used = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return used @ v, weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped K/V heads: the attention core of the book.

    MultiHeadAttention(d_model, n_head, n_kv_head=None, head_dim=None, kdim=None, bias=True, dropout=0.0)
    Linear layers q: d_model -> n_head * head_dim, k and v: kdim -> n_kv_head * head_dim,
    o: n_head * head_dim -> d_model. n_kv_head defaults to n_head (MHA); 1 is MQA. head_dim
    defaults to d_model // n_head. kdim (the width of a cross-attention context) defaults to d_model.

    forward(x, attn_mask=None, *, context=None, is_causal=False, need_weights=True)
        = attend(*project(x, context), attn_mask, ...): project computes q (B, H, L, d_head) and
        k, v (B, H_kv, S, d_head); rotary encodings and a KV cache act on them between the two.
    Returns (out (B, L, d_model), weights (B, H, L, S) or None).
    """

    def __init__(self, d_model, n_head, n_kv_head=None, head_dim=None, *, kdim=None, bias=True,
                 dropout=0.0):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if head_dim is None:
            if d_model % n_head:
                raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}; pass head_dim")
            head_dim = d_model // n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} is not a multiple of n_kv_head={n_kv_head}")
        kdim = d_model if kdim is None else kdim
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = n_head, n_kv_head, head_dim, dropout
        self.q = nn.Linear(d_model, n_head * head_dim, bias=bias)
        self.k = nn.Linear(kdim, n_kv_head * head_dim, bias=bias)
        self.v = nn.Linear(kdim, n_kv_head * head_dim, bias=bias)
        self.o = nn.Linear(n_head * head_dim, d_model, bias=bias)

    def project(self, x, context=None):
        """x (B, L, d_model), context (B, S, kdim) or None -> q (B, H, L, d), k and v (B, H_kv, S, d)."""
        context = x if context is None else context
        return (split_heads(self.q(x), self.n_head), split_heads(self.k(context), self.n_kv_head),
                split_heads(self.v(context), self.n_kv_head))

    def attend(self, q, k, v, attn_mask=None, *, is_causal=False, need_weights=True):
        """Attention of projected heads, merged and projected by o: -> (out (B, L, d_model), weights)."""
        out, weights = attention(q, k, v, attn_mask, is_causal=is_causal, need_weights=need_weights,
                                 dropout_p=self.dropout if self.training else 0.0,
                                 enable_gqa=self.n_kv_head != self.n_head)
        return self.o(merge_heads(out)), weights

    def forward(self, x, attn_mask=None, *, context=None, is_causal=False, need_weights=True):
        q, k, v = self.project(x, context)
        return self.attend(q, k, v, attn_mask, is_causal=is_causal, need_weights=need_weights)
