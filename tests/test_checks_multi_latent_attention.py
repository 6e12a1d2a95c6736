"""The multi-head latent attention exercise's checks: the reference agrees with the chapter's module, and
each check passes a right answer and fails a wrong one with its diagnosis."""

from __future__ import annotations

import math

import pytest
import torch

from handson.exercise_checks import multi_latent_attention as xchecks
from handson.nn import causal_mask
from handson.nn.multi_latent_attention import MultiHeadLatentAttention, mla_cache_elements
from handson.nn.positional_encoding import apply_rope, rope_cos_sin

F64 = torch.float64
DIMS = (16, 4, 6, 4, 8, 10)                 # d_model, n_head, d_head, d_rope, d_c, d_c_q


def _module(seed=0):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(*DIMS).double()


def _decode(mla, x, cache):
    """A right latent_decode built on the chapter's module."""
    start = len(cache)
    q_c, q_r = mla.queries(x, offset=start)
    c_kv, k_r = cache.update(*mla.latents(x, offset=start))
    out, w = mla.attend_absorbed(q_c, q_r, c_kv, k_r, causal_mask(x.size(1), c_kv.size(1), device=x.device))
    return mla.o(out.transpose(1, 2).flatten(2)), w


def _decode_no_offset(mla, x, cache):
    q_c, q_r = mla.queries(x)
    c_kv, k_r = cache.update(*mla.latents(x))
    out, w = mla.attend_absorbed(q_c, q_r, c_kv, k_r, causal_mask(x.size(1), c_kv.size(1), device=x.device))
    return mla.o(out.transpose(1, 2).flatten(2)), w


def test_rope_matches_the_library():
    t = torch.randn(2, 3, 5, 6, dtype=F64)
    cos, sin = rope_cos_sin(5, 6, 10000.0, offset=3, dtype=F64)
    assert torch.allclose(xchecks._rope(t, 3, 10000.0), apply_rope(t, cos, sin), atol=1e-13)


def test_reference_equals_the_chapter_module_in_both_forms():
    m = _module()
    x = torch.randn(2, 7, 16, dtype=F64)
    pad = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    pad[1, ..., :2] = False
    ref_out, ref_w = xchecks.reference(xchecks.params_of(m), x, xchecks.dims_of(m), pad)
    for absorbed in (False, True):
        out, w = m(x, pad, absorbed=absorbed)
        assert torch.allclose(out, ref_out, atol=1e-12) and torch.allclose(w, ref_w, atol=1e-12)


def test_check_forward_and_forms_agree_pass_the_chapter_module():
    m = _module(1)
    x = torch.randn(2, 5, 16, dtype=F64)
    xchecks.check_layers(m, *DIMS)
    for absorbed in (False, True):
        xchecks.check_forward(m, x, absorbed=absorbed)
    xchecks.check_forms_agree(m, x)


def test_check_forward_names_the_scale():
    m = _module(2)
    m.scale = 1 / math.sqrt(m.d_head)
    with pytest.raises(AssertionError, match=r"1/sqrt\(d_head\)"):
        xchecks.check_forward(m, torch.randn(2, 5, 16, dtype=F64))


def test_check_layers_names_a_per_head_rotary_key():
    m = _module()
    m.w_kr = torch.nn.Linear(16, 4 * 4, bias=False)
    with pytest.raises(AssertionError, match="ONE head"):
        xchecks.check_layers(m, *DIMS)


def test_check_latent_only_passes_absorbed_and_fails_naive():
    m = _module(3)
    x = torch.randn(2, 6, 16, dtype=F64)
    k, v = xchecks.context_heads(m, x)
    xchecks.check_latent_only(lambda: m(x, absorbed=True), keys=k, values=v)
    with pytest.raises(AssertionError, match="materialised per-head keys or values"):
        xchecks.check_latent_only(lambda: m(x), keys=k, values=v)


def test_check_kv_cache_elements():
    def right(kind, n_layers, n_head, d_head, *, n_groups=None, d_c=None, d_rope=None):
        if kind == "mha":
            return 2 * n_head * d_head * n_layers
        if kind == "gqa" and n_groups is not None:
            return 2 * n_groups * d_head * n_layers
        if kind == "mqa":
            return 2 * d_head * n_layers
        if kind == "mla" and d_c is not None and d_rope is not None:
            return mla_cache_elements(d_c, d_rope) * n_layers
        raise ValueError(kind)

    xchecks.check_kv_cache_elements(right)
    with pytest.raises(AssertionError, match="2 n_g d_h"):
        xchecks.check_kv_cache_elements(lambda kind, *a, n_groups=None, **k: right(
            kind, *a, n_groups=a[1] if kind == "gqa" else n_groups, **k))


def test_check_absorb():
    m = _module(4)
    xchecks.check_absorb(lambda mla: xchecks.merged_reference(mla), m)
    with pytest.raises(AssertionError, match="built from w_uk"):
        xchecks.check_absorb(lambda mla: (xchecks.merged_reference(mla)[0], torch.einsum(
            "hdc,mhd->hcm", mla.w_uk.weight.view(4, 6, 8), mla.o.weight.view(16, 4, 6))), m)


def test_check_decode_passes_right_and_names_the_offset():
    m = _module(5)
    x = torch.randn(2, 18, 16, dtype=F64)
    cache = xchecks.check_decode(_decode, m, x, chunks=[16, 1, 1])
    xchecks.check_cache_contents(cache.c_kv, cache.k_r, m, x)
    with pytest.raises(AssertionError, match="rotated from position 0"):
        xchecks.check_decode(_decode_no_offset, m, x[:, :6], chunks=[4, 2])


def test_reference_cache_refuses_decompressed_keys():
    cache = xchecks.ReferenceCache(2, 8, 4)
    with pytest.raises(AssertionError, match="nothing decompressed"):
        cache.update(torch.zeros(2, 1, 24), torch.zeros(2, 1, 4))


class _Cache:
    def __init__(self, batch_size, max_len, d_c, d_rope, *, dtype=None, device=None):
        self.max_len = max_len
        self.c = torch.zeros(batch_size, 0, d_c, dtype=dtype, device=device)
        self.k = torch.zeros(batch_size, 0, d_rope, dtype=dtype, device=device)
        self.empty = (self.c, self.k)

    def __len__(self):
        return self.c.size(1)

    def update(self, c_kv, k_r):
        if len(self) + c_kv.size(1) > self.max_len:
            raise ValueError("full")
        self.c, self.k = torch.cat([self.c, c_kv], 1), torch.cat([self.k, k_r], 1)
        return self.c, self.k

    def reset(self):
        self.c, self.k = self.empty


def test_check_cache_class():
    xchecks.check_cache_class(_Cache)

    class NoReset(_Cache):
        def reset(self):
            pass

    with pytest.raises(AssertionError, match=r"after reset\(\)"):
        xchecks.check_cache_class(NoReset)
