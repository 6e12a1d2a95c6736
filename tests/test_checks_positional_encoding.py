"""handson.exercise_checks.positional_encoding: the references are right, and every check passes on
correct code and fails, with its diagnosis, on the usual mistakes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from handson.exercise_checks import positional_encoding as xc
from handson.nn import attention
from handson.nn import positional_encoding as pe

f64 = torch.float64


# ----------------------------------------------------------------------------- the references
def test_references_agree_with_the_library_and_the_papers():
    assert torch.allclose(xc.ref_sinusoidal(9, 6), pe.sinusoidal_encoding(9, 6, dtype=f64), atol=1e-12)
    assert torch.allclose(xc.ref_sinusoidal(4, 5, 100.0), pe.sinusoidal_encoding(4, 5, 100.0, dtype=f64), atol=1e-12)
    cos, sin = xc.ref_cos_sin(torch.arange(3, 8), 8)
    lc, ls = pe.rope_cos_sin(5, 8, offset=3, dtype=f64)
    assert torch.allclose(cos, lc, atol=1e-12) and torch.allclose(sin, ls, atol=1e-12)
    x = torch.randn(2, 5, 8, dtype=f64)
    assert torch.allclose(xc.ref_rotate(x, xc.ref_rope_angles(torch.arange(5), 8)), pe.apply_rope(x, *pe.rope_cos_sin(5, 8, dtype=f64)))
    # FACTS.md 7: 8 heads 2^-1..2^-8; 12 heads then 2^-0.5 .. 2^-3.5
    assert [round(math.log2(s), 9) for s in xc.ref_slopes(8)] == [-1, -2, -3, -4, -5, -6, -7, -8]
    assert [round(math.log2(s), 9) for s in xc.ref_slopes(12)][8:] == [-0.5, -1.5, -2.5, -3.5]
    assert torch.allclose(xc.ref_alibi_bias(12, 3, 7), pe.alibi_bias(12, 3, 7, dtype=f64))


def test_rotary_reference_properties():
    torch.manual_seed(0)
    m = nn.Module()
    for n in "qkvo":
        setattr(m, n, nn.Linear(8, 8).double())
    x = torch.randn(2, 5, 8, dtype=f64)
    a, (k, v) = xc.ref_rotary_attention(m, 2, x)
    b, _ = xc.ref_rotary_attention(m, 2, x, positions=torch.arange(9, 14))
    assert torch.allclose(a, b, atol=1e-10)                          # relative: a shift changes nothing
    c, _ = xc.ref_rotary_attention(m, 2, x, variant="rope_v", positions=torch.arange(9, 14))
    assert not torch.allclose(a, c, atol=1e-6)
    first, past = xc.ref_rotary_attention(m, 2, x[:, :3])
    last, _ = xc.ref_rotary_attention(m, 2, x[:, 3:], past_kv=past)
    assert torch.allclose(torch.cat([first, last], 1), a, atol=1e-10)   # decoding with the cache = full pass


# ----------------------------------------------------------------------------- parts 1-3
def test_contract_checks_pass_on_the_library():
    xc.check_sinusoidal(pe.sinusoidal_encoding, [(6, 8, 10000.0), (4, 7, 100.0)])
    xc.check_rope_cos_sin(pe.rope_cos_sin, [(5, 8, 10000.0, 0), (3, 6, 500.0, 7)])
    xc.check_apply_rope(pe.apply_rope, torch.randn(2, 5, 8, dtype=f64), torch.arange(5))
    xc.check_rope_relative(pe.apply_rope, pe.rope_cos_sin, 8, [(5, 2), (13, 10), (103, 100), (3, 0)])
    xc.check_alibi_slopes(pe.alibi_slopes, [1, 3, 8, 12, 24])
    xc.check_alibi_bias(pe.alibi_bias, [(4, 5, None), (12, 2, 6), (3, 5, 3)])
    xc.check_alibi_attention(pe.alibi_bias, attention, 12, 4, 7)
    xc.check_alibi_attention(pe.alibi_bias, attention, 3, 6, 4)       # more queries than keys: empty rows
    xc.check_rounded(pe.rope_cos_sin(4, 8, offset=4000, dtype=torch.float32)[0],
                     xc.ref_cos_sin(torch.arange(4000, 4004), 8)[0], torch.float32, "cos")


def _concat(n, d, base=10000.0, *, dtype=None, device=None):
    return xc.ref_sinusoidal(n, d, base, concatenated=True).to(dtype or torch.float32)


def _float32_sin(n, d, base=10000.0, *, dtype=None, device=None):
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    ang = pos / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    out = torch.stack([ang.sin(), ang.cos()], -1).flatten(-2)[:, :d]
    return out.to(dtype or torch.float32)


@pytest.mark.parametrize("fn, phrase", [
    (_concat, r"\[sin \| cos\]"),
    (lambda n, d, base=10000.0, **kw: xc.ref_sinusoidal(n, d, base, first=1), "counted from 1"),
    (lambda n, d, base=10000.0, **kw: xc.ref_sinusoidal(n, d, base, swap=True), "swapped"),
    (lambda n, d, base=10000.0, **kw: xc.ref_sinusoidal(n, d, base, freq_denominator=d), "2i/d_model"),
    (_float32_sin, "float32"),
])
def test_sinusoidal_mistakes_named(fn, phrase):
    with pytest.raises(AssertionError, match=phrase):
        xc.check_sinusoidal(fn, [(6, 8, 10000.0)])


def _rope_wrong(**variant):
    def fn(n, hd, base=10000.0, *, offset=0, dtype=None, device=None):
        pos = torch.arange(offset, offset + n) if not variant.get("no_offset") else torch.arange(n)
        c, s = xc.ref_cos_sin(pos, hd, base, layout=variant.get("layout", "half"))
        return (s, c) if variant.get("swap") else (c, s)
    return fn


@pytest.mark.parametrize("fn, phrase", [
    (_rope_wrong(no_offset=True), "offset is ignored"),
    (_rope_wrong(layout="interleaved"), "interleaved layout"),
    (_rope_wrong(swap=True), "swapped"),
])
def test_rope_cos_sin_mistakes_named(fn, phrase):
    with pytest.raises(AssertionError, match=phrase):
        xc.check_rope_cos_sin(fn, [(3, 6, 500.0, 7)])


@pytest.mark.parametrize("rot, phrase", [
    (lambda x: torch.cat([x[..., x.size(-1) // 2:], -x[..., : x.size(-1) // 2]], -1), "-m theta"),
    (lambda x: torch.cat([x[..., x.size(-1) // 2:], x[..., : x.size(-1) // 2]], -1), "without the minus"),
    (lambda x: torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2), "interleaved pairing"),
])
def test_apply_rope_mistakes_named(rot, phrase):
    with pytest.raises(AssertionError, match=phrase):
        xc.check_apply_rope(lambda x, c, s: x * c + rot(x) * s, torch.randn(2, 5, 8, dtype=f64), torch.arange(5))


@pytest.mark.parametrize("fn, phrase", [
    (lambda n, **kw: torch.tensor(xc.ref_slopes(n)[::-1], dtype=f64), "reverse head order"),
    (lambda n, **kw: torch.tensor([2.0 ** (-8 * k / n) for k in range(1, n + 1)], dtype=f64), "not a power of two"),
])
def test_alibi_slopes_mistakes_named(fn, phrase):
    with pytest.raises(AssertionError, match=phrase):
        xc.check_alibi_slopes(fn, [12])


@pytest.mark.parametrize("fn, phrase", [
    (lambda h, L, S=None, **kw: -xc.ref_alibi_bias(h, L, S), "sign is flipped"),
    (lambda h, L, S=None, **kw: -xc.ref_alibi_bias(h, L, S).abs(), "future"),
    (lambda h, L, S=None, **kw: xc.ref_alibi_bias(h, L, S).flip(0), "reverse order"),
    (lambda h, L, S=None, **kw: torch.tensor(xc.ref_slopes(h), dtype=f64)[:, None, None]
     * torch.arange(S or L, dtype=f64).expand(L, S or L), "Bloom"),
])
def test_alibi_bias_mistakes_named(fn, phrase):
    with pytest.raises(AssertionError, match=phrase):
        xc.check_alibi_bias(fn, [(4, 2, 5)])


# ----------------------------------------------------------------------------- parts 4-5
def _at(scale_mode="divide"):
    def fn(positions, hd, base=10000.0, *, scaling=1.0, dtype=None):
        m = positions.double() / scaling if scale_mode == "divide" else positions.double() * scaling
        return xc.ref_cos_sin(m, hd, base)
    return fn


def test_rope_cos_sin_at_checks():
    xc.check_rope_cos_sin_at(_at(), torch.tensor([[0, 3], [1, 9]]), 8, scaling=2.0)
    with pytest.raises(AssertionError, match="multiplied"):
        xc.check_rope_cos_sin_at(_at("multiply"), torch.arange(5), 8, scaling=4.0)


class _Rotary(nn.Module):
    """A correct rotary layer (the library's pieces); ``bug`` switches one known mistake on."""

    def __init__(self, d, h, bug=""):
        super().__init__()
        self.h, self.hd, self.bug = h, d // h, bug
        for n in "qkvo":
            setattr(self, n, nn.Linear(d, d))

    def forward(self, x, positions=None, attn_mask=None, past_kv=None):
        B, L, D = x.shape
        sp = lambda t: t.view(B, L, self.h, self.hd).transpose(1, 2)
        q, k, v = sp(self.q(x)), sp(self.k(x)), sp(self.v(x))
        s0 = 0 if past_kv is None or self.bug == "no_offset" else past_kv[0].size(-2)
        pos = torch.arange(s0, s0 + L) if positions is None else positions
        a = xc.ref_rope_angles(pos, self.hd).to(x.dtype)
        cos, sin = torch.cat([a, a], -1).cos(), torch.cat([a, a], -1).sin()
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        q, k = pe.apply_rope(q, cos, sin), pe.apply_rope(k, cos, sin)
        if self.bug == "rope_v":
            v = pe.apply_rope(v, cos, sin)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], -2), torch.cat([past_kv[1], v], -2)
        out, _ = attention(q, k, v, attn_mask, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(B, L, D)), (k, v)


def test_rotary_checks_pass_on_a_correct_layer():
    torch.manual_seed(1)
    m = _Rotary(16, 2).double()
    x = torch.randn(2, 5, 16, dtype=f64)
    xc.check_rotary_layers(m, 16)
    xc.check_rotary_reference(m, 2, x)
    xc.check_rotary_reference(m, 2, x[:, :2], past_kv=(torch.randn(2, 2, 3, 8, dtype=f64), torch.randn(2, 2, 3, 8, dtype=f64)))
    xc.check_rotary_reference(m, 2, x, positions=torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]),
                              attn_mask=torch.rand(2, 1, 5, 5) > 0.3)
    xc.check_rotary_translation(m, x, 11)
    xc.check_rotary_cache(m, x, [2, 1, 2])
    xc.check_rotary_left_padding(m, x, [5, 2])


@pytest.mark.parametrize("bug, check, phrase", [
    ("rope_v", "reference", "values are rotated"),
    ("rope_v", "translation", "changes the output"),
    ("no_offset", "cache", "offset"),
    ("no_offset", "reference_past", "position 0"),
])
def test_rotary_mistakes_named(bug, check, phrase):
    torch.manual_seed(2)
    m = _Rotary(16, 2, bug).double()
    x = torch.randn(2, 5, 16, dtype=f64)
    past = (torch.randn(2, 2, 3, 8, dtype=f64), torch.randn(2, 2, 3, 8, dtype=f64))
    run = {"reference": lambda: xc.check_rotary_reference(m, 2, x, positions=torch.arange(4, 9)),
           "translation": lambda: xc.check_rotary_translation(m, x, 7),
           "cache": lambda: xc.check_rotary_cache(m, x, [3, 1, 1]),
           "reference_past": lambda: xc.check_rotary_reference(m, 2, x, past_kv=past)}[check]
    with pytest.raises(AssertionError, match=phrase):
        run()


def test_tensor_on_and_rounded():
    xc.check_tensor_on(torch.zeros(2), "cpu", torch.float32, "t")
    with pytest.raises(AssertionError, match="device=device"):
        xc.check_tensor_on(torch.zeros(2), "meta", torch.float32, "t")
    with pytest.raises(AssertionError, match="cast to the"):
        xc.check_tensor_on(torch.zeros(2, dtype=f64), "cpu", torch.float32, "t")
    with pytest.raises(AssertionError, match="float32"):
        xc.check_rounded(_float32_sin(500, 4, dtype=torch.float32), xc.ref_sinusoidal(500, 4), torch.float32, "pe")
