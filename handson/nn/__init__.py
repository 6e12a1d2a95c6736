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

Parts II and III add, each in the module of its chapter (the pieces of a model are also importable
from here):

- ``handson.nn.tokenization``: ``GPT2_SPLIT_PATTERN``, ``get_pair_counts``, ``merge``, ``BPETokenizer``
- ``handson.nn.positional_encoding``: ``sinusoidal_encoding``, ``rope_cos_sin``, ``rotate_half``,
  ``apply_rope``, ``alibi_slopes``, ``alibi_bias``
- ``handson.nn.normalization``: ``LayerNorm``, ``RMSNorm``, ``residual``
- ``handson.nn.encoder``: ``FeedForward``, ``EncoderLayer``, ``Encoder``
- ``handson.nn.decoder``: ``DecoderLayer``, ``GPT`` (with the KV-cache hook ``forward(idx, cache=None)``),
  ``sample_next``, ``generate``
- ``handson.nn.kv_cache``: ``KVCache``, ``generate_cached``, ``kv_cache_bytes``
- ``handson.nn.multi_latent_attention``: ``MultiHeadLatentAttention``, ``mla_cache_elements``
- ``handson.nn.acceleration``: ``online_softmax``, ``tiled_attention``, ``naive_attention``

Masks follow the book's convention: boolean True = may attend, or float added to the scores.
"""

from handson.nn.causal_masking import causal_mask
from handson.nn.multi_head_attention import merge_heads, split_heads
from handson.nn.multi_query_attention import MultiHeadAttention, attention, repeat_kv

# Part II's pieces. They import the attention core above from this package, so they come after it.
from handson.nn.positional_encoding import (alibi_bias, alibi_slopes, apply_rope, rope_cos_sin,  # noqa: E402
                                            sinusoidal_encoding)
from handson.nn.normalization import LayerNorm, RMSNorm, residual  # noqa: E402
from handson.nn.encoder import Encoder, EncoderLayer, FeedForward  # noqa: E402
from handson.nn.decoder import GPT, DecoderLayer, generate  # noqa: E402

__all__ = ["attention", "MultiHeadAttention", "causal_mask", "split_heads", "merge_heads", "repeat_kv",
           "sinusoidal_encoding", "rope_cos_sin", "apply_rope", "alibi_slopes", "alibi_bias",
           "LayerNorm", "RMSNorm", "residual", "FeedForward", "EncoderLayer", "Encoder",
           "DecoderLayer", "GPT", "generate"]
