"""The book's library, chapter "Multi-head latent attention".

Generated from book/multi_latent_attention.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['MultiHeadLatentAttention', 'mla_cache_elements']


from handson.nn import attention, causal_mask, merge_heads, split_heads
from handson.nn.normalization import RMSNorm
from handson.nn.positional_encoding import apply_rope, rope_cos_sin


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 section 2.1), causal self-attention.

    MultiHeadLatentAttention(d_model, n_head, d_head, d_rope, d_c, d_c_q, rope_base=10000.0)
    Linear layers, no biases, named as in the paper:
      w_dq  d_model -> d_c_q            c^Q  = q_norm(w_dq x)          (query latent)
      w_uq  d_c_q -> n_head * d_head    q^C  = w_uq c^Q                (content queries, per head)
      w_qr  d_c_q -> n_head * d_rope    q^R  = RoPE(w_qr c^Q)          (rotary queries, per head)
      w_dkv d_model -> d_c              c^KV = kv_norm(w_dkv x)        (the cached latent)
      w_uk  d_c -> n_head * d_head      k^C  = w_uk c^KV
      w_uv  d_c -> n_head * d_head      v^C  = w_uv c^KV
      w_kr  d_model -> d_rope           k^R  = RoPE(w_kr x)            (ONE rotary key, shared by all heads)
      o     n_head * d_head -> d_model
    RMSNorms q_norm (on c^Q) and kv_norm (on c^KV), the book's RMSNorm (eps = machine epsilon).
    Head h: q = [q^C_h | q^R_h], k = [k^C_h | k^R]; scores scaled by 1 / sqrt(d_head + d_rope).
    Only c^KV and k^R need to be cached: mla_cache_elements(d_c, d_rope) numbers per token and layer.

    forward(x, attn_mask=None, absorbed=False): x (B, L, d_model); attn_mask bool (True = may attend),
    broadcastable to (B, n_head, L, L), combined with the causal mask. absorbed=False builds the
    per-head keys and values; absorbed=True computes from c^KV and k^R only (W^UK applied to the
    queries, W^UV after the weighted sum). Returns (out (B, L, d_model), weights (B, n_head, L, L)).
    """

    def __init__(self, d_model, n_head, d_head, d_rope, d_c, d_c_q, rope_base=10000.0):
        super().__init__()
        self.n_head, self.d_head, self.d_rope, self.d_c, self.d_c_q = n_head, d_head, d_rope, d_c, d_c_q
        self.rope_base = rope_base
        self.scale = 1.0 / math.sqrt(d_head + d_rope)
        self.w_dq = nn.Linear(d_model, d_c_q, bias=False)
        self.q_norm = RMSNorm(d_c_q)
        self.w_uq = nn.Linear(d_c_q, n_head * d_head, bias=False)
        self.w_qr = nn.Linear(d_c_q, n_head * d_rope, bias=False)
        self.w_dkv = nn.Linear(d_model, d_c, bias=False)
        self.kv_norm = RMSNorm(d_c)
        self.w_uk = nn.Linear(d_c, n_head * d_head, bias=False)
        self.w_uv = nn.Linear(d_c, n_head * d_head, bias=False)
        self.w_kr = nn.Linear(d_model, d_rope, bias=False)
        self.o = nn.Linear(n_head * d_head, d_model, bias=False)

    def rope(self, n, offset, like):
        """cos, sin for positions offset .. offset + n - 1, on like's device and dtype."""
        return rope_cos_sin(n, self.d_rope, self.rope_base, offset=offset, dtype=like.dtype, device=like.device)

    def queries(self, x, offset=0):
        """x (B, L, d_model) -> q^C (B, H, L, d_head), q^R (B, H, L, d_rope) at positions offset ..."""
        c_q = self.q_norm(self.w_dq(x))
        q_c = split_heads(self.w_uq(c_q), self.n_head)
        q_r = apply_rope(split_heads(self.w_qr(c_q), self.n_head), *self.rope(x.size(1), offset, x))
        return q_c, q_r

    def latents(self, x, offset=0):
        """x (B, L, d_model) -> what a cache keeps: c^KV (B, L, d_c) and k^R (B, L, d_rope), RoPE applied."""
        c_kv = self.kv_norm(self.w_dkv(x))
        k_r = apply_rope(self.w_kr(x), *self.rope(x.size(1), offset, x))
        return c_kv, k_r

    def attend_naive(self, q_c, q_r, c_kv, k_r, mask):
        """Decompress the latents into per-head keys and values, then ordinary attention."""
        H = self.n_head
        k_c = split_heads(self.w_uk(c_kv), H)                            # (B, H, S, d_head)
        v_c = split_heads(self.w_uv(c_kv), H)
        k_r = k_r[:, None].expand(-1, H, -1, -1)                         # the one rotary key, every head
        q, k = torch.cat([q_c, q_r], dim=-1), torch.cat([k_c, k_r], dim=-1)
        return attention(q, k, v_c, mask, scale=self.scale)              # (B, H, L, d_head), weights

    def attend_absorbed(self, q_c, q_r, c_kv, k_r, mask):
        """Attention from the latents alone: W^UK moves to the queries, W^UV after the weighted sum.

        The keys are [c^KV | k^R], one head of width d_c + d_rope shared by all query heads, the values
        c^KV: multi-query attention over the latent (the heads are folded into the query axis).
        """
        B, H, L, _ = q_c.shape
        S = c_kv.size(1)
        w_uk = self.w_uk.weight.view(H, self.d_head, self.d_c)          # k^C_h = W^UK_h c^KV
        w_uv = self.w_uv.weight.view(H, self.d_head, self.d_c)
        q_lat = torch.einsum("bhld,hdc->bhlc", q_c, w_uk)                # q^C_h W^UK_h: (B, H, L, d_c)
        q = torch.cat([q_lat, q_r], dim=-1).reshape(B, 1, H * L, -1)     # (B, 1, H L, d_c + d_rope)
        k = torch.cat([c_kv, k_r], dim=-1)[:, None]                      # (B, 1, S, d_c + d_rope)
        mask = mask.expand(B, H, L, S).reshape(B, 1, H * L, S)
        ctx, weights = attention(q, k, c_kv[:, None], mask, scale=self.scale)   # ctx (B, 1, H L, d_c)
        out = torch.einsum("bhlc,hdc->bhld", ctx.view(B, H, L, self.d_c), w_uv)  # W^UV_h after the sum
        return out, weights.view(B, H, L, S)

    def forward(self, x, attn_mask=None, absorbed=False):
        L = x.size(1)
        q_c, q_r = self.queries(x)
        c_kv, k_r = self.latents(x)
        mask = causal_mask(L, device=x.device)
        if attn_mask is not None:
            mask = mask & attn_mask
        attend = self.attend_absorbed if absorbed else self.attend_naive
        out, weights = attend(q_c, q_r, c_kv, k_r, mask)
        return self.o(merge_heads(out)), weights


def mla_cache_elements(d_c, d_rope):
    """Numbers cached per token and layer by MLA: the latent c^KV and the shared rotary key k^R."""
    return d_c + d_rope
