"""The book's library, chapter "The KV cache".

Generated from book/kv_cache.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['kv_cache_bytes', 'KVCache', 'generate_cached']


from handson.nn.decoder import sample_next


def kv_cache_bytes(n_layers, n_kv_head, head_dim, n_tokens=1, batch_size=1, dtype=torch.float16):
    """Bytes of a KV cache: 2 (keys and values) * layers * K/V heads * head_dim * tokens * batch * element size."""
    element = torch.empty(0, dtype=dtype).element_size()
    return 2 * n_layers * n_kv_head * head_dim * n_tokens * batch_size * element


class KVCache:
    """Keys and values of every layer, pre-allocated for max_len tokens.

    Buffers k and v, each (n_layers, batch_size, n_kv_head, max_len, head_dim), in dtype (None: the
    default dtype) on device. update(layer, k, v) writes the T new tokens (B, n_kv_head, T, head_dim)
    at positions len(self) .. len(self) + T - 1 of that layer and returns views of everything cached
    so far, (B, n_kv_head, len(self) + T, head_dim); advance(T), called once after every layer was
    updated, moves the position; reset() empties the cache. ValueError past max_len.
    """

    def __init__(self, n_layers, batch_size, n_kv_head, max_len, head_dim, *, dtype=None, device=None):
        dtype = torch.get_default_dtype() if dtype is None else dtype
        shape = (n_layers, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def _check_room(self, n):
        if self.pos + n > self.max_len:
            raise ValueError(f"the KV cache holds at most max_len={self.max_len} tokens: {self.pos} cached "
                             f"+ {n} new = {self.pos + n}")

    def update(self, layer, k, v):
        """Write k, v (B, n_kv_head, T, head_dim) at the current position -> all keys and values so far."""
        T = k.size(-2)
        self._check_room(T)
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n):
        """Move the position by n, once all layers were updated for n new tokens."""
        self._check_room(n)
        self.pos += n

    def __len__(self):
        return self.pos

    def reset(self):
        """Empty the cache (the buffers stay allocated)."""
        self.pos = 0

    @property
    def nbytes(self):
        """Bytes of the two buffers: kv_cache_bytes(n_layers, n_kv_head, head_dim, max_len, batch_size, dtype)."""
        return self.k.nbytes + self.v.nbytes


@torch.no_grad()
def generate_cached(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """Extend idx (B, L) by max_new_tokens tokens -> (B, L + max_new_tokens), with a KVCache.

    The prompt is prefilled in one call, then one token is fed per call. The tokens are those of
    handson.nn.decoder.generate for the same arguments and generator (sample_next, once per step).
    ValueError when L + max_new_tokens - 1 > model.max_len (the cache cannot crop the context).
    """
    if max_new_tokens <= 0:
        return idx
    attn = model.blocks[0].self_attn
    B, L = idx.shape
    cache = KVCache(len(model.blocks), B, attn.n_kv_head, min(L + max_new_tokens - 1, model.max_len),
                    attn.head_dim, dtype=model.tok_emb.weight.dtype, device=idx.device)
    logits = model(idx, cache)[:, -1, :]
    tokens = [idx]
    for step in range(max_new_tokens):
        tokens.append(sample_next(logits, temperature, top_k, generator))
        if step < max_new_tokens - 1:
            logits = model(tokens[-1], cache)[:, -1, :]
    return torch.cat(tokens, dim=1)
