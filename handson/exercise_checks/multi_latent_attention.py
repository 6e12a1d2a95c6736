"""Checks for the multi-head latent attention exercise (DeepSeek-V2, arXiv 2405.04434 section 2.1).

A float64 reference of MLA written here (its own rotate-half RoPE and RMSNorm), comparisons of a
learner's module with it that name the usual mistakes (the scale, RoPE on the wrong part or in the
wrong layout, a missing norm, the head split, the causal mask), a ``TorchDispatchMode`` that fails
an absorbed computation which builds the per-head keys or values of the context, a reference
latent cache, and checks of ``kv_cache_elements``, ``absorb``, ``MLACache`` and ``latent_decode``.
Every function raises ``AssertionError`` with one sentence that names what is wrong.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from handson import checks

LINEARS = ("w_dq", "w_uq", "w_qr", "w_dkv", "w_uk", "w_uv", "w_kr", "o")
NORMS = ("q_norm", "kv_norm")


# --- the reference -------------------------------------------------------------------------------

def _rope(t: Tensor, offset: int, base: float, interleaved: bool = False) -> Tensor:
    """Rotary embedding of t (..., L, d) at positions offset ... offset + L - 1 (rotate-half layout)."""
    d, L = t.size(-1), t.size(-2)
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=t.device) / d)
    angle = torch.arange(offset, offset + L, dtype=torch.float64, device=t.device)[:, None] * theta
    cos, sin = angle.cos().to(t.dtype), angle.sin().to(t.dtype)
    if interleaved:
        x1, x2 = t[..., 0::2], t[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = t[..., : d // 2], t[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rms(t: Tensor, weight: Tensor) -> Tensor:
    eps = torch.finfo(t.dtype).eps
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def params_of(m: torch.nn.Module, grad: bool = False) -> dict[str, Tensor]:
    """The module's weights by the contract's names, as new tensors (leaves if ``grad``)."""
    out = {}
    for name in LINEARS + NORMS:
        w = getattr(m, name).weight.detach().clone()
        out[name] = w.requires_grad_(grad)
    return out


def dims_of(m: torch.nn.Module) -> tuple[int, int, int, float]:
    """(n_head, d_head, d_rope, rope_base) read from the layers' shapes (and ``rope_base``)."""
    d_rope = m.w_kr.weight.shape[0]
    n_head = m.w_qr.weight.shape[0] // d_rope
    d_head = m.w_uq.weight.shape[0] // n_head
    return n_head, d_head, d_rope, float(getattr(m, "rope_base", 10000.0))


def reference(P: dict[str, Tensor], x: Tensor, dims: tuple[int, int, int, float],
              attn_mask: Tensor | None = None, variant: str = "") -> tuple[Tensor, Tensor]:
    """MLA of the contract on weights P, x (B, L, d_model), causal: -> (out, weights).

    ``variant`` names a plausible mistake, for diagnoses (empty: the right computation).
    """
    H, dh, dr, base = dims
    B, L, _ = x.shape

    def rope(t: Tensor) -> Tensor:
        return _rope(t, 0, base, variant == "interleaved")

    def split(t: Tensor, d: int) -> Tensor:
        if variant == "split_d_first":
            return t.view(B, L, d, H).permute(0, 3, 1, 2)
        return t.view(B, L, H, d).transpose(1, 2)

    xq = _rms(x, torch.ones_like(x[0, 0])) if variant == "norm_on_x" else x
    c_q = xq @ P["w_dq"].T
    c_kv = xq @ P["w_dkv"].T
    if variant not in ("no_q_norm", "norm_on_x", "no_norms"):
        c_q = _rms(c_q, P["q_norm"])
    if variant not in ("no_kv_norm", "norm_on_x", "no_norms"):
        c_kv = _rms(c_kv, P["kv_norm"])
    c_q_content, c_kv_content = (rope(c_q), rope(c_kv)) if variant == "rope_before_up" else (c_q, c_kv)
    q_c = split(c_q_content @ P["w_uq"].T, dh)
    k_c = split(c_kv_content @ P["w_uk"].T, dh)
    v_c = split(c_kv @ P["w_uk" if variant == "v_from_w_uk" else "w_uv"].T, dh)
    q_r = split(c_q @ P["w_qr"].T, dr)
    k_r = (x @ P["w_kr"].T)[:, None]
    if variant not in ("no_rope", "rope_before_up", "rope_k_only"):
        q_r = rope(q_r)
    if variant not in ("no_rope", "rope_before_up", "rope_q_only"):
        k_r = rope(k_r)
    if variant == "rope_all":
        q_c, k_c = rope(q_c), rope(k_c)
    scale = {"scale_d_head": 1 / math.sqrt(dh), "scale_d_rope": 1 / math.sqrt(dr),
             "scale_d_c": 1 / math.sqrt(P["w_dkv"].shape[0] + dr),
             "no_scale": 1.0}.get(variant, 1 / math.sqrt(dh + dr))
    scores = (q_c @ k_c.transpose(-2, -1) + q_r @ k_r.transpose(-2, -1)) * scale
    allowed = torch.ones(L, L, dtype=torch.bool, device=x.device)
    if variant != "not_causal":
        allowed = allowed.tril()
    if attn_mask is not None and variant != "mask_ignored":
        allowed = attn_mask if variant == "mask_replaces_causal" else allowed & attn_mask
    allowed = allowed.expand(scores.shape)
    has_key = allowed.any(-1, keepdim=True)
    w = torch.softmax(scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0), dim=-1)
    w = w.masked_fill(~has_key, 0.0)
    out = (w @ v_c).transpose(1, 2).reshape(B, L, H * dh) @ P["o"].T
    return out, w


_WEIGHT_MISTAKES = [
    ("mask_replaces_causal", "attn_mask replaced the causal mask: combine the two with AND"),
    ("not_causal", "the causal mask is missing: query i may attend keys j <= i only"),
    ("mask_ignored", "attn_mask was ignored: combine it with the causal mask (True = may attend, by AND)"),
    ("scale_d_head", "the scores were scaled by 1/sqrt(d_head): a head's query [q^C | q^R] has d_head + d_rope "
                     "components, so the scale is 1/sqrt(d_head + d_rope)"),
    ("scale_d_c", "the scores were scaled by 1/sqrt(d_c + d_rope), the width of the absorbed query: the scale "
                  "is that of the model, 1/sqrt(d_head + d_rope), in both forms"),
    ("scale_d_rope", "the scores were scaled by 1/sqrt(d_rope): the scale is 1/sqrt(d_head + d_rope)"),
    ("no_scale", "the scores were not scaled: multiply them by 1/sqrt(d_head + d_rope)"),
    ("no_rope", "RoPE was not applied: rotate q^R (per head) and the shared k^R by their positions"),
    ("rope_k_only", "RoPE was applied to the shared key k^R but not to the queries q^R: rotate both"),
    ("rope_q_only", "RoPE was applied to the queries q^R but not to the shared key k^R: rotate both"),
    ("rope_all", "RoPE was applied to the content part q^C, k^C as well: rotate only the decoupled part "
                 "q^R, k^R (RoPE on the content keys is what blocks absorbing W^UK)"),
    ("rope_before_up", "RoPE was applied to the latents before the up-projection: rotate q^R = w_qr(c^Q) and "
                       "k^R = w_kr(x) only, never c^Q or c^KV"),
    ("interleaved", "RoPE paired dimensions (2i, 2i + 1): the book's RoPE is rotate-half, pairing i with "
                    "i + d_rope/2 (use rope_cos_sin and apply_rope of handson.nn.positional_encoding)"),
    ("no_norms", "q_norm and kv_norm were not applied: c^Q = q_norm(w_dq(x)), c^KV = kv_norm(w_dkv(x))"),
    ("no_q_norm", "q_norm was not applied to c^Q = w_dq(x) (before w_uq and w_qr)"),
    ("no_kv_norm", "kv_norm was not applied to c^KV = w_dkv(x) (before w_uk and w_uv)"),
    ("norm_on_x", "the norms were applied to x instead of the latents: q_norm(w_dq(x)) and kv_norm(w_dkv(x))"),
    ("split_d_first", "the heads were split in the wrong index order: head i takes the output columns "
                      "i*d_head ... (i+1)*d_head - 1 of w_uq, w_uk, w_uv (view(B, L, n_head, d_head), or "
                      "einsum with the head index before the feature index)"),
]


def _diagnose_weights(weights: Tensor, P: dict[str, Tensor], x: Tensor, dims: tuple, attn_mask: Tensor | None,
                      label: str) -> str:
    with torch.no_grad():
        _, right = reference(P, x, dims, attn_mask)
    for variant, why in _WEIGHT_MISTAKES:
        try:
            with torch.no_grad():
                _, w = reference(P, x, dims, attn_mask, variant)
        except RuntimeError:
            continue
        if torch.allclose(w, right, atol=1e-9):     # this case cannot tell the mistake from the right answer
            continue
        if w.shape == weights.shape and torch.allclose(weights.detach().to(w.dtype), w, atol=1e-9):
            return f"the weights of {label}: {why}."
    return ""


def _call_pair(fn: Callable[..., Any], *args: Any, label: str, **kwargs: Any) -> tuple[Tensor, Tensor]:
    result = checks.check_not_mutated(fn, *args, **kwargs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"{label} should return a pair (out, weights) but returned {type(result).__name__}.")
    return result


def check_layers(m: torch.nn.Module, d_model: int, n_head: int, d_head: int, d_rope: int, d_c: int,
                 d_c_q: int) -> None:
    """The contract's layers: eight bias-free nn.Linear, two RMSNorms, nothing else with parameters."""
    if isinstance(getattr(m, "w_kr", None), torch.nn.Linear) and m.w_kr.out_features == n_head * d_rope != d_rope:
        raise AssertionError(f"w_kr has {n_head * d_rope} outputs, one rotary key per head: MLA's rotary key "
                             f"k^R is ONE head of d_rope = {d_rope} numbers shared by all heads, "
                             f"nn.Linear(d_model, d_rope) -- that is why the cache is only d_c + d_rope per token.")
    shapes = {"w_dq": (d_model, d_c_q), "w_uq": (d_c_q, n_head * d_head), "w_qr": (d_c_q, n_head * d_rope),
              "w_dkv": (d_model, d_c), "w_uk": (d_c, n_head * d_head), "w_uv": (d_c, n_head * d_head),
              "w_kr": (d_model, d_rope), "o": (n_head * d_head, d_model)}
    for name, (n_in, n_out) in shapes.items():
        checks.check_linear(m, name, n_in, n_out, bias=False,
                            why="MLA's layers have no biases; see the table of layers in the exercise.")
    for name, d in (("q_norm", d_c_q), ("kv_norm", d_c)):
        norm = getattr(m, name, None)
        w = getattr(norm, "weight", None)
        if not isinstance(norm, torch.nn.Module) or not isinstance(w, torch.nn.Parameter) or tuple(w.shape) != (d,):
            raise AssertionError(f"{name} should be an RMSNorm over {d} features (a module with a parameter "
                                 f"weight of shape ({d},)): q_norm normalises c^Q (d_c_q), kv_norm c^KV (d_c).")
        if isinstance(norm, torch.nn.LayerNorm):
            raise AssertionError(f"{name} is a LayerNorm: MLA normalises its latents with RMSNorm (no mean, no bias).")
    expected = sum(a * b for a, b in shapes.values()) + d_c_q + d_c
    n = sum(p.numel() for p in m.parameters())
    if n != expected:
        raise AssertionError(f"the module has {n} parameters instead of {expected}: eight Linear layers without "
                             "bias and the weights of q_norm and kv_norm, nothing else.")


def check_forward(m: torch.nn.Module, x: Tensor, attn_mask: Tensor | None = None, absorbed: bool = False,
                  grads: bool = True) -> tuple[Tensor, Tensor]:
    """m(x, attn_mask, absorbed=...) against the float64 reference: weights, out, gradients (x and weights)."""
    label = f"forward(absorbed={absorbed})"
    dims = dims_of(m)
    B, L, d_model = x.shape
    xi = x.detach().clone().requires_grad_(grads)
    for p in m.parameters():
        p.grad = None
    out, weights = _call_pair(m, xi, attn_mask, absorbed=absorbed, label=label)
    checks.check_shape(out, (B, L, d_model), f"out of {label}")
    checks.check_shape(weights, (B, dims[0], L, L), f"weights of {label}",
                       hint="one (L, L) matrix of weights per head: (B, n_head, L, L)")
    checks.check_dtype(out, x.dtype, f"out of {label}")
    checks.check_dtype(weights, x.dtype, f"weights of {label}")
    checks.check_finite(out, f"out of {label}")
    P = params_of(m, grad=grads)
    xr = x.detach().clone().requires_grad_(grads)
    ref_out, ref_w = reference(P, xr, dims, attn_mask)
    if not torch.allclose(weights.detach(), ref_w.detach(), atol=1e-10, rtol=1e-8):
        why = _diagnose_weights(weights, P, x, dims, attn_mask, label)
        if why:
            raise AssertionError(why)
        checks.check_close(weights, ref_w, f"weights of {label}",
                           hint="q^C_h . k^C_h + q^R_h . k^R over 1/sqrt(d_head + d_rope), causal, softmax over keys")
    if not torch.allclose(out.detach(), ref_out.detach(), atol=1e-10, rtol=1e-8):
        with torch.no_grad():
            swapped, _ = reference(P, x, dims, attn_mask, "v_from_w_uk")
        if torch.allclose(out.detach(), swapped, atol=1e-9):
            raise AssertionError(f"out of {label}: the values were up-projected with w_uk; v^C = w_uv(c^KV).")
        checks.check_close(out, ref_out, f"out of {label}",
                           hint="the weights are right: out = o([sum_j a_j v^C_j per head]), v^C = w_uv(c^KV)"
                           + (" -- in the absorbed form, the weighted sum of the latents c^KV, then W^UV per "
                              "head, then o" if absorbed else ""))
    if grads:
        proj = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
        checks.check_backward_runs(lambda: (out * proj).sum())
        (ref_out * proj).sum().backward()
        checks.check_grads_close({"x": xi}, {"x": xr.grad})
        for name in LINEARS + NORMS:
            g = getattr(m, name).weight.grad
            if g is None or not torch.allclose(g, P[name].grad, atol=1e-9, rtol=1e-7):
                raise AssertionError(f"the gradient of {name}.weight in {label} is "
                                     f"{'missing' if g is None else 'wrong'}: the parameter was detached or "
                                     "used through .data, or a copy of it was made outside autograd.")
    return out, weights


def check_forms_agree(m: torch.nn.Module, x: Tensor, attn_mask: Tensor | None = None) -> None:
    """The naive and absorbed forms give the same out, weights and gradients (x and every parameter)."""
    res = {}
    for absorbed in (False, True):
        for p in m.parameters():
            p.grad = None
        xi = x.detach().clone().requires_grad_()
        out, w = _call_pair(m, xi, attn_mask, absorbed=absorbed, label=f"forward(absorbed={absorbed})")
        checks.check_backward_runs(lambda: (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype,
                                                                 device=out.device).view(out.shape)).sum())
        res[absorbed] = (out.detach(), w.detach(), xi.grad,
                         {n: (None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()})
    (o0, w0, gx0, g0), (o1, w1, gx1, g1) = res[False], res[True]
    checks.check_close(w1, w0, "weights of the absorbed form",
                       hint="the absorbed form must give the naive form's weights (to rounding)")
    checks.check_close(o1, o0, "out of the absorbed form",
                       hint="the weights agree, so the value side differs: sum the latents with the weights, "
                       "then apply W^UV per head and o")
    checks.check_close(gx1, gx0, "the gradient of x in the absorbed form",
                       hint="both forms compute the same function, so their gradients agree")
    for n in g0:
        if (g0[n] is None) != (g1[n] is None) or (g0[n] is not None and not torch.allclose(g1[n], g0[n], atol=1e-9)):
            raise AssertionError(f"the gradient of {n} differs between the naive and absorbed forms: both must "
                                 "use (and differentiate through) the same parameters.")


# --- no per-head keys or values of the context ------------------------------------------------------

def context_heads(m: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The per-head keys k^C and values v^C of the context x (B, S, d_model), (B, H, S, d_head) each."""
    P = params_of(m)
    H, dh, _, _ = dims_of(m)
    B, S, _ = x.shape
    with torch.no_grad():
        c_kv = _rms(x @ P["w_dkv"].T, P["kv_norm"])
        k = (c_kv @ P["w_uk"].T).view(B, S, H, dh).transpose(1, 2)
        v = (c_kv @ P["w_uv"].T).view(B, S, H, dh).transpose(1, 2)
    return k, v


def _sorted(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).to(torch.float64).sort().values


def _holds(t: Tensor, ref: Tensor) -> bool:
    got = _sorted(t)
    denom = float((ref * ref).sum())
    if denom == 0.0:
        return False
    c = float((got * ref).sum()) / denom
    return c > 0 and bool(torch.allclose(got, c * ref, rtol=1e-8, atol=1e-11))


def check_latent_only(fn: Callable[..., Any], *args: Any, keys: Tensor, values: Tensor,
                      max_numel: int | None = None, what: str = "the absorbed form", **kwargs: Any) -> Any:
    """Call ``fn`` and assert that no tensor created holds the context's per-head keys or values.

    ``keys``, ``values``: (B, H, S, d_head), the k^C and v^C of the context (``context_heads``). Every
    tensor an ATen operator returns is recorded (``TorchDispatchMode``); one that holds the numbers of
    all of k^C (or v^C), or of one head of them, in any layout or scaled, fails. With ``max_numel``,
    a floating-point tensor of new memory with at least that many elements fails too (the size of the
    per-head keys of the context). Returns ``fn``'s result.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    H = keys.shape[1]
    refs = []
    for name, t in (("keys k^C", keys), ("values v^C", values)):
        refs.append((name, "all heads", t.numel(), _sorted(t)))
        for h in range(H):
            refs.append((name, f"head {h}", t[:, h].numel(), _sorted(t[:, h])))
    found: list[str] = []

    def _flat(obj: Any) -> list[Any]:
        if isinstance(obj, (tuple, list)):
            return [u for o in obj for u in _flat(o)]
        if isinstance(obj, dict):
            return [u for o in obj.values() for u in _flat(o)]
        return [obj]

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if found:
                return out
            for t in _flat(out):
                if not (isinstance(t, Tensor) and t.is_floating_point() and t.device.type != "meta"):
                    continue
                op = func.overloadpacket.__name__
                for name, part, numel, ref in refs:
                    if t.numel() == numel and _holds(t, ref):
                        found.append(f"a tensor of shape {tuple(t.shape)} created by {op} holds the "
                                     f"per-head {name} of the context ({part})")
                        break
                if not found and max_numel is not None and t.numel() >= max_numel:
                    inputs = {a.untyped_storage().data_ptr() for a in _flat((args, kwargs or {}))
                              if isinstance(a, Tensor)}
                    if t.untyped_storage().data_ptr() not in inputs:
                        found.append(f"a tensor of shape {tuple(t.shape)} ({t.numel()} numbers, created by {op}) "
                                     f"is as large as the per-head keys of the context ({max_numel}); note that "
                                     "a matmul that broadcasts c^KV (B, 1, S, d_c) against the n_head query heads "
                                     "copies it n_head times -- fold the heads into the query axis or use einsum")
                if found:
                    break
            return out

    with _Recorder():
        result = checks._call_learner(fn, *args, **kwargs)
    if found:
        raise AssertionError(
            f"{what} materialised per-head keys or values: {found[0]}. Compute from the latents alone: "
            "multiply the content queries by W^UK (q^C_h W^UK_h, d_c numbers per head) and score them against "
            "c^KV itself; take the weighted sum of the c^KV and apply W^UV per head afterwards.")
    return result


# --- cache sizes -------------------------------------------------------------------------------------

def check_kv_cache_elements(fn: Callable[..., Any]) -> None:
    """Table 1 of DeepSeek-V2 for several shapes, and ValueError for unknown kinds or missing sizes."""
    cases = [
        (("mha", 60, 128, 128), {}, 2 * 128 * 128 * 60, "MHA caches 2 n_h d_h numbers per token and layer"),
        (("gqa", 60, 128, 128), {"n_groups": 8}, 2 * 8 * 128 * 60, "GQA caches 2 n_g d_h per layer (n_groups key "
                                                                   "and value heads, not n_head)"),
        (("mqa", 60, 128, 128), {}, 2 * 128 * 60, "MQA caches one key and one value head, 2 d_h per layer"),
        (("mla", 60, 128, 128), {"d_c": 512, "d_rope": 64}, 576 * 60, "MLA caches c^KV and the one shared k^R, "
                                                                      "(d_c + d_rope) per layer, for any n_head"),
        (("mha", 32, 32, 128), {}, 2 * 32 * 128 * 32, "MHA caches 2 n_h d_h per layer"),
        (("gqa", 3, 6, 5), {"n_groups": 2}, 2 * 2 * 5 * 3, "GQA caches 2 n_g d_h per layer"),
        (("mqa", 3, 6, 5), {}, 2 * 5 * 3, "MQA caches 2 d_h per layer, whatever n_head"),
        (("mla", 3, 6, 5), {"d_c": 7, "d_rope": 3}, 10 * 3, "MLA caches (d_c + d_rope) per layer, whatever n_head "
                                                            "and d_head"),
    ]
    for args, kwargs, expected, why in cases:
        got = checks._call_learner(fn, *args, **kwargs)
        if isinstance(got, bool) or not isinstance(got, int) or got != expected:
            extra = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            raise AssertionError(f"kv_cache_elements{args[:1] + args[1:]}{', ' + extra if extra else ''} returned "
                                 f"{got!r} instead of the int {expected}: {why}, times n_layers.")
    for args, kwargs, why in [(("mla", 2, 4, 8), {}, "d_c and d_rope are needed for MLA"),
                              (("mla", 2, 4, 8), {"d_c": 4}, "d_rope is needed for MLA"),
                              (("gqa", 2, 4, 8), {}, "n_groups is needed for GQA"),
                              (("mlp", 2, 4, 8), {}, "'mlp' is not a kind of attention")]:
        checks.check_raises(ValueError, fn, *args, why=why, **kwargs)


# --- absorb ------------------------------------------------------------------------------------------

def merged_reference(m: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """(W^UQ_h^T W^UK_h (H, d_c_q, d_c), W^UV_h^T W^O_h^T (H, d_c, d_model)) from the module's weights."""
    H, dh, _, _ = dims_of(m)
    with torch.no_grad():
        uq = m.w_uq.weight.view(H, dh, -1)
        uk = m.w_uk.weight.view(H, dh, -1)
        uv = m.w_uv.weight.view(H, dh, -1)
        wo = m.o.weight.view(m.o.weight.shape[0], H, dh)
        return torch.einsum("hdq,hdc->hqc", uq, uk), torch.einsum("hdc,mhd->hcm", uv, wo)


def check_absorb(absorb: Callable[..., Any], m: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """absorb(m) -> (w_qk, w_vo): shapes, values, m unchanged; their use reproduces the module's scores."""
    H, dh, _, _ = dims_of(m)
    d_c, d_c_q, d_model = m.w_uk.weight.shape[1], m.w_uq.weight.shape[1], m.o.weight.shape[0]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    result = checks._call_learner(absorb, m)
    for n, p in m.named_parameters():
        if not torch.equal(p.detach(), before[n]):
            raise AssertionError(f"absorb(mla) changed {n}: it must only read the weights.")
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"absorb(mla) should return a pair (w_qk, w_vo), not {type(result).__name__}.")
    w_qk, w_vo = result
    want_qk, want_vo = merged_reference(m)
    checks.check_shape(w_qk, (H, d_c_q, d_c), "w_qk", hint="one (d_c_q, d_c) matrix W^UQ_h^T W^UK_h per head")
    checks.check_shape(w_vo, (H, d_c, d_model), "w_vo", hint="one (d_c, d_model) matrix W^UV_h^T W^O_h^T per head")
    checks.check_dtype(w_qk, m.w_uq.weight.dtype, "w_qk")
    uk = m.w_uk.weight.detach().view(H, dh, d_c)
    wrong_split = torch.einsum("dhq,dhc->hqc", m.w_uq.weight.detach().view(dh, H, d_c_q),
                               m.w_uk.weight.detach().view(dh, H, d_c))
    if not torch.allclose(w_qk.detach(), want_qk, atol=1e-10):
        if torch.allclose(w_qk.detach(), want_qk.sum(0, keepdim=True).expand_as(want_qk), atol=1e-10) or \
                torch.allclose(w_qk.detach(), (m.w_uq.weight.T @ m.w_uk.weight).detach().expand_as(want_qk), atol=1e-10):
            raise AssertionError("w_qk mixes the heads (W^UQ^T W^UK over all heads at once): merge head by head, "
                                 "w_qk[h] = W^UQ_h^T W^UK_h with the d_head rows of head h.")
        if torch.allclose(w_qk.detach(), wrong_split, atol=1e-10):
            raise AssertionError("w_qk splits the heads in the wrong index order: head h owns the rows "
                                 "h*d_head ... (h+1)*d_head - 1 of w_uq and w_uk (view(n_head, d_head, -1)).")
        checks.check_close(w_qk, want_qk, "w_qk", hint="w_qk[h] = W^UQ_h^T W^UK_h, so that c^Q w_qk[h] c^KV^T "
                           "is head h's content score: einsum('hdq,hdc->hqc', w_uq as (H, d_head, d_c_q), "
                           "w_uk as (H, d_head, d_c))")
    if not torch.allclose(w_vo.detach(), want_vo, atol=1e-10):
        if torch.allclose(w_vo.detach(), torch.einsum("hdc,mhd->hcm", uk, m.o.weight.detach().view(d_model, H, dh)),
                          atol=1e-10):
            raise AssertionError("w_vo was built from w_uk: the output side absorbs W^UV, w_vo[h] = W^UV_h^T W^O_h^T.")
        checks.check_close(w_vo, want_vo, "w_vo", hint="w_vo[h] = W^UV_h^T W^O_h^T, where W^O_h are the d_head "
                           "columns h*d_head ... of o.weight: out = sum_h (weights_h @ c^KV) @ w_vo[h]")
    return w_qk, w_vo


# --- the latent cache and decoding -------------------------------------------------------------------

class ReferenceCache:
    """A latent cache (c^KV and k^R only) that checks what it is given; the tests' own."""

    def __init__(self, batch_size: int, d_c: int, d_rope: int, max_len: int = 64):
        self.shape = (batch_size, d_c, d_rope)
        self.max_len = max_len
        self.c_kv: Tensor | None = None
        self.k_r: Tensor | None = None
        self.updates = 0

    def __len__(self) -> int:
        return 0 if self.c_kv is None else self.c_kv.size(1)

    def update(self, c_kv: Tensor, k_r: Tensor) -> tuple[Tensor, Tensor]:
        B, d_c, d_rope = self.shape
        for name, t, d in (("c_kv", c_kv, d_c), ("k_r", k_r, d_rope)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] != B or t.shape[2] != d:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise AssertionError(
                    f"cache.update got {name} of shape {got} instead of (B, T, {d}): the cache holds the latent "
                    f"c^KV (B, T, d_c) and the one shared rotary key k^R (B, T, d_rope), nothing decompressed "
                    f"and no head axis -- call cache.update(c_kv, k_r) once per call, for the new tokens.")
        if c_kv.shape[1] != k_r.shape[1]:
            raise AssertionError("cache.update got c_kv and k_r for different numbers of tokens.")
        self.updates += 1
        self.c_kv = c_kv.detach().clone() if self.c_kv is None else torch.cat([self.c_kv, c_kv.detach()], 1)
        self.k_r = k_r.detach().clone() if self.k_r is None else torch.cat([self.k_r, k_r.detach()], 1)
        return self.c_kv, self.k_r


def _decode_variant(P: dict[str, Tensor], x_all: Tensor, dims: tuple, a: int, b: int, variant: str) -> Tensor:
    """Weights (B, H, b - a, b) of the new queries a..b-1 over keys 0..b-1 under a mistaken decode."""
    H, dh, dr, base = dims
    B = x_all.size(0)
    x = x_all[:, :b]

    def pos_offset(i: int) -> int:
        return 0 if variant == "no_offset" else i

    c_q = _rms(x[:, a:] @ P["w_dq"].T, P["q_norm"])
    q_c = (c_q @ P["w_uq"].T).view(B, b - a, H, dh).transpose(1, 2)
    q_r = _rope((c_q @ P["w_qr"].T).view(B, b - a, H, dr).transpose(1, 2), pos_offset(a), base)
    c_kv = _rms(x @ P["w_dkv"].T, P["kv_norm"])
    k_c = (c_kv @ P["w_uk"].T).view(B, b, H, dh).transpose(1, 2)
    raw = x @ P["w_kr"].T
    # the first chunk (keys 0 ... a-1) was cached right; the new chunk's keys and/or queries start at 0
    k_r = _rope(raw, 0, base)
    if variant in ("no_offset", "queries_offset_only"):
        k_r = torch.cat([_rope(raw[:, :a], 0, base), _rope(raw[:, a:], 0, base)], 1)
    if variant == "keys_offset_only":
        q_r = _rope((c_q @ P["w_qr"].T).view(B, b - a, H, dr).transpose(1, 2), 0, base)
    scores = (q_c @ k_c.transpose(-2, -1) + q_r @ k_r[:, None].transpose(-2, -1)) / math.sqrt(dh + dr)
    L, S = b - a, b
    if variant == "top_left":
        allowed = torch.ones(L, S, dtype=torch.bool).tril()
    elif variant == "not_causal":
        allowed = torch.ones(L, S, dtype=torch.bool)
    else:
        allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    has_key = allowed.any(-1, keepdim=True)
    w = torch.softmax(scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0), -1)
    return w.masked_fill(~has_key, 0.0)


_DECODE_MISTAKES = [
    ("no_offset", "the new tokens were rotated from position 0: their RoPE positions continue from len(cache) "
                  "(rope_cos_sin(..., offset=len(cache)) for q^R and k^R)"),
    ("queries_offset_only", "the new keys k^R were rotated from position 0: the new tokens are at positions "
                            "len(cache) ... for the keys as for the queries"),
    ("keys_offset_only", "the new queries q^R were rotated from position 0: the new tokens are at positions "
                         "len(cache) ... for the queries as for the keys"),
    ("top_left", "the causal mask is aligned top-left: T new queries over S cached keys need the bottom-right "
                 "mask, query i sees keys j <= i + S - T (causal_mask(T, S))"),
    ("not_causal", "the causal mask is missing: a chunk of new tokens must not see each other's future"),
]


def check_decode(decode: Callable[..., Any], m: torch.nn.Module, x: Tensor, chunks: Sequence[int],
                 cache: Any = None, latent_only: bool = True) -> Any:
    """Prefill and decode x chunk by chunk with decode(m, chunk, cache); each result equals the rows of the
    full forward (reference), the cache ends holding the latents of all of x, per-head keys never built."""
    dims = dims_of(m)
    H, dh, dr, _ = dims
    B, L, d_model = x.shape
    d_c = m.w_dkv.weight.shape[0]
    cache = ReferenceCache(B, d_c, dr) if cache is None else cache
    P = params_of(m)
    with torch.no_grad():
        ref_out, ref_w = reference(P, x, dims)
        full_k, full_v = context_heads(m, x)
    a = 0
    for T in chunks:
        b = a + T
        where = f"latent_decode of tokens {a} ... {b - 1} after {a} cached"
        keys, values = full_k[:, :, :b], full_v[:, :, :b]
        call = lambda: _call_pair(decode, m, x[:, a:b], cache, label="latent_decode")   # noqa: E731
        if latent_only and b > 1:      # one cached token: its value IS the result, whatever the method
            out, w = check_latent_only(call, keys=keys, values=values,
                                       max_numel=B * H * b * dh if T == 1 and b >= 16 else None,
                                       what="latent_decode")
        else:
            out, w = checks._call_learner(call)
        checks.check_shape(out, (B, T, d_model), f"out of {where}")
        checks.check_shape(w, (B, H, T, b), f"weights of {where}",
                           hint=f"the T = {T} new queries attend all S = {b} cached tokens: (B, n_head, T, S)")
        checks.check_dtype(out, x.dtype, f"out of {where}")
        if len(cache) != b:
            raise AssertionError(f"after {where}, len(cache) is {len(cache)} instead of {b}: append the new "
                                 "tokens' latents with cache.update once per call.")
        want_w = ref_w[:, :, a:b, :b]
        if not torch.allclose(w.detach(), want_w, atol=1e-10):
            for variant, why in _DECODE_MISTAKES:
                if a > 0 and torch.allclose(w.detach(), _decode_variant(P, x, dims, a, b, variant), atol=1e-9):
                    raise AssertionError(f"the weights of {where}: {why}.")
            if isinstance(cache, ReferenceCache):
                check_cache_contents(cache.c_kv, cache.k_r, m, x[:, :b], f"the cache after {where}")
            checks.check_close(w, want_w, f"weights of {where}",
                               hint="they must equal rows a ... b-1 of the full causal forward: the new tokens' "
                               "queries at their positions against all cached latents")
        checks.check_close(out, ref_out[:, a:b], f"out of {where}",
                           hint="the weights are right: out = o(W^UV_h (weights_h @ c^KV)) per head")
        a = b
    return cache


def check_cache_contents(c_kv: Tensor, k_r: Tensor, m: torch.nn.Module, x: Tensor, what: str = "the cache") -> None:
    """c_kv (B, S, d_c) and k_r (B, S, d_rope) are kv_norm(w_dkv(x)) and RoPE(w_kr(x)) at positions 0 ... S-1."""
    P = params_of(m)
    _, _, dr, base = dims_of(m)
    with torch.no_grad():
        want_c = _rms(x @ P["w_dkv"].T, P["kv_norm"])
        raw = x @ P["w_kr"].T
        want_k = _rope(raw, 0, base)
    checks.check_shape(c_kv, want_c.shape, f"c_kv held by {what}", hint="(B, S, d_c): the latents, not keys")
    checks.check_shape(k_r, want_k.shape, f"k_r held by {what}", hint="(B, S, d_rope): one rotary key per token")
    if not torch.allclose(c_kv.detach(), want_c, atol=1e-10):
        if torch.allclose(c_kv.detach(), x @ P["w_dkv"].T, atol=1e-10):
            raise AssertionError(f"c_kv held by {what} is w_dkv(x) before kv_norm: cache c^KV = kv_norm(w_dkv(x)).")
        checks.check_close(c_kv, want_c, f"c_kv held by {what}", hint="c^KV = kv_norm(w_dkv(x)) of every token")
    if not torch.allclose(k_r.detach(), want_k, atol=1e-10):
        if torch.allclose(k_r.detach(), raw, atol=1e-10):
            raise AssertionError(f"k_r held by {what} has no RoPE: cache k^R after the rotation of its position.")
        checks.check_close(k_r, want_k, f"k_r held by {what}",
                           hint="k^R = RoPE(w_kr(x)) at the token's own position (0, 1, ... over the whole sequence)")


def check_cache_class(cls: Callable[..., Any], *, dtype: torch.dtype = torch.float64) -> None:
    """MLACache(batch_size, max_len, d_c, d_rope, dtype=, device=): update/len/reset/max_len."""
    B, max_len, d_c, dr = 2, 6, 5, 4
    cache = checks._call_learner(cls, B, max_len, d_c, dr, dtype=dtype)
    if len(cache) != 0:
        raise AssertionError(f"a new MLACache has len {len(cache)} instead of 0.")
    gen = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(B, T, d_c, generator=gen, dtype=dtype), torch.randn(B, T, dr, generator=gen, dtype=dtype))
              for T in (3, 1, 2)]
    seen_c, seen_k = [], []
    for i, (c, k) in enumerate(chunks):
        c_before, k_before = c.clone(), k.clone()
        result = checks._call_learner(cache.update, c, k)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AssertionError("MLACache.update(c_kv, k_r) should return the pair (c_kv_all, k_r_all).")
        seen_c.append(c_before)
        seen_k.append(k_before)
        want_c, want_k = torch.cat(seen_c, 1), torch.cat(seen_k, 1)
        got_c, got_k = result
        checks.check_shape(got_c, want_c.shape, f"c_kv returned by update number {i + 1}",
                           hint="all latents cached so far, (B, S, d_c), S = len(cache) after the update")
        checks.check_shape(got_k, want_k.shape, f"k_r returned by update number {i + 1}",
                           hint="all rotary keys cached so far, (B, S, d_rope)")
        checks.check_close(got_c, want_c, f"c_kv returned by update number {i + 1}",
                           hint="the earlier latents followed by the new ones, in order")
        checks.check_close(got_k, want_k, f"k_r returned by update number {i + 1}",
                           hint="the earlier rotary keys followed by the new ones, in order")
        checks.check_dtype(got_c, dtype, "the cached c_kv")
        if len(cache) != want_c.shape[1]:
            raise AssertionError(f"after caching {want_c.shape[1]} tokens len(cache) is {len(cache)}.")
    checks.check_raises(ValueError, cache.update, torch.zeros(B, 1, d_c, dtype=dtype), torch.zeros(B, 1, dr, dtype=dtype),
                        why=f"max_len = {max_len} tokens are cached already")
    if len(cache) != max_len:
        raise AssertionError(f"an update refused with ValueError changed the cache: len is {len(cache)}, "
                             f"not {max_len}.")
    reset = getattr(cache, "reset", None)
    if reset is None:
        raise AssertionError("MLACache has no reset() method.")
    reset()
    if len(cache) != 0:
        raise AssertionError(f"after reset() len(cache) is {len(cache)} instead of 0.")
    got_c, got_k = checks._call_learner(cache.update, *chunks[2])
    checks.check_close(got_c, chunks[2][0], "c_kv after reset and one update",
                       hint="reset forgets every cached token")
    fresh = checks._call_learner(cls, B, 4, d_c, dr, dtype=dtype)
    checks.check_raises(ValueError, fresh.update, torch.zeros(B, 5, d_c, dtype=dtype),
                        torch.zeros(B, 5, dr, dtype=dtype), why="5 tokens do not fit in max_len = 4")
