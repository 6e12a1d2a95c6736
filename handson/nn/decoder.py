"""The book's library, chapter "The decoder".

Generated from book/decoder.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DecoderLayer', 'GPT', 'sample_next', 'generate']


from handson.nn import MultiHeadAttention
from handson.nn.encoder import FeedForward
from handson.nn.normalization import LayerNorm, residual
from handson.nn.positional_encoding import apply_rope, rope_cos_sin


class DecoderLayer(nn.Module):
    """One decoder layer: causal self-attention, optional cross-attention, feed-forward.

    DecoderLayer(d_model, n_head, d_ff, dropout=0.0, norm_first=True, cross_attention=False,
                 activation="gelu", *, n_kv_head=None)
    Submodules: self_attn and cross_attn (the library's MultiHeadAttention; cross_attn None unless
    cross_attention), ff (FeedForward), norm1 (before/after self-attention), norm2 (cross-attention,
    or the feed-forward when there is none), norm3 (the feed-forward after a cross-attention, else
    None). norm_first=True is pre-LN (GPT-2), False post-LN (Vaswani et al.). n_kv_head < n_head
    gives grouped-query attention.

    forward(x, memory=None, attn_mask=None, memory_mask=None, *, cache=None, layer=0, rope=None)
    x (B, L, d_model); memory (B, S, d_model), required iff cross_attention. The self-attention is
    always causal, aligned at the bottom right (L new queries over S >= L keys); attn_mask and
    memory_mask are bool, True = may attend, broadcastable to (B, n_head, L, S). rope = (cos, sin)
    of the L new positions rotates q and k after the projection; a cache object's
    update(layer, k, v) -> (k_all, v_all) receives the new keys and values (after RoPE) and returns
    all of them. Returns (B, L, d_model).
    """

    def __init__(self, d_model, n_head, d_ff, dropout=0.0, norm_first=True, cross_attention=False,
                 activation="gelu", *, n_kv_head=None):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_head, n_kv_head, dropout=dropout)
        self.cross_attn = (MultiHeadAttention(d_model, n_head, n_kv_head, dropout=dropout)
                           if cross_attention else None)
        self.ff = FeedForward(d_model, d_ff, activation, dropout)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)
        self.norm3 = LayerNorm(d_model) if cross_attention else None
        self.dropout = nn.Dropout(dropout)          # on each sublayer's output, before the residual sum

    def _self_attention(self, h, attn_mask, cache, layer, rope):
        q, k, v = self.self_attn.project(h)         # (B, H, L, d), (B, H_kv, L, d)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)        # all keys and values so far: (B, H_kv, S, d)
        out, _ = self.self_attn.attend(q, k, v, attn_mask, is_causal=True, need_weights=False)
        return self.dropout(out)

    def _cross_attention(self, h, memory, memory_mask):
        out, _ = self.cross_attn(h, memory_mask, context=memory, need_weights=False)
        return self.dropout(out)

    def forward(self, x, memory=None, attn_mask=None, memory_mask=None, *, cache=None, layer=0,
                rope=None):
        if (memory is None) != (self.cross_attn is None):
            raise ValueError("memory is required by a layer with cross-attention and only by one: "
                             f"cross_attention={self.cross_attn is not None}, memory given={memory is not None}")
        x = residual(x, lambda h: self._self_attention(h, attn_mask, cache, layer, rope),
                     self.norm1, self.norm_first)
        if self.cross_attn is None:
            return residual(x, lambda h: self.dropout(self.ff(h)), self.norm2, self.norm_first)
        x = residual(x, lambda h: self._cross_attention(h, memory, memory_mask), self.norm2,
                     self.norm_first)
        return residual(x, lambda h: self.dropout(self.ff(h)), self.norm3, self.norm_first)


class GPT(nn.Module):
    """A decoder-only language model in the GPT-2 layout (pre-LN blocks, final norm, tied head).

    GPT(vocab_size, max_len, d_model, n_head, n_layers, d_ff, dropout=0.0, tie_weights=True, *,
        n_kv_head=None, positions="learned", rope_base=10000.0)
    tok_emb (vocab_size, d_model); pos_emb nn.Embedding(max_len, d_model) for learned positions,
    None for positions="rope" (rotary positions applied to q and k in every block); blocks
    (ModuleList of pre-LN DecoderLayer); norm (final LayerNorm); lm_head Linear(d_model,
    vocab_size, bias=False) whose weight IS tok_emb.weight when tie_weights. Weights are
    initialised as GPT-2's: normal(0, 0.02), biases zero.

    forward(idx, cache=None, *, attn_mask=None, positions=None): idx (B, L) int64 -> logits
    (B, L, vocab_size). With a cache (update(layer, k, v), advance(n), len()), idx holds only the
    new tokens and their positions start at len(cache); positions ((L,) or (B, L) int64) overrides
    them. attn_mask (bool, True = may attend, broadcastable to (B, 1, L, len(cache) + L)) is
    combined with the causal mask. ValueError when len(cache) + L > max_len.
    """

    def __init__(self, vocab_size, max_len, d_model, n_head, n_layers, d_ff, dropout=0.0,
                 tie_weights=True, *, n_kv_head=None, positions="learned", rope_base=10000.0):
        super().__init__()
        if positions not in ("learned", "rope"):
            raise ValueError(f"positions must be 'learned' or 'rope', not {positions!r}")
        self.vocab_size, self.max_len, self.rope_base = vocab_size, max_len, rope_base
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            DecoderLayer(d_model, n_head, d_ff, dropout, norm_first=True, n_kv_head=n_kv_head)
            for _ in range(n_layers))
        self.norm = LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight       # one Parameter, two uses

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _rope(self, start, L, positions, dtype, device):
        head_dim = self.blocks[0].self_attn.head_dim
        if positions is None:
            return rope_cos_sin(L, head_dim, self.rope_base, offset=start, dtype=dtype, device=device)
        cos, sin = rope_cos_sin(self.max_len, head_dim, self.rope_base, dtype=dtype, device=device)
        cos, sin = cos[positions], sin[positions]           # (L, d) or (B, L, d)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]           # (B, 1, L, d): broadcast over heads
        return cos, sin

    def forward(self, idx, cache=None, *, attn_mask=None, positions=None):
        B, L = idx.shape
        start = len(cache) if cache is not None else 0
        if start + L > self.max_len:
            raise ValueError(f"{start + L} positions ({start} cached + {L} new) exceed "
                             f"max_len={self.max_len}: crop the context")
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            if positions is None:
                positions = torch.arange(start, start + L, device=idx.device)
            x = x + self.pos_emb(positions)
        else:
            rope = self._rope(start, L, positions, x.dtype, x.device)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask=attn_mask, cache=cache, layer=i, rope=rope)
        if cache is not None:
            cache.advance(L)
        return self.lm_head(self.norm(x))


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """The next token of each row from logits (B, vocab) -> (B, 1) int64.

    temperature 0 takes the argmax (greedy); otherwise the logits are divided by the temperature,
    all but the top_k largest are set to -inf (top_k None keeps all), and one token is drawn with
    torch.multinomial(softmax, 1, generator=generator).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """Extend idx (B, L) by max_new_tokens tokens -> (B, L + max_new_tokens).

    Each step runs the model on the last model.max_len tokens (the context is cropped) and picks
    the next token with sample_next(logits of the last position, temperature, top_k, generator).
    Call model.eval() first: dropout stays as the model's mode says.
    """
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.max_len:])[:, -1, :]
        idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
    return idx
