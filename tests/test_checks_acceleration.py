"""handson.exercise_checks.acceleration: references agree with PyTorch, and each check passes on
correct code and fails, with its diagnosis, on a typical mistake."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from handson.exercise_checks import acceleration as xchecks

f64 = dict(dtype=torch.float64)
NEG = float("-inf")


def qkv(L, S, d=4, dv=3, seed=0, shape=(2,)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, L, d, generator=g, **f64), torch.randn(*shape, S, d, generator=g, **f64),
            torch.randn(*shape, S, dv, generator=g, **f64))


def softmax_online(x, block_size):
    m = torch.full(x.shape[:-1], NEG, **f64)
    l = torch.zeros(x.shape[:-1], **f64)
    for j in range(0, x.size(-1), block_size):
        b = x[..., j:j + block_size]
        m_new = torch.maximum(m, b.amax(-1))
        ms = torch.where(m_new == NEG, 0.0, m_new)
        l = l * torch.exp(m - ms) + torch.exp(b - ms[..., None]).sum(-1)
        m = m_new
    return torch.exp(x - m[..., None]) / l[..., None]


def tiled(q, k, v, block_q=64, block_k=64, causal=False, scale=None, window=None, skip=True):
    L, S = q.size(-2), k.size(-2)
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    off = S - L
    outs, lses = [], []
    for i0 in range(0, L, block_q):
        i1 = min(i0 + block_q, L)
        qt = q[..., i0:i1, :] * scale
        m = torch.full(qt.shape[:-1], NEG, **f64)
        l = torch.zeros(qt.shape[:-1], **f64)
        o = torch.zeros(qt.shape[:-1] + (v.size(-1),), **f64)
        for j0 in range(0, S, block_k):
            j1 = min(j0 + block_k, S)
            rows, cols = torch.arange(i0, i1)[:, None] + off, torch.arange(j0, j1)[None, :]
            ok = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool)
            if causal or window is not None:
                ok = cols <= rows
            if window is not None:
                ok = ok & (cols > rows - window)
            if skip and (causal or window is not None) and not ok.any():
                continue
            s = (qt @ k[..., j0:j1, :].transpose(-2, -1)).masked_fill(~ok, NEG)
            m_new = torch.maximum(m, s.amax(-1))
            ms = torch.where(m_new == NEG, 0.0, m_new)
            a = torch.exp(m - ms)
            p = torch.exp(s - ms[..., None])
            l = a * l + p.sum(-1)
            o = a[..., None] * o + p @ v[..., j0:j1, :]
            m = m_new
        has = l > 0
        ls = torch.where(has, l, 1.0)
        outs.append(o / ls[..., None])
        lses.append(torch.where(has, m + torch.log(ls), NEG))
    return torch.cat(outs, -2), torch.cat(lses, -1)


def window_attn(q, k, v, window, block_q=64, block_k=64, scale=None):
    return tiled(q, k, v, block_q, block_k, True, scale, window)


def test_reference_matches_sdpa_and_logsumexp():
    q, k, v = qkv(5, 9)
    allowed = xchecks.allowed_mask(5, 9, causal=True)
    out, lse = xchecks.reference_attention(q, k, v, allowed)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), atol=1e-12)
    s = (q @ k.transpose(-2, -1) / 2).masked_fill(~allowed, NEG)
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-12)
    out, lse = xchecks.reference_attention(*qkv(6, 3), xchecks.allowed_mask(6, 3, causal=True))
    assert bool((out[:, :3] == 0).all()) and bool((lse[:, :3] == NEG).all())


def test_reference_merge_and_schedule():
    q, k, v = qkv(4, 10)
    p1 = xchecks.reference_attention(q, k[:, :3], v[:, :3])
    p2 = xchecks.reference_attention(q, k[:, 3:], v[:, 3:])
    out, lse = xchecks.reference_merge(*p1, *p2)
    ref = xchecks.reference_attention(q, k, v)
    assert torch.allclose(out, ref[0], atol=1e-12) and torch.allclose(lse, ref[1], atol=1e-12)
    sched = xchecks.reference_schedule(8, 8, 2, 2, 3)
    assert sched.tolist() == [[True, False, False, False], [True, True, False, False],
                              [False, True, True, False], [False, False, True, True]]


def test_online_softmax_check():
    x = torch.randn(3, 11, **f64)
    x[0, :5] = NEG
    xchecks.check_online_softmax(softmax_online, x, 4)
    with pytest.raises(AssertionError, match="asks you to write yourself"):
        xchecks.check_online_softmax(lambda x, b: torch.softmax(x, -1), x, 4)
    with pytest.raises(AssertionError, match="aten._softmax"):
        xchecks.check_online_softmax(lambda x, b: getattr(x, "soft" + "max")(-1), x, 4)
    with pytest.raises(AssertionError, match="reduced a whole row"):
        xchecks.check_online_softmax(lambda x, b: torch.exp(x - x.amax(-1, keepdim=True))
                                     / torch.exp(x - x.amax(-1, keepdim=True)).sum(-1, keepdim=True), x, 4)


def test_attention_checks_pass_and_diagnose():
    q, k, v = qkv(7, 10)
    xchecks.check_attention(tiled, q, k, v, 3, 4, True, block_q=3, block_k=4, causal=True)
    xchecks.check_attention_grads(tiled, q, k, v, 3, 4, True, causal=True)
    with pytest.raises(AssertionError, match="top-left"):
        xchecks.check_attention(lambda q, k, v, bq, bk, c: tiled(q, k[:, :7], v[:, :7], bq, bk, c)
                                if False else xchecks.reference_attention(q, k, v, torch.ones(7, 10, dtype=torch.bool).tril()),
                                q, k, v, 3, 4, True, block_q=3, block_k=4, causal=True)
    with pytest.raises(AssertionError, match="applied twice"):
        xchecks.check_attention(lambda *a: tiled(*a, scale=0.25), q, k, v, 3, 4, block_q=3, block_k=4)
    with pytest.raises(AssertionError, match="asks you to write yourself"):
        xchecks.check_attention(lambda q, k, v: (F.scaled_dot_product_attention(q, k, v), q[..., 0]), q, k, v,
                                block_q=64, block_k=64)


def test_memory_empty_rows_and_tiles():
    q, k, v = qkv(24, 24, d=2, dv=2, shape=(1, 2))
    xchecks.check_memory(tiled, q, k, v, 6, 6, True, block_q=6, block_k=6)
    with pytest.raises(AssertionError, match=r"whole \(L, S\)"):
        xchecks.check_memory(lambda *a: xchecks.reference_attention(a[0], a[1], a[2]), q, k, v, 6, 6, True,
                             block_q=6, block_k=6)
    q, k, v = qkv(9, 4)
    xchecks.check_empty_rows(tiled, q, k, v, 4, 2, True, block_q=4, block_k=2)
    q, k, v = qkv(16, 16, dv=5, shape=(1,))
    xchecks.check_window_tiles(window_attn, q, k, v, 3, 2, 2)
    with pytest.raises(AssertionError, match="computes every tile"):
        xchecks.check_window_tiles(lambda q, k, v, w, bq, bk: tiled(q, k, v, bq, bk, True, None, w, skip=False),
                                   q, k, v, 3, 2, 2)


def test_merge_and_schedule_checks():
    g = torch.Generator().manual_seed(3)
    o1, o2 = torch.randn(4, 3, generator=g, **f64), torch.randn(4, 3, generator=g, **f64)
    l1 = torch.tensor([0.5, NEG, 2.0, NEG], **f64)
    l2 = torch.tensor([NEG, 1.0, -1.0, NEG], **f64)
    xchecks.check_merge(xchecks.reference_merge, o1, l1, o2 * torch.tensor([1, 1, 1, 0.0], **f64)[:, None], l2)
    with pytest.raises(AssertionError, match="averages"):
        xchecks.check_merge(lambda a, b, c, d: ((a + c) / 2, torch.logaddexp(b, d)), o1, torch.zeros(4, **f64), o2,
                            torch.ones(4, **f64))
    xchecks.check_merge_grads(xchecks.reference_merge, o1, torch.ones(4, **f64), o2, torch.zeros(4, **f64))
    xchecks.check_schedule(lambda L, S, bq, bk, w: xchecks.reference_schedule(L, S, bq, bk, w), 7, 12, 2, 3, 4)
    with pytest.raises(AssertionError, match="window is ignored"):
        xchecks.check_schedule(lambda L, S, bq, bk, w: xchecks.reference_schedule(L, S, bq, bk, None), 8, 8, 2, 2, 3)
