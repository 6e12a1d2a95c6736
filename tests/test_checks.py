"""handson.checks: each check passes on correct code and fails, with its diagnosis, on a bug."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from handson import checks

f64 = dict(dtype=torch.float64)


def good_attention(q, k, v, attn_mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    w = torch.softmax(s, -1)
    if attn_mask is not None:
        w = w.masked_fill(~attn_mask.any(-1, keepdim=True), 0.0)
    return w @ v, w


def qkv(*shape):
    torch.manual_seed(0)
    return {n: torch.randn(*shape, **f64) for n in "qkv"}


def test_shape_and_dtype():
    checks.check_shape(torch.zeros(2, 3), (2, 3))
    with pytest.raises(AssertionError, match=r"has shape \(2, 3\) but should have shape \(3, 2\)"):
        checks.check_shape(torch.zeros(2, 3), (3, 2))
    with pytest.raises(AssertionError, match="should be a torch.Tensor"):
        checks.check_shape([1, 2], (2,))
    with pytest.raises(AssertionError, match="float64"):
        checks.check_dtype(torch.zeros(2), torch.float64)


def test_tensor_subclasses_are_refused():
    class Liar(torch.Tensor):
        pass

    with pytest.raises(AssertionError, match="subclass"):
        checks.check_shape(torch.zeros(2).as_subclass(Liar), (2,))


def test_rows_sum_to_one():
    w = torch.softmax(torch.randn(3, 4), -1)
    checks.check_rows_sum_to_one(w)
    with pytest.raises(AssertionError, match="dim=-1"):
        checks.check_rows_sum_to_one(torch.softmax(torch.randn(3, 4), 0))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    w = w.clone()
    w[1] = 0
    checks.check_rows_sum_to_one(w, mask)
    with pytest.raises(AssertionError, match="NaN"):
        checks.check_rows_sum_to_one(torch.full((2, 2), float("nan")))


def test_masked_weights_zero():
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    _, w = good_attention(*qkv(3, 4).values(), mask)
    checks.check_masked_weights_zero(w, mask)
    with pytest.raises(AssertionError, match="inverted"):
        checks.check_masked_weights_zero(torch.softmax(torch.randn(3, 3), -1), mask)


def test_matches_reference_accepts_correct_code():
    mask = torch.rand(2, 4, 5) > 0.3
    mask[0, 1] = False
    checks.check_matches_reference(good_attention, checks.sdpa_reference,
                                   {"q": torch.randn(2, 4, 3, **f64), "k": torch.randn(2, 5, 3, **f64),
                                    "v": torch.randn(2, 5, 2, **f64)}, extra={"attn_mask": mask})


def _unscaled(q, k, v, attn_mask=None):
    w = torch.softmax(q @ k.transpose(-2, -1), -1)
    return w @ v, w


def _inplace_softmax(q, k, v, attn_mask=None):
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).masked_fill(~attn_mask, float("-inf"))
    w = torch.softmax(s, -1)
    w.masked_fill_(~attn_mask, 0.0)  # already zero there: the forward is right, backward raises
    return w @ v, w


def _detached(q, k, v, attn_mask=None):
    s = (q @ k.transpose(-2, -1)).detach() / math.sqrt(q.size(-1))
    w = torch.softmax(s.masked_fill(~attn_mask, float("-inf")), -1)
    return w @ v, w


def _data_renorm(q, k, v, attn_mask=None):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), -1).masked_fill(~attn_mask, 0)
    w.data = w.data / w.data.sum(-1, keepdim=True)
    return w @ v, w


def _mutating(q, k, v, attn_mask=None):
    q.data.mul_(2)
    return good_attention(q, k, v, attn_mask)


@pytest.mark.parametrize("fn, message", [
    (_unscaled, "scale"),
    (_inplace_softmax, "modified in place"),
    (_detached, "cut out of the graph"),
    (_data_renorm, "autograd does not see"),
    (_mutating, "modified in place by the call"),
])
def test_matches_reference_diagnoses_bugs(fn, message):
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    with pytest.raises(AssertionError, match=message):
        checks.check_matches_reference(fn, checks.sdpa_reference, qkv(2, 4, 3), extra={"attn_mask": mask})


def test_runs_on_meta():
    m = [torch.empty(2, 3, 4, device="meta") for _ in range(3)]
    out, _ = checks.check_runs_on_meta(good_attention, *m, torch.ones(3, 3, dtype=torch.bool, device="meta"))
    assert out.device.type == "meta"

    def cpu_constant(q, k, v):
        return q + torch.ones(q.shape)

    with pytest.raises(AssertionError, match="device=x.device"):
        checks.check_runs_on_meta(cpu_constant, *m)


class _MHA(nn.Module):
    def __init__(self, d, h, causal=False, skip_transpose=False):
        super().__init__()
        self.h, self.causal, self.skip = h, causal, skip_transpose
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, attn_mask=None):
        B, L, D = x.shape
        hd = D // self.h

        def split(t):
            return t.view(B, self.h, L, hd) if self.skip else t.view(B, L, self.h, hd).transpose(1, 2)

        mask = attn_mask
        if self.causal:
            c = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            mask = c if mask is None else mask & c
        a, w = good_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), mask)
        return self.o(a.transpose(1, 2).reshape(B, L, D)), w


def test_matches_torch_mha():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, **f64)
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[0, ..., :2] = False
    checks.check_matches_torch_mha(_MHA(8, 2).double(), 2, x, attn_mask=pad)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    checks.check_matches_torch_mha(_MHA(8, 2, causal=True).double(), 2, x, attn_mask=pad,
                                   ref_mask=pad & causal)
    with pytest.raises(AssertionError, match="split into heads"):
        checks.check_matches_torch_mha(_MHA(8, 2, skip_transpose=True).double(), 2, x)


def test_no_future_leakage():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8, **f64)
    checks.check_no_future_leakage(_MHA(8, 2, causal=True).double(), x)
    with pytest.raises(AssertionError, match="future tokens leak"):
        checks.check_no_future_leakage(_MHA(8, 2).double(), x)


def test_runtime_errors_from_learner_code_get_a_diagnosis():
    def merge_with_view(q, k, v, attn_mask=None):
        out, w = good_attention(q, k, v, attn_mask)
        return out.transpose(-2, -1).view(-1), w

    with pytest.raises(AssertionError, match=r"contiguous\(\).*PyTorch said"):
        checks.check_matches_reference(merge_with_view, checks.sdpa_reference, qkv(2, 4, 3))

    def mixes_dtypes(q, k, v, attn_mask=None):
        return good_attention(q, k.float(), v, attn_mask)

    with pytest.raises(AssertionError, match="dtype=x.dtype"):
        checks.check_matches_reference(mixes_dtypes, checks.sdpa_reference, qkv(2, 4, 3))


def test_check_linear_names_the_layout_problem():
    m = torch.nn.Module()
    m.q = torch.nn.Linear(4, 6, bias=False)
    assert checks.check_linear(m, "q", 4, 6) is m.q
    with pytest.raises(AssertionError, match="needs an nn.Linear named 'k'"):
        checks.check_linear(m, "k", 4, 6)
    with pytest.raises(AssertionError, match=r"nn.Linear\(4, 8\) but maps 4 -> 6"):
        checks.check_linear(m, "q", 4, 8)
    with pytest.raises(AssertionError, match="has no bias"):
        checks.check_linear(m, "q", 4, 6, bias=True)
    m.q = torch.nn.Linear(4, 6)
    with pytest.raises(AssertionError, match="bias=False"):
        checks.check_linear(m, "q", 4, 6, bias=False)


def test_check_no_delegation_catches_any_name_for_the_forbidden_piece():
    from handson.nn import MultiHeadAttention, attention

    forbidden = {"handson.nn.attention": attention, "F.scaled_dot_product_attention":
                 F.scaled_dot_product_attention, "nn.MultiheadAttention": torch.nn.MultiheadAttention,
                 "handson.nn.MultiHeadAttention": MultiHeadAttention}
    q = torch.randn(2, 3, 4)
    alias = attention

    def honest(q, k, v):
        w = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1)
        return w @ v, w

    out = checks.check_no_delegation(honest, q, q, q, forbidden=forbidden)
    assert out[0].shape == (2, 3, 4)
    for fn, name in [(lambda q, k, v: alias(q, k, v), "handson.nn.attention"),
                     (lambda q, k, v: (F.scaled_dot_product_attention(q, k, v), None),
                      "F.scaled_dot_product_attention")]:
        with pytest.raises(AssertionError, match=f"calls {name}, which this exercise asks"):
            checks.check_no_delegation(fn, q, q, q, forbidden=forbidden)
    wrapped = torch.nn.MultiheadAttention(4, 2, batch_first=True)
    with pytest.raises(AssertionError, match="nn.MultiheadAttention"):
        checks.check_no_delegation(lambda x: wrapped(x, x, x), q, forbidden=forbidden)
    lib = MultiHeadAttention(4, 2)
    with pytest.raises(AssertionError, match="handson.nn.MultiHeadAttention"):
        checks.check_no_delegation(lambda x: lib(x), q, forbidden=forbidden)


def test_instructor_only_paths_get_a_clear_message():
    def peek():
        open("/nonexistent/solutions/self_attention/self_attention.ipynb").read()

    with pytest.raises(AssertionError, match="only the instructor has"):
        checks.check_not_mutated(peek)


def test_bias_free_modules_compare_with_torch_mha():
    class NoBias(torch.nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.h = h
            for n in "qkvo":
                setattr(self, n, torch.nn.Linear(d, d, bias=False))

        def forward(self, x, attn_mask=None):
            B, L, D = x.shape
            split = lambda t: t.view(B, L, self.h, D // self.h).transpose(1, 2)  # noqa: E731
            out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
            s = split(self.q(x)) @ split(self.k(x)).transpose(-2, -1) / (D // self.h) ** 0.5
            return self.o(out.transpose(1, 2).reshape(B, L, D)), torch.softmax(s, -1)

    checks.check_matches_torch_mha(NoBias(8, 2).double(), 2, torch.randn(2, 5, 8, dtype=torch.float64))


# --- multi_query_attention ---

def test_check_kv_not_repeated_flags_copies_and_accepts_grouped_queries():
    torch.manual_seed(0)
    B, H, H_kv, L, d = 2, 6, 2, 5, 3
    g = H // H_kv
    q = torch.randn(B, H, L, d, dtype=torch.float64)
    k, v = torch.randn(2, B, H_kv, L, d, dtype=torch.float64)
    folded = lambda: torch.softmax(q.reshape(B, H_kv, g * L, d) @ k.transpose(-2, -1), -1) @ v
    checks.check_kv_not_repeated(folded, keys=k, values=v, n_head=H)
    checks.check_kv_not_repeated(lambda: torch.einsum("bhgld,bhsd->bhgls", q.view(B, H_kv, g, L, d), k),
                                 keys=k, values=v, n_head=H)
    checks.check_kv_not_repeated(lambda: F.scaled_dot_product_attention(q.reshape(B, H_kv, g * L, d), k, v),
                                 keys=k, values=v, n_head=H)
    for wrong in [lambda: q @ k.repeat_interleave(g, 1).transpose(-2, -1),
                  lambda: q @ (k / 2).repeat(1, g, 1, 1).transpose(-2, -1),
                  lambda: q.view(B, H_kv, g, L, d) @ k[:, :, None].transpose(-2, -1),
                  lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)]:
        with pytest.raises(AssertionError, match="K/V were repeated to H = 6 heads"):
            checks.check_kv_not_repeated(wrong, keys=k, values=v, n_head=H)


# --- cross_attention ---

class _Cross(torch.nn.Module):
    """A correct cross-attention module (context of its own width, kv computed once); ``flaw`` breaks it."""

    def __init__(self, d, h, dc=None, bias=True, flaw=""):
        super().__init__()
        dc = dc or d
        self.h, self.dh, self.flaw, self.cache = h, d // h, flaw, None
        self.q, self.o = torch.nn.Linear(d, d, bias=bias), torch.nn.Linear(d, d, bias=bias)
        self.k, self.v = torch.nn.Linear(dc, d, bias=bias), torch.nn.Linear(dc, d, bias=bias)

    def project_context(self, c):
        split = (lambda t: t.view(t.shape[0], self.h, t.shape[1], self.dh)) if self.flaw == "no_transpose" else \
            (lambda t: t.unflatten(-1, (self.h, -1)).transpose(1, 2))
        k, v = split(self.k(c)), split(self.v(c))
        return (v, k) if self.flaw == "swapped" else (k, v)

    def forward(self, x, context=None, attn_mask=None, *, kv=None):
        if self.flaw == "cache":
            if self.cache is None:
                self.cache = self.project_context(context)
            k, v = self.cache
        else:
            k, v = self.project_context(context) if kv is None else kv
        if self.flaw == "recompute" and kv is not None:
            self.k(torch.zeros(1, self.k.in_features, dtype=self.k.weight.dtype))
        q = self.q(x).unflatten(-1, (self.h, -1)).transpose(1, 2)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        if attn_mask is not None:
            m = attn_mask if self.flaw != "inverted" else ~attn_mask
            s = s.masked_fill(~m, float("-inf"))
        w = torch.softmax(s, -1)
        if attn_mask is not None and self.flaw != "inverted":
            w = w.masked_fill(~attn_mask.any(-1, keepdim=True), 0.0)
        return self.o((w @ v).transpose(1, 2).flatten(-2)), w


def test_cross_attention_matches_torch_with_another_context_width():
    torch.manual_seed(0)
    x, c = torch.randn(2, 3, 8, **f64), torch.randn(2, 5, 6, **f64)
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[1] = False
    for module in (_Cross(8, 2, 6).double(), _Cross(8, 2, 6, bias=False).double()):
        checks.check_matches_torch_cross_attention(module, 2, x, c)
        checks.check_matches_torch_cross_attention(module, 2, x, c, pad, use_kv=True)
    checks.check_matches_torch_cross_attention(_Cross(8, 2).double(), 2, x, torch.randn(2, 5, 8, **f64))
    with pytest.raises(AssertionError, match="k should be nn.Linear\\(6, 8\\)"):
        checks.check_matches_torch_cross_attention(_Cross(8, 2).double(), 2, x, c)
    with pytest.raises(AssertionError, match="swapped"):
        checks.check_matches_torch_cross_attention(_Cross(8, 2, 6, flaw="swapped").double(), 2, x, c)
    with pytest.raises(AssertionError, match="inverted"):
        checks.check_matches_torch_cross_attention(_Cross(8, 2, 6, flaw="inverted").double(), 2, x, c,
                                                   torch.ones(2, 1, 1, 5, dtype=torch.bool).tril(2))


def test_project_context_and_kv_checks_name_the_mistake():
    c = torch.randn(2, 5, 6, **f64)
    checks.check_project_context(_Cross(8, 2, 6).double(), 2, c)
    with pytest.raises(AssertionError, match="without the transpose"):
        checks.check_project_context(_Cross(8, 2, 6, flaw="no_transpose").double(), 2, c)
    with pytest.raises(AssertionError, match="no method project_context"):
        checks.check_project_context(torch.nn.Linear(2, 2), 2, c)
    m = _Cross(8, 2, 6, flaw="recompute").double()
    kv = m.project_context(c)
    with pytest.raises(AssertionError, match="ran self.k 1 time"):
        checks.check_layers_not_called(m, ["k", "v"], lambda: m(torch.randn(2, 1, 8, **f64), kv=kv))


def test_call_cross_attention_reports_mutation_signature_and_state():
    m = _Cross(8, 2, 6)
    x, c = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    out, w = checks.call_cross_attention(m, x, c, mask, positional=True)
    assert w.shape == (2, 2, 3, 5)

    class Mutates(_Cross):
        def forward(self, x, context=None, attn_mask=None, *, kv=None):
            attn_mask.logical_not_().logical_not_()
            return super().forward(x, context, attn_mask, kv=kv)

    with pytest.raises(AssertionError, match="attn_mask was modified in place"):
        checks.call_cross_attention(Mutates(8, 2, 6), x, c, mask)

    class NoKv(torch.nn.Module):
        def forward(self, x, context, attn_mask=None):
            return x, x

    with pytest.raises(AssertionError, match="keep the signature"):
        checks.call_cross_attention(NoKv(), x, kv=(c, c))
    with pytest.raises(AssertionError, match="keys and values from the context"):
        checks.call_cross_attention(m, x, torch.randn(2, 5, 8))

    def shapes(module, x, c):
        assert module(x, c)[1].shape[-1] == c.shape[1], "wrong S"

    checks.check_reused_instance(_Cross(8, 2, 6), [(x, c), (x, torch.randn(2, 7, 6))], shapes)
    with pytest.raises(AssertionError, match="keeps state across calls"):
        checks.check_reused_instance(_Cross(8, 2, 6, flaw="cache"), [(x, c), (x, torch.randn(2, 7, 6))], shapes)


def test_rows_summing_to_zero_blame_the_mask_not_the_softmax_dimension():
    s = torch.randn(1, 4, 4, dtype=torch.float64)
    allowed = torch.ones(4, 4, dtype=torch.bool).triu(1)          # a triu mask used as the allowed one
    w = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    with pytest.raises(AssertionError, match="triu"):
        checks.check_rows_sum_to_one(w)


# --- multi_head_attention ---

class _GeneralMHA(nn.Module):
    """Multi-head self-attention with head_dim independent of d_model; ``flaw`` plants one mistake."""

    def __init__(self, d, h, head_dim=None, bias=True, flaw=""):
        super().__init__()
        self.h, self.hd, self.flaw = h, head_dim or d // h, flaw
        inner = h * self.hd
        self.q, self.k, self.v = (nn.Linear(d, inner, bias=bias) for _ in range(3))
        self.o = nn.Linear(inner, d, bias=bias)

    def forward(self, x, attn_mask=None):
        split = lambda t: t.unflatten(-1, (self.h, self.hd)).transpose(1, 2)  # noqa: E731
        mask = attn_mask
        if mask is not None and self.flaw == "view_mask":
            mask = mask.view(-1, 1, x.shape[1], x.shape[1])
        if mask is not None and self.flaw == "inverted":
            mask = ~mask
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.flaw == "scale_d_model":
            q = q * math.sqrt(self.hd) / math.sqrt(x.shape[-1])
        a, w = good_attention(q, k, v, mask)
        return self.o(a.transpose(1, 2).flatten(-2)), w


def test_check_matches_mha_reference_general_head_dim_and_diagnoses():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 10, **f64)
    heads = torch.rand(2, 4, 5, 5) > 0.5
    heads[..., 0] = True
    heads[1, 2, 3] = False
    checks.check_matches_mha_reference(_GeneralMHA(10, 4, head_dim=3).double(), 4, x, heads, head_dim=3)
    checks.check_matches_mha_reference(_GeneralMHA(10, 2, bias=False).double(), 2, x, bias=False)
    with pytest.raises(AssertionError, match=r"q should be nn.Linear\(10, 12\)"):
        checks.check_matches_mha_reference(_GeneralMHA(10, 2).double(), 4, x, head_dim=3)
    with pytest.raises(AssertionError, match=r"scaled by 1/sqrt\(d_model\)"):
        checks.check_matches_mha_reference(_GeneralMHA(8, 2, flaw="scale_d_model").double(), 2,
                                           torch.randn(2, 5, 8, **f64))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    with pytest.raises(AssertionError, match="mask inverted"):
        checks.check_matches_mha_reference(_GeneralMHA(10, 2, flaw="inverted").double(), 2, x, causal)
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    with pytest.raises(AssertionError, match="fails with a mask of shape"):
        checks.check_matches_mha_reference(_GeneralMHA(10, 2, flaw="view_mask").double(), 2, x, pad)
    from handson.nn import MultiHeadAttention

    with pytest.raises(AssertionError, match="handson.nn.MultiHeadAttention"):
        lib = MultiHeadAttention(10, 2).double()
        checks.check_matches_mha_reference(lib, 2, x, causal)


def test_loading_from_torch_mha_checks_blocks_copies_and_outputs():
    torch.manual_seed(0)
    src = nn.MultiheadAttention(8, 2, batch_first=False, **f64)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()

    def load(mha, order=(0, 1, 2), share=False, transpose=False):
        m = _GeneralMHA(8, 2).double()
        with torch.no_grad():
            blocks = mha.in_proj_weight.chunk(3)
            for lin, i in zip((m.q, m.k, m.v), order):
                if share:
                    lin.weight = nn.Parameter(blocks[i])
                else:
                    lin.weight.copy_(blocks[i].T if transpose else blocks[i])
            for lin, b in zip((m.q, m.k, m.v), mha.in_proj_bias.chunk(3)):
                lin.bias.copy_(b)
            m.o.weight.copy_(mha.out_proj.weight)
            m.o.bias.copy_(mha.out_proj.bias)
        return m

    good = checks.check_builds(load, src, what="from_torch")
    checks.check_same_weights_as_torch(good, src)
    checks.check_parameters_are_copies(good, src)
    x = torch.randn(2, 5, 8, **f64)
    checks.check_matches_given_torch_mha(good, src, x, torch.ones(5, 5, dtype=torch.bool).tril())
    with pytest.raises(AssertionError, match="order of the blocks"):
        checks.check_same_weights_as_torch(load(src, order=(1, 0, 2)), src)
    with pytest.raises(AssertionError, match="transpose"):
        checks.check_same_weights_as_torch(load(src, transpose=True), src)
    with pytest.raises(AssertionError, match="shares memory"):
        checks.check_parameters_are_copies(load(src, share=True), src)

    def without_no_grad(mha):
        m = _GeneralMHA(8, 2).double()
        m.q.weight.copy_(mha.in_proj_weight[:8])
        return m

    with pytest.raises(AssertionError, match=r"torch.no_grad\(\)"):
        checks.check_builds(without_no_grad, src, what="from_torch")

    def mutates(mha):
        with torch.no_grad():
            mha.out_proj.weight.mul_(1.0)
        return load(mha)

    with pytest.raises(AssertionError, match="modified its argument"):
        checks.check_builds(mutates, src, what="from_torch")
    with pytest.raises(AssertionError, match="dtype and device"):
        checks.check_same_weights_as_torch(_GeneralMHA(8, 2), src)


# --- causal_masking ---

def _tiny_causal(d=4, h=2):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = h
            for n in "qkvo":
                setattr(self, n, nn.Linear(d, d))

        def forward(self, x, attn_mask=None, *, past_kv=None, use_cache=False):
            B, L, D = x.shape
            split = lambda t: t.view(B, L, self.h, D // self.h).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            if past_kv is not None:
                k, v = torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2)
            S = k.shape[2]
            mask = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L)
            if attn_mask is not None:
                mask = mask & attn_mask
            w = torch.softmax((q @ k.transpose(-2, -1) / (D // self.h) ** 0.5).masked_fill(~mask, float("-inf")), -1)
            w = w.masked_fill(~mask.any(-1, keepdim=True), 0.0)
            out = self.o((w @ v).transpose(1, 2).reshape(B, L, D))
            return (out, w, (k, v)) if use_cache else (out, w)

    torch.manual_seed(0)
    return Tiny().double()


def test_check_bool_mask_names_the_mistake():
    want = torch.ones(2, 4, dtype=torch.bool).tril(2)
    checks.check_bool_mask(want.clone(), want)
    with pytest.raises(AssertionError, match="top-left"):
        checks.check_bool_mask(torch.ones(2, 4, dtype=torch.bool).tril(), want,
                               mistakes=[(torch.ones(2, 4, dtype=torch.bool).tril(), "aligned top-left")])
    with pytest.raises(AssertionError, match="inverted"):
        checks.check_bool_mask(~want, want)
    with pytest.raises(AssertionError, match="torch.bool"):
        checks.check_bool_mask(want.float(), want)


def test_cache_matches_full_accepts_a_correct_cache_and_names_mistakes():
    m = _tiny_causal()
    x = torch.randn(2, 5, 4, **f64)
    checks.check_cache_matches_full(m, x, [2, 1, 2])
    pad = (torch.arange(5) >= torch.tensor([0, 2])[:, None])[:, None, None, :]
    checks.check_cache_matches_full(m, x, [3, 1, 1], pad)
    out, w, (k, v) = checks.causal_attention_reference(m, 2, x[:, 3:], past_kv=(torch.randn(2, 2, 3, 2, **f64),) * 2)
    assert w.shape == (2, 2, 2, 5) and k.shape == (2, 2, 5, 2)

    def wrong_order(x, attn_mask=None, *, past_kv=None, use_cache=False):
        res = m(x, attn_mask, past_kv=past_kv, use_cache=use_cache)
        if use_cache and past_kv is not None:
            k, v = res[2]
            S_past = past_kv[0].shape[2]
            res = (*res[:2], (torch.cat([k[:, :, S_past:], k[:, :, :S_past]], 2), v))
        return res

    with pytest.raises(AssertionError, match="BEFORE the cached"):
        checks.check_cache_matches_full(wrong_order, x, [2, 1, 2])

    def pair_only(x, attn_mask=None, **kwargs):
        return m(x, attn_mask)

    with pytest.raises(AssertionError, match="triple"):
        checks.check_cache_matches_full(pair_only, x, [2, 3])


def test_packed_and_state_checks():
    m = _tiny_causal()
    ids = torch.tensor([[0, 0, 1, 1, 1]])
    same = ids[..., :, None] == ids[..., None, :]
    x = torch.randn(1, 5, 4, **f64)
    checks.check_packed_matches_separate(m, x, ids, same[:, None])
    with pytest.raises(AssertionError, match="other documents"):
        checks.check_packed_matches_separate(m, x, ids, None)

    class Sticky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _tiny_causal()
            self.mask = None

        def forward(self, x):
            if self.mask is None:
                self.mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            return self.inner(x, self.mask)

    cases = [(torch.randn(1, 3, 4, **f64),), (torch.randn(1, 5, 4, **f64),)]
    check = lambda mod, t: checks.check_no_future_leakage(mod, t)  # noqa: E731
    checks.check_state_free(_tiny_causal(), cases, check)
    with pytest.raises(AssertionError, match="keeps state across calls"):
        checks.check_state_free(Sticky(), cases, check)


# --- self_attention ---

def _sa_general(q, k, v, attn_mask=None, scale=None, need_weights=True):
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale), None
    s = q @ k.transpose(-2, -1) * scale
    has = None
    if attn_mask is not None:
        has = attn_mask.any(-1, keepdim=True)
        s = s.masked_fill(~attn_mask, float("-inf")).masked_fill(~has, 0.0)
    w = torch.softmax(s, -1)
    if has is not None:
        w = w.masked_fill(~has, 0.0)
    return w @ v, w


def test_sdpa_reference_takes_float_masks():
    t = qkv(2, 4, 3)
    mask = torch.rand(4, 4) > 0.5
    mask[:, 0] = True
    fmask = torch.zeros(4, 4, **f64).masked_fill(~mask, float("-inf"))
    out_b, w_b = checks.sdpa_reference(t["q"], t["k"], t["v"], mask)
    out_f, w_f = checks.sdpa_reference(t["q"], t["k"], t["v"], fmask)
    assert torch.allclose(out_b, out_f) and torch.allclose(w_b, w_f)


def test_without_delegation_refuses_the_library_and_explains_index_errors():
    import handson.nn as lib

    t = qkv(2, 4, 3)
    guarded = checks.without_delegation(_sa_general, asked="f")
    guarded(t["q"], t["k"], t["v"])
    with pytest.raises(AssertionError, match="handson.nn.attention, which this exercise asks"):
        checks.without_delegation(lambda q, k, v: lib.attention(q, k, v), asked="f")(t["q"], t["k"], t["v"])
    with pytest.raises(AssertionError, match="fixed number of dimensions"):
        checks.without_delegation(lambda q, k, v: q @ k.transpose(1, 2))(torch.zeros(3, 4), torch.zeros(3, 4), None)
    with pytest.raises(AssertionError, match="float mask"):
        checks.without_delegation(lambda m: ~m)(torch.zeros(2))


def test_check_mask_convention_tells_inverted_ignored_and_finite_fills_apart():
    torch.manual_seed(0)
    s = torch.randn(4, 5, **f64)
    mask = torch.rand(4, 5) > 0.5
    mask[:, 0], mask[:, 1] = True, False
    checks.check_mask_convention(torch.softmax(s.masked_fill(~mask, float("-inf")), -1), mask)
    with pytest.raises(AssertionError, match="inverted"):
        checks.check_mask_convention(torch.softmax(s.masked_fill(mask, float("-inf")), -1), mask)
    with pytest.raises(AssertionError, match="ignored, or multiplied"):
        checks.check_mask_convention(torch.softmax(s * mask, -1), mask)
    with pytest.raises(AssertionError, match="finite value"):
        checks.check_mask_convention(torch.softmax(s.masked_fill(~mask, -30.0), -1), mask)


def test_check_fully_masked_rows_names_nan_and_uniform_rows():
    t = qkv(1, 3, 2)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    out, w = _sa_general(t["q"], t["k"], t["v"], mask)
    checks.check_fully_masked_rows(out, w, mask)
    s = (t["q"] @ t["k"].transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    w_nan = torch.softmax(s, -1)
    with pytest.raises(AssertionError, match="hold NaN"):
        checks.check_fully_masked_rows(w_nan @ t["v"], w_nan, mask)
    w_uni = torch.softmax(s.clamp_min(torch.finfo(s.dtype).min), -1)
    with pytest.raises(AssertionError, match="uniform average"):
        checks.check_fully_masked_rows(w_uni @ t["v"], w_uni, mask)


def test_check_backward_finite_finds_the_nan_that_zeroing_hides():
    t = {n: x.requires_grad_() for n, x in qkv(1, 3, 2).items()}
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    checks.check_backward_finite(lambda: _sa_general(t["q"], t["k"], t["v"], mask)[0].sum(), t)

    def zero_after(q, k, v):
        w = torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")), -1)
        return w.masked_fill(~mask.any(-1, keepdim=True), 0.0) @ v

    t = {n: x.detach().clone().requires_grad_() for n, x in t.items()}
    with pytest.raises(AssertionError, match="leaves that NaN in the graph"):
        checks.check_backward_finite(lambda: zero_after(t["q"], t["k"], t["v"]).sum(), t)


def test_check_not_materialised_accepts_sdpa_and_refuses_explicit_scores():
    t = qkv(2, 3, 4, 8)
    t["k"] = torch.randn(2, 3, 6, 8, **f64)
    t["v"] = torch.randn(2, 3, 6, 5, **f64)
    out, none = checks.check_not_materialised(_sa_general, t["q"], t["k"], t["v"], need_weights=False,
                                              scores_shape=(2, 3, 4, 6))
    assert none is None
    with pytest.raises(AssertionError, match=r"scores' shape \(2, 3, 4, 6\) was materialised"):
        checks.check_not_materialised(_sa_general, t["q"], t["k"], t["v"], scores_shape=(2, 3, 4, 6))
    with pytest.raises(AssertionError, match="materialised"):
        checks.check_not_materialised(lambda q, k: torch.einsum("...ld,...sd->...ls", q, k), t["q"], t["k"],
                                      scores_shape=(2, 3, 4, 6))


def test_check_raises_and_weights_hints():
    def refuses(m):
        raise TypeError("no")

    checks.check_raises(TypeError, refuses, 1)
    with pytest.raises(AssertionError, match="returned normally"):
        checks.check_raises(TypeError, lambda m: None, 1)
    with pytest.raises(AssertionError, match="raised ValueError"):
        checks.check_raises(TypeError, lambda m: int("x"), 1)
    unscaled = lambda q, k, v, scale=None: _sa_general(q, k, v)  # noqa: E731
    with pytest.raises(AssertionError, match="my hint"):
        checks.check_matches_reference(unscaled, checks.sdpa_reference, qkv(2, 4, 3), extra={"scale": 0.2},
                                       weights_hint="my hint")


def test_not_mutated_accepts_inputs_that_hold_nan_and_catches_writes_next_to_them():
    x = torch.tensor([1.0, float("nan"), 3.0])
    checks.check_not_mutated(lambda t: t * 2, x)                 # NaN != NaN, yet nothing changed

    def write(t):
        t.data[0] = 5.0                                          # a write that bumps no version
    with pytest.raises(AssertionError, match="modified in place"):
        checks.check_not_mutated(write, x.clone())
