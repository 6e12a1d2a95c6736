"""The book's library: the building blocks that the chapters build, for the chapters after them.

Each module ``handson.nn.<chapter>`` is generated from the cells of ``book/<chapter>.ipynb`` tagged
``export`` (``make library``; ``make test`` checks that they agree). This package namespace holds the
attention core that Part I assembles in its closing section and that Parts II and III use:

- ``attention(q, k, v, attn_mask=None, *, scale=None, is_causal=False, need_weights=True,
  dropout_p=0.0, enable_gqa=False) -> (out, weights or None)``
- ``MultiHeadAttention(d_model, n_head, n_kv_head=None, head_dim=None, *, kdim=None, bias=True,
  dropout=0.0)`` with ``project(x, context=None) -> (q, k, v)``, ``attend(q, k, v, attn_mask=None,
  *, is_causal=False, need_weights=True)`` and ``forward(x, attn_mask=None, *, context=None,
  is_causal=False, need_weights=True)``
- ``causal_mask(L, S=None, *, device=None)``, bottom-right aligned, True = may attend
- ``split_heads(t, n_head)``, ``merge_heads(t)``, ``repeat_kv(x, n_rep)``

Masks follow the book's convention: boolean True = may attend, or float added to the scores.
"""

from handson.nn.causal_masking import causal_mask
from handson.nn.multi_head_attention import merge_heads, split_heads
from handson.nn.multi_query_attention import MultiHeadAttention, attention, repeat_kv

__all__ = ["attention", "MultiHeadAttention", "causal_mask", "split_heads", "merge_heads", "repeat_kv"]
