"""The book's library (handson.nn): in sync with the chapters, self-contained, and exact.

The attention core is compared with PyTorch's own references in float64: outputs, weights and
gradients, boolean and float masks, grouped K/V heads, bottom-right causal masks, fully masked rows
under anomaly detection, the need_weights=False path, and the meta device.
"""

from __future__ import annotations

import builtins
import importlib
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from handson import nbtools
from handson.nn import MultiHeadAttention, attention, causal_mask, merge_heads, repeat_kv, split_heads

F64 = dict(dtype=torch.float64)
CHAPTER_MODULES = sorted(p.stem for p in nbtools.chapters() if nbtools.module_source(p))


def test_library_matches_the_chapters():
    stale = nbtools.library(check=True)
    assert not stale, f"run `make library` and commit: {stale} differ from the chapters' export cells"


def test_every_chapter_exports_something():
    assert set(CHAPTER_MODULES) >= {"self_attention", "multi_head_attention", "cross_attention",
                                    "causal_masking", "multi_query_attention", "tokenization",
                                    "positional_encoding", "normalization", "encoder", "decoder",
                                    "kv_cache", "multi_latent_attention", "acceleration"}


def test_the_package_exports_the_pieces_of_a_model():
    import handson.nn as lib
    for name in lib.__all__:
        assert getattr(lib, name).__module__.startswith("handson.nn."), name
    assert lib.GPT.__module__ == "handson.nn.decoder" and lib.LayerNorm.__module__ == "handson.nn.normalization"


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


@pytest.mark.parametrize("name", CHAPTER_MODULES)
def test_module_names_resolve(name):
    """Every global a function or class body uses exists in the module: no name left in a chapter."""
    mod = importlib.import_module(f"handson.nn.{name}")
    missing = set()
    for obj in vars(mod).values():
        fns = []
        if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__:
            fns = [obj]
        elif isinstance(obj, type) and obj.__module__ == mod.__name__:
            fns = [f for f in vars(obj).values() if isinstance(f, types.FunctionType)]
        for f in fns:
            for n in _global_names(f.__code__):
                if n not in vars(mod) and not hasattr(builtins, n):
                    # attribute names also appear in co_names; only flag names that look global
                    if not any(n in _attr_names(g.__code__) for g in fns):
                        missing.add(f"{f.__qualname__}: {n}")
    assert not missing, f"handson.nn.{name} uses names it does not define or import: {sorted(missing)}"


def _attr_names(code: types.CodeType) -> set[str]:
    """Names used as attributes (obj.name) in a code object, found through the bytecode."""
    import dis

    out = set()
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_ATTR", "STORE_ATTR", "LOAD_METHOD", "DELETE_ATTR"):
            out.add(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _attr_names(const)
    return out


def test_module_names_check_catches_a_missing_name(tmp_path):
    """The check above can fail: a function that calls an undefined global is reported."""
    mod = types.ModuleType("fake")
    exec("def f(x):\n    return undefined_helper(x)\n", mod.__dict__)
    used = _global_names(mod.f.__code__) - _attr_names(mod.f.__code__)
    assert "undefined_helper" in used and "undefined_helper" not in vars(mod)


def test_export_cells_that_run_code_are_refused(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("def f():\n    return 1\n\nprint(f())")
    cell.metadata["tags"] = ["export"]
    nb.cells = [nbformat.v4.new_markdown_cell("# T"), cell]
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(nbtools.ExportError, match="move the demonstration"):
        nbtools.module_source(path)
    cell.source = "%matplotlib inline\ndef f():\n    return 1"
    nbformat.write(nb, str(path))
    with pytest.raises(nbtools.ExportError, match="magic"):
        nbtools.module_source(path)
    cell.source = "import math\n\nCONST = 2\n\n\ndef f():\n    return CONST"
    nbformat.write(nb, str(path))
    src = nbtools.module_source(path)
    assert "__all__ = ['CONST', 'f']" in src and 'chapter "T"' in src


# ----------------------------------------------------------------------------- the attention core

def _qkv(B=2, H=4, H_kv=2, L=5, S=7, d=8, d_v=6, grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, d, generator=g, **F64)
    k = torch.randn(B, H_kv, S, d, generator=g, **F64)
    v = torch.randn(B, H_kv, S, d_v, generator=g, **F64)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _grads(fn, *ts):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    out = fn(*ts)
    (out * torch.linspace(-1, 1, out.numel(), **F64).view_as(out)).sum().backward()
    return out.detach(), [t.grad for t in ts]


MASKS = {
    "none": lambda: {},
    "bool": lambda: {"attn_mask": torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.3},
    "bool per head": lambda: {"attn_mask": torch.rand(2, 4, 5, 7, generator=torch.Generator().manual_seed(2)) > 0.3},
    "float": lambda: {"attn_mask": torch.randn(5, 7, generator=torch.Generator().manual_seed(3), **F64)},
    "scale": lambda: {"scale": 0.37},
}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("case", sorted(MASKS))
def test_attention_matches_sdpa_with_gradients(case, need_weights):
    kw = MASKS[case]()
    if "attn_mask" in kw and kw["attn_mask"].dtype == torch.bool:
        kw["attn_mask"][..., 0] = True  # keep a key per query: compare with SDPA on ordinary rows
    q, k, v = _qkv()
    ours, g_ours = _grads(lambda q, k, v: attention(q, k, v, enable_gqa=True, need_weights=need_weights,
                                                    **kw)[0], q, k, v)
    ref, g_ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw),
                        q, k, v)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_weights_are_returned_only_when_asked():
    q, k, v = _qkv(H_kv=4)
    out, w = attention(q, k, v)
    assert w.shape == (2, 4, 5, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5, **F64))
    torch.testing.assert_close(out, w @ v)
    assert attention(q, k, v, need_weights=False)[1] is None


@pytest.mark.parametrize("L,S", [(5, 5), (3, 7), (1, 7), (7, 3)])
def test_causal_is_bottom_right(L, S):
    q, k, v = _qkv(H_kv=4, L=L, S=S)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    assert torch.equal(causal_mask(L, S), j <= i + (S - L)), "query i is position i + S - L"
    ours, w = attention(q, k, v, is_causal=True)
    ref, _ = attention(q, k, v, causal_mask(L, S))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert bool((w.masked_select(~causal_mask(L, S)) == 0).all())
    if L <= S:
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S)),
                                   rtol=1e-12, atol=1e-12)
    else:  # the first L - S queries see no key: zero rows
        assert bool((ours[..., : L - S, :] == 0).all())


def test_causal_and_mask_combine():
    q, k, v = _qkv(H_kv=4, L=4, S=6)
    pad = torch.tensor([True, True, True, True, True, False])
    ours, w = attention(q, k, v, pad, is_causal=True)
    ref, _ = attention(q, k, v, pad & causal_mask(4, 6))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    additive = torch.zeros(4, 6, **F64).masked_fill(~pad, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, additive, is_causal=True)[0], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_are_zero_with_finite_gradients_under_anomaly_mode(kind, need_weights):
    q, k, v = _qkv()
    allowed = torch.ones(5, 7, dtype=torch.bool)
    allowed[1] = False
    allowed[3, 2:] = False
    mask = allowed if kind == "bool" else torch.zeros(5, 7, **F64).masked_fill(~allowed, float("-inf"))
    with torch.autograd.set_detect_anomaly(True):
        out, grads = _grads(lambda q, k, v: attention(q, k, v, mask, enable_gqa=True,
                                                      need_weights=need_weights)[0], q, k, v)
    assert bool((out[:, :, 1] == 0).all()), "a query with no key must give a zero result"
    assert all(bool(g.isfinite().all()) for g in grads)
    assert bool((grads[0][:, :, 1] == 0).all()), "a query with no key gets no gradient"
    if need_weights:
        _, w = attention(q, k, v, mask, enable_gqa=True)
        assert bool((w[:, :, 1] == 0).all()) and bool((w.masked_select(~allowed) == 0).all())


def test_attention_keeps_dtype_and_device_and_rejects_integer_masks():
    q, k, v = (t.float() for t in _qkv(H_kv=4))
    assert attention(q, k, v, torch.zeros(5, 7, **F64))[0].dtype == torch.float32
    m = [torch.empty(2, 4, 5, 8, device="meta"), torch.empty(2, 2, 7, 8, device="meta")]
    for need_weights in (True, False):
        out, _ = attention(m[0], m[1], m[1], torch.ones(5, 7, dtype=torch.bool, device="meta"),
                           is_causal=True, enable_gqa=True, need_weights=need_weights)
        assert out.device.type == "meta" and out.shape == (2, 4, 5, 8)
    with pytest.raises(TypeError, match="bool .* or float"):
        attention(q, k, v, torch.ones(5, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="cannot share"):
        attention(q, k[:, :3], v[:, :3], enable_gqa=True)


def test_heads_helpers():
    t = torch.randn(2, 3, 5, 12)
    assert split_heads(t, 4).shape == (2, 3, 4, 5, 3)
    assert torch.equal(merge_heads(split_heads(t, 4)), t)
    assert torch.equal(split_heads(t, 4)[:, :, 1], t[..., 3:6])
    kv = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(kv, 2), kv.repeat_interleave(2, dim=1))


# ----------------------------------------------------------------------------- the module

def _torch_mha(m, kdim=None):
    d = m.q.in_features
    ref = nn.MultiheadAttention(d, m.n_head, batch_first=True, kdim=kdim, vdim=kdim, **F64)
    with torch.no_grad():
        if kdim is None:
            ref.in_proj_weight.copy_(torch.cat([m.q.weight, m.k.weight, m.v.weight]))
        else:
            ref.q_proj_weight.copy_(m.q.weight)
            ref.k_proj_weight.copy_(m.k.weight)
            ref.v_proj_weight.copy_(m.v.weight)
        ref.in_proj_bias.copy_(torch.cat([m.q.bias, m.k.bias, m.v.bias]))
        ref.out_proj.weight.copy_(m.o.weight)
        ref.out_proj.bias.copy_(m.o.bias)
    return ref


@pytest.mark.parametrize("need_weights", [True, False])
def test_module_equals_torch_multihead_attention(need_weights):
    torch.manual_seed(0)
    m = MultiHeadAttention(24, 4).double()
    ref = _torch_mha(m)
    x = torch.randn(3, 6, 24, **F64, requires_grad=True)
    ours, w = m(x, is_causal=True, need_weights=need_weights)
    theirs, w_ref = ref(x, x, x, attn_mask=~causal_mask(6), average_attn_weights=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    else:
        assert w is None
    g_ours = torch.autograd.grad(ours.sum(), [x, m.q.weight, m.k.bias, m.o.weight])
    g_ref = torch.autograd.grad(theirs.sum(), [x, ref.in_proj_weight, ref.in_proj_bias, ref.out_proj.weight])
    torch.testing.assert_close(g_ours[0], g_ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours[1], g_ref[1][:24], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours[2], g_ref[2][24:48], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours[3], g_ref[3], rtol=1e-10, atol=1e-12)


def test_module_cross_attention_with_kdim_and_padding():
    torch.manual_seed(1)
    m = MultiHeadAttention(16, 2, kdim=10).double()
    x, ctx = torch.randn(2, 4, 16, **F64), torch.randn(2, 9, 10, **F64)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, 5:] = False
    ours, w = m(x, pad[:, None, None, :], context=ctx)
    theirs, _ = _torch_mha(m, kdim=10)(x, ctx, ctx, key_padding_mask=~pad)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert w.shape == (2, 2, 4, 9) and bool((w[0, ..., 5:] == 0).all())


def test_module_grouped_heads_head_dim_and_no_bias():
    torch.manual_seed(2)
    m = MultiHeadAttention(20, n_head=6, n_kv_head=2, head_dim=7, bias=False).double()
    assert [tuple(getattr(m, n).weight.shape) for n in "qkvo"] == [(42, 20), (14, 20), (14, 20), (20, 42)]
    assert all(getattr(m, n).bias is None for n in "qkvo")
    x = torch.randn(2, 5, 20, **F64)
    q, k, v = m.project(x)
    assert q.shape == (2, 6, 5, 7) and k.shape == v.shape == (2, 2, 5, 7)
    ref = m.o(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)))
    for need_weights in (True, False):
        torch.testing.assert_close(m(x, is_causal=True, need_weights=need_weights)[0], ref,
                                   rtol=1e-12, atol=1e-12)
    # the same instance at other lengths and batch sizes: no state kept across calls
    for B, L in [(1, 1), (3, 9)]:
        assert m(torch.randn(B, L, 20, **F64))[0].shape == (B, L, 20)


def test_module_project_attend_split_serves_a_cache():
    torch.manual_seed(3)
    m = MultiHeadAttention(12, 4, n_kv_head=2).double()
    x = torch.randn(1, 6, 12, **F64)
    full, _ = m(x, is_causal=True)
    _, k0, v0 = m.project(x[:, :4])
    q1, k1, v1 = m.project(x[:, 4:])
    step, _ = m.attend(q1, torch.cat([k0, k1], 2), torch.cat([v0, v1], 2), is_causal=True)
    torch.testing.assert_close(step, full[:, 4:], rtol=1e-12, atol=1e-12)


def test_module_dropout_only_in_training_and_argument_errors():
    m = MultiHeadAttention(8, 2, dropout=0.5)
    x = torch.randn(2, 5, 8)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x)[0]), "dropout must act in training mode"
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="multiple"):
        MultiHeadAttention(12, 4, n_kv_head=3)
    meta = MultiHeadAttention(16, 4, n_kv_head=1).to("meta")
    out, w = meta(torch.empty(2, 3, 16, device="meta"), is_causal=True)
    assert out.device.type == "meta" and w.shape == (2, 4, 3, 3)
