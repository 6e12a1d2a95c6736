"""Assertions with diagnoses, shared by the exercises' visible and hidden tests.

Every check raises :class:`AssertionError` with one sentence that says what is wrong and the
most likely cause, so a learner (or an autograder's feedback page) learns from the failure.
The concrete cases -- inputs, sizes, masks -- live in the exercises' test cells; this module
only knows *how* to compare.

Conventions (see the book's preface): boolean masks use True = "may attend", broadcastable to
the scores' shape ``(..., L, S)``; attention functions and modules return ``(out, weights)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "check_shape",
    "check_dtype",
    "check_finite",
    "check_close",
    "check_rows_sum_to_one",
    "check_masked_weights_zero",
    "check_backward_runs",
    "check_grads_present",
    "check_grads_close",
    "check_not_mutated",
    "check_matches_reference",
    "check_runs_on_meta",
    "sdpa_reference",
    "check_matches_torch_mha",
    "copy_into_torch_mha",
    "check_no_future_leakage",
    "check_linear",
    "check_no_delegation",
]

#: Tolerances for float64 comparisons against PyTorch's reference implementations.
ATOL64 = 1e-10
RTOL64 = 1e-8


def _fmt_shape(shape: Sequence[int] | torch.Size) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


#: PyTorch error texts and what they usually mean in attention code.
_RUNTIME_DIAGNOSES = [
    ("view size is not compatible", "view() was called on a non-contiguous tensor (after a "
     "transpose): call .contiguous() first, or use reshape()"),
    ("doesn't match the broadcast shape", "an in-place operation (such as mask &= ... or "
     "masked_fill_) tried to write a broadcast result into a smaller tensor: use the out-of-place form"),
    ("modified by an inplace operation", "a tensor saved for the gradient was modified in place "
     "(for example masked_fill_ on the softmax output): use the out-of-place version"),
    ("leaf Variable", "an input that requires grad was modified in place: never write into the "
     "caller's tensors"),
    ("expected scalar type", "float32 and float64 tensors were mixed: a constant, mask or cast "
     "changed the dtype -- create everything with dtype=x.dtype"),
    ("same dtype", "float32 and float64 tensors were mixed: a constant, mask or cast changed the "
     "dtype -- create everything with dtype=x.dtype"),
    ("not on the expected device", "a tensor was created on another device: create masks and "
     "constants with device=x.device"),
    ("must match the size of tensor", "two tensors' shapes do not broadcast: check the order of "
     "the dimensions (split heads with view then transpose) and the mask's shape"),
    ("shapes cannot be multiplied", "a matrix product got incompatible shapes: check which "
     "dimensions are transposed (k.transpose(-2, -1)) and the projections' sizes"),
    ("is invalid for input of size", "a view/reshape asked for a shape with a different number of "
     "elements: check the head split (n_head * head_dim == d_model)"),
]


#: Paths that only the instructor has; a submission that reaches for them is told so.
_INSTRUCTOR_ONLY = ("solutions", "gradebook", "autograded", "submitted", "catalog")


def _call_learner(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's code, turning PyTorch's common RuntimeErrors into diagnoses."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        where = str(getattr(exc, "filename", "") or "")
        if any(part in where for part in _INSTRUCTOR_ONLY):
            raise AssertionError(
                f"the code tried to open {where!r}, which only the instructor has: an answer may use "
                "its own code, the release and the library pieces the exercise allows -- nothing else."
            ) from None
        raise
    except RuntimeError as exc:
        text = str(exc)
        for needle, diagnosis in _RUNTIME_DIAGNOSES:
            if needle in text:
                first = text.strip().splitlines()[0][:160] if text.strip() else ""
                raise AssertionError(f"{diagnosis} (PyTorch said: {first})") from None
        raise


def check_shape(t: Any, expected: Sequence[int], name: str = "output", hint: str = "") -> None:
    """Assert that ``t`` is a tensor of exactly ``expected`` shape."""
    if not isinstance(t, Tensor):
        raise AssertionError(
            f"{name} should be a torch.Tensor but is {type(t).__name__}: "
            "did the function return the right value (attention returns (out, weights))?"
        )
    if type(t) not in (Tensor, torch.nn.Parameter):
        raise AssertionError(
            f"{name} is a {type(t).__name__}, a subclass of torch.Tensor: return a plain tensor."
        )
    if tuple(t.shape) != tuple(expected):
        msg = f"{name} has shape {_fmt_shape(t.shape)} but should have shape {_fmt_shape(expected)}"
        raise AssertionError(msg + (f": {hint}" if hint else "."))


def check_dtype(t: Tensor, dtype: torch.dtype, name: str = "output") -> None:
    """Assert ``t.dtype == dtype`` (float64 in must give float64 out)."""
    if t.dtype != dtype:
        raise AssertionError(
            f"{name} has dtype {t.dtype} but the inputs were {dtype}: a constant or mask was "
            "probably created without dtype=/device= of the input, or the result was cast."
        )


def check_finite(t: Tensor, name: str = "output") -> None:
    """Assert that ``t`` holds no NaN or infinity."""
    if not torch.isfinite(t).all():
        n_nan = int(torch.isnan(t).sum())
        raise AssertionError(
            f"{name} contains {n_nan} NaN value(s) or infinities: a softmax over a row whose keys "
            "are all masked gives NaN -- such rows must give zero weights and a zero output."
        )


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max())


def check_close(
    actual: Any,
    expected: Tensor,
    name: str = "output",
    hint: str = "",
    atol: float = ATOL64,
    rtol: float = RTOL64,
) -> None:
    """Assert that ``actual`` has ``expected``'s shape and values within tolerance."""
    check_shape(actual, expected.shape, name, hint="the shapes disagree with the reference")
    if not torch.allclose(actual.detach().to(expected.dtype), expected.detach(), atol=atol, rtol=rtol,
                          equal_nan=False):
        diff = _max_abs_diff(actual, expected)
        msg = f"{name} differs from the reference by up to {diff:.3g}"
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
        if expected.dtype == torch.float64 and 0 < diff <= 1e-5 * max(scale, 1.0):
            hint = (hint + " " if hint else "") + ("(A difference this small is float32 rounding: part of the "
                                                   "computation probably ran in float32 -- keep the input's "
                                                   "dtype throughout.)")
        raise AssertionError(msg + (f": {hint}" if hint else "."))


def check_rows_sum_to_one(weights: Tensor, mask: Tensor | None = None, name: str = "weights",
                          atol: float = 1e-6) -> None:
    """Assert that every row of attention ``weights`` sums to 1.

    Rows whose query may attend no key at all (``mask`` all False in that row) must sum to 0.
    """
    check_finite(weights, name)
    sums = weights.detach().sum(-1)
    expected = torch.ones_like(sums)
    if mask is not None:
        allowed_any = torch.broadcast_to(mask.to(weights.device), weights.shape).any(-1)
        expected = allowed_any.to(sums.dtype)
    if (weights.detach() < 0).any():
        raise AssertionError(f"{name} has negative entries: the weights must come from a softmax.")
    bad = (sums - expected).abs() > atol
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        if abs(float(sums[idx])) <= atol and float(expected[idx]) == 1.0:
            raise AssertionError(
                f"row {idx} of {name} sums to 0 although its query may attend some keys: the mask "
                "blocks all of them -- was a causal mask built with triu (the future) instead of tril, "
                "or inverted? True means 'may attend'."
            )
        raise AssertionError(
            f"rows of {name} must sum to 1 but row {idx} sums to {float(sums[idx]):.4g}: "
            "the softmax was probably taken over the wrong dimension (use dim=-1, over the keys)."
        )


def check_masked_weights_zero(weights: Tensor, mask: Tensor, name: str = "weights") -> None:
    """Assert that every position the boolean ``mask`` forbids (False) has weight exactly 0."""
    check_finite(weights, name)
    forbidden = ~torch.broadcast_to(mask.to(weights.device), weights.shape)
    leaked = weights.detach()[forbidden]
    if leaked.numel() and (leaked != 0).any():
        raise AssertionError(
            f"{name} gives non-zero weight (up to {float(leaked.abs().max()):.3g}) to positions the "
            "mask forbids: True means 'may attend' -- was the mask inverted, ignored, or filled "
            "with a finite value instead of -inf?"
        )


_INPLACE_HINT = (
    "backward() failed because a tensor saved for the gradient was modified in place "
    "(for example masked_fill_ or *= on the softmax output): use the out-of-place version"
)


def check_backward_runs(loss_fn: Callable[[], Tensor]) -> None:
    """Call ``loss_fn()`` and ``backward()`` on its result, translating autograd errors."""
    try:
        loss = loss_fn()
    except RuntimeError as exc:
        if "leaf Variable" in str(exc):
            raise AssertionError(
                "an input that requires grad was modified in place: never write into the "
                "caller's tensors (use out-of-place operations)."
            ) from None
        raise
    try:
        loss.backward()
    except RuntimeError as exc:
        text = str(exc)
        if "modified by an inplace operation" in text:
            raise AssertionError(_INPLACE_HINT + ".") from None
        if "does not require grad" in text:
            raise AssertionError(
                "backward() failed because the result does not depend on the inputs through "
                "autograd: was the computation detached (.detach(), .data, torch.no_grad())?"
            ) from None
        raise


def check_grads_present(inputs: Mapping[str, Tensor]) -> None:
    """Assert each named input received a finite gradient after ``backward()``."""
    for name, t in inputs.items():
        if t.grad is None:
            raise AssertionError(
                f"{name}.grad is None: {name} was cut out of the graph -- look for .detach(), "
                ".data or torch.no_grad() on the path from it to the output."
            )
        if not torch.isfinite(t.grad).all():
            raise AssertionError(
                f"{name}.grad contains NaN or infinities: a fully masked row probably went through "
                "a softmax of all -inf."
            )


def check_grads_close(inputs: Mapping[str, Tensor], expected: Mapping[str, Tensor],
                      atol: float = ATOL64, rtol: float = RTOL64) -> None:
    """Assert that each input's ``.grad`` matches the reference gradient."""
    check_grads_present(inputs)
    for name, t in inputs.items():
        ref = expected[name]
        if not torch.allclose(t.grad, ref, atol=atol, rtol=rtol):
            diff = _max_abs_diff(t.grad, ref)
            raise AssertionError(
                f"the gradient with respect to {name} differs from the reference by up to "
                f"{diff:.3g} although the forward pass may look right: autograd does not see "
                "writes through .data (or a detached copy), so the gradient is silently wrong."
            )


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal values, NaN equal to NaN in the same place (an input may hold NaN on purpose)."""
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()) or a.shape != b.shape:
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def check_not_mutated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` and assert no tensor argument changed (values or ``_version``).

    Returns whatever ``fn`` returned.
    """
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    tensors = [(n, t) for n, t in named if isinstance(t, Tensor)]
    before = [(n, t, t.detach().clone(), t._version) for n, t in tensors]
    result = _call_learner(fn, *args, **kwargs)
    for n, t, copy, version in before:
        changed_values = t.device.type != "meta" and not _same_values(t.detach(), copy)
        if changed_values or t._version != version:
            raise AssertionError(
                f"{n} was modified in place by the call (version {version} -> {t._version}): an "
                "in-place operation such as masked_fill_ wrote into the caller's tensor (or a view "
                "of it); compute on a new tensor instead."
            )
    return result


def sdpa_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                   scale: float | None = None) -> tuple[Tensor, Tensor]:
    """PyTorch's own attention output and the matching weights, for any leading batch dims.

    The output comes from ``F.scaled_dot_product_attention``; the weights are recomputed
    explicitly (SDPA does not return them), with fully masked rows set to zero as SDPA does.
    ``attn_mask`` is boolean (True = may attend) or float (added to the scores).
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.size(-1)))
    if attn_mask is not None:
        # a bool mask: True = may attend; a float mask is added to the scores (-inf blocks)
        s = s + attn_mask if attn_mask.is_floating_point() else s.masked_fill(~attn_mask, float("-inf"))
        w = torch.softmax(s, dim=-1)
        w = torch.nan_to_num(w, nan=0.0)
    else:
        w = torch.softmax(s, dim=-1)
    return out, w


def _leaves(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in tensors.items()}


def check_matches_reference(
    fn: Callable[..., Any],
    ref: Callable[..., Any],
    inputs: Mapping[str, Tensor],
    extra: Mapping[str, Any] | None = None,
    check_weights: bool = True,
    atol: float = ATOL64,
    rtol: float = RTOL64,
    weights_hint: str = "",
) -> None:
    """Compare an attention ``fn`` with a reference ``ref``: outputs, weights and gradients.

    ``weights_hint`` (optional) replaces the generic hint given when the weights differ.

    ``inputs`` are named tensors passed as keyword arguments (fresh leaves are made for each
    side); ``extra`` are further keyword arguments (a mask). Both callables return
    ``(out, weights)``; gradients of a random projection of ``out`` are compared for every
    floating-point input.
    """
    extra = dict(extra or {})
    mine, theirs = _leaves(inputs), _leaves(inputs)
    result = check_not_mutated(fn, **mine, **extra)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(
            f"the call should return a pair (out, weights) but returned {type(result).__name__}."
        )
    out, weights = result
    ref_out, ref_weights = ref(**theirs, **extra)
    check_shape(out, ref_out.shape, "out", hint="check the order of the matrix products and "
                "which tensor supplies the last dimension (the values)")
    check_dtype(out, ref_out.dtype, "out")
    check_finite(out, "out")
    if check_weights:
        check_shape(weights, ref_weights.shape, "weights",
                    hint="weights have one row per query and one column per key")
        check_close(weights, ref_weights, "weights",
                    hint=weights_hint or "check the scale 1/sqrt(d_k), the softmax dimension and the "
                    "mask convention (True = may attend)", atol=atol, rtol=rtol)
    check_close(out, ref_out, "out", hint="the weights should multiply the values: out = weights @ v",
                atol=atol, rtol=rtol)
    gen = torch.Generator(device="cpu").manual_seed(0)
    proj = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    check_backward_runs(lambda: (out * proj).sum())
    ref_loss = (ref_out * proj).sum()
    ref_loss.backward()
    grads = {n: t for n, t in mine.items() if t.requires_grad}
    check_grads_close(grads, {n: theirs[n].grad for n in grads}, atol=atol, rtol=rtol)


def check_runs_on_meta(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with tensors on the ``meta`` device; explain device mismatches.

    A constant created without ``device=x.device`` lands on the CPU and meets a meta tensor,
    which raises -- a cheap CPU-only test of device-agnostic code.
    """
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as exc:
        text = str(exc)
        if "device" in text or "meta" in text:
            raise AssertionError(
                "the code failed for inputs on another device (meta): a mask or constant was "
                "created on the CPU -- create it with device=x.device (and dtype=x.dtype)."
            ) from None
        raise


def check_linear(module: torch.nn.Module, name: str, in_features: int, out_features: int,
                 bias: bool | None = None, why: str = "") -> torch.nn.Linear:
    """Assert that ``module.<name>`` is an ``nn.Linear(in_features, out_features)``.

    ``bias``: True requires a bias, False forbids one, None accepts both. Returns the layer.
    """
    layer = getattr(module, name, None)
    if not isinstance(layer, torch.nn.Linear):
        found = "nothing" if layer is None else type(layer).__name__
        raise AssertionError(f"the module needs an nn.Linear named {name!r} (the book's naming), "
                             f"but {name!r} is {found}.")
    if (layer.in_features, layer.out_features) != (in_features, out_features):
        raise AssertionError(
            f"{name} should be nn.Linear({in_features}, {out_features}) but maps {layer.in_features} "
            f"-> {layer.out_features}" + (f": {why}" if why else "."))
    if bias is True and layer.bias is None:
        raise AssertionError(f"{name} has no bias, but this module must have one (bias=True).")
    if bias is False and layer.bias is not None:
        raise AssertionError(f"{name} has a bias, but with bias=False the module must have none.")
    return layer


def _bias(layer: torch.nn.Linear) -> Tensor:
    """The layer's bias, or zeros for a layer without one (a bias-free module is a valid style)."""
    if layer.bias is not None:
        return layer.bias
    return torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device)


def _copy_into_torch_mha(module: torch.nn.Module, n_head: int, dtype: torch.dtype,
                         device: torch.device) -> torch.nn.MultiheadAttention:
    d = getattr(getattr(module, "q", None), "in_features", None)
    if d is None:
        check_linear(module, "q", 0, 0)
    for name in ("q", "k", "v", "o"):
        check_linear(module, name, d, d, why="every projection keeps d_model (heads split the result).")
    ref = torch.nn.MultiheadAttention(d, n_head, batch_first=True, dtype=dtype, device=device)
    copy_into_torch_mha(module, ref)
    return ref


def copy_into_torch_mha(module: torch.nn.Module, ref: torch.nn.MultiheadAttention) -> None:
    """Copy the book's ``q``, ``k``, ``v``, ``o`` layers into PyTorch's packed attention ``ref``.

    ``in_proj_weight`` is ``cat([W_q, W_k, W_v])`` along dim 0 (each ``(out, in)`` like ``nn.Linear``);
    a missing bias is copied as zeros.
    """
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([module.q.weight, module.k.weight, module.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([_bias(module.q), _bias(module.k), _bias(module.v)]))
        ref.out_proj.weight.copy_(module.o.weight)
        ref.out_proj.bias.copy_(_bias(module.o))


def check_matches_torch_mha(
    module: torch.nn.Module,
    n_head: int,
    x: Tensor,
    context: Tensor | None = None,
    attn_mask: Tensor | None = None,
    ref_mask: Tensor | None = None,
    call: Callable[..., Any] | None = None,
    atol: float = ATOL64,
    rtol: float = RTOL64,
    weights_hint: str = "",
) -> None:
    """Compare an attention module with ``nn.MultiheadAttention`` holding the same weights.

    ``weights_hint`` (optional) replaces the generic hint given when the weights differ.

    ``module`` has ``nn.Linear`` layers ``q, k, v, o`` (d_model -> d_model) and returns
    ``(out, weights)`` with per-head weights ``(B, H, L, S)`` (or ``(B, L, S)`` for one head).
    It is called as ``module(x, attn_mask=attn_mask)`` or, with ``context``,
    ``module(x, context, attn_mask=attn_mask)``; pass ``call(module, x, context)`` to call it
    differently. ``ref_mask`` (default ``attn_mask``) is the mask the reference must apply, in
    the book's convention (True = may attend); it is inverted for ``nn.MultiheadAttention``. Query
    rows that may attend no key are compared with zero weights and a zero attention result.
    Compares output, weights, and the gradients with respect to the inputs and the q, k, v, o weights.
    """
    ref_mask = attn_mask if ref_mask is None else ref_mask
    dtype, device = x.dtype, x.device
    module.zero_grad(set_to_none=True)
    ref = _copy_into_torch_mha(module, n_head, dtype, device)
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    c1 = c2 = None
    if context is not None:
        c1 = context.detach().clone().requires_grad_()
        c2 = context.detach().clone().requires_grad_()
    if call is not None:
        result = _call_learner(call, module, x1, c1)
    elif context is None:
        result = _call_learner(module, x1, attn_mask=attn_mask)
    else:
        result = _call_learner(module, x1, c1, attn_mask=attn_mask)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError("the module should return a pair (out, weights).")
    out, weights = result
    kv = x2 if c2 is None else c2
    B, L, S = x.shape[0], x.shape[1], kv.shape[1]
    ref_attn_mask = None
    allowed = None
    if ref_mask is not None:
        allowed = torch.broadcast_to(ref_mask.to(device), (B, n_head, L, S))
        # nn.MultiheadAttention: True = NOT allowed, 3-D masks are (B * H, L, S); rows with no
        # allowed key are opened up here and zeroed below, since MHA would give NaN for them.
        empty = ~allowed.any(-1, keepdim=True)
        ref_attn_mask = (~(allowed | empty)).reshape(B * n_head, L, S)
    ref_out_raw, ref_w = _mha_forward_zeroing(ref, x2, kv, ref_attn_mask, allowed, n_head)
    if n_head == 1 and isinstance(weights, Tensor) and weights.dim() == 3:
        want_w = ref_w[:, 0]  # one head: (B, L, S) is accepted as well
    else:
        want_w = ref_w
    check_shape(out, ref_out_raw.shape, "out")
    check_shape(weights, want_w.shape, "weights",
                hint="weights are per head, shaped (batch, n_head, queries, keys)")
    check_dtype(out, dtype, "out")
    check_finite(out, "out")
    check_close(weights, want_w, "weights", atol=atol, rtol=rtol,
                hint=weights_hint or "check the split into heads (view then transpose), the scale "
                "1/sqrt(d_head), the softmax dimension and the mask (True = may attend)")
    check_close(out, ref_out_raw, "out", atol=atol, rtol=rtol,
                hint="check how heads are merged back (transpose then reshape) and the output "
                "projection o")
    gen = torch.Generator(device="cpu").manual_seed(0)
    proj = torch.randn(out.shape, generator=gen, dtype=dtype).to(device)
    check_backward_runs(lambda: (out * proj).sum())
    (ref_out_raw * proj).sum().backward()
    inputs = {"x": x1} if c1 is None else {"x": x1, "context": c1}
    expected = {"x": x2.grad} if c2 is None else {"x": x2.grad, "context": c2.grad}
    check_grads_close(inputs, expected, atol=atol, rtol=rtol)
    d = module.q.in_features
    g, gb = ref.in_proj_weight.grad, ref.in_proj_bias.grad
    mine = {"q.weight": module.q.weight, "k.weight": module.k.weight, "v.weight": module.v.weight,
            "o.weight": module.o.weight}
    want = {"q.weight": g[:d], "k.weight": g[d:2 * d], "v.weight": g[2 * d:],
            "o.weight": ref.out_proj.weight.grad}
    for name, ref_grad in [("q", gb[:d]), ("k", gb[d:2 * d]), ("v", gb[2 * d:]),
                           ("o", ref.out_proj.bias.grad)]:
        if getattr(module, name).bias is not None:
            mine[f"{name}.bias"], want[f"{name}.bias"] = getattr(module, name).bias, ref_grad
    check_grads_close(mine, want, atol=atol, rtol=rtol)


def _mha_forward_zeroing(ref: torch.nn.MultiheadAttention, x: Tensor, kv: Tensor,
                         mask: Tensor | None, allowed: Tensor | None, n_head: int
                         ) -> tuple[Tensor, Tensor]:
    """nn.MultiheadAttention's output and per-head weights, with empty query rows zeroed."""
    if allowed is None or bool(allowed.any(-1).all()):
        out, w = ref(x, kv, kv, attn_mask=mask, need_weights=True, average_attn_weights=False)
        return out, w
    # Recompute from the reference's own projections, zeroing rows with no allowed key, so
    # that the comparison follows SDPA's convention for such rows.
    d = ref.embed_dim
    hd = d // n_head
    wq, wk, wv = ref.in_proj_weight.split(d)
    bq, bk, bv = ref.in_proj_bias.split(d)
    B, L, S = x.shape[0], x.shape[1], kv.shape[1]
    q = F.linear(x, wq, bq).view(B, L, n_head, hd).transpose(1, 2)
    k = F.linear(kv, wk, bk).view(B, S, n_head, hd).transpose(1, 2)
    v = F.linear(kv, wv, bv).view(B, S, n_head, hd).transpose(1, 2)
    attn, w = sdpa_reference(q, k, v, allowed)
    out = ref.out_proj(attn.transpose(1, 2).reshape(B, L, d))
    return out, w


def check_no_future_leakage(fn: Callable[[Tensor], Any], x: Tensor, name: str = "out") -> None:
    """Assert that position t of ``fn(x)`` depends on no input position after t.

    ``fn`` maps ``x`` (B, L, D) to ``out`` or ``(out, weights)`` with ``out`` (B, L, ...). For
    every t the inputs after t are replaced by noise and the outputs up to t must not change;
    the gradient of ``out[:, t]`` must be zero at every later input position.
    """
    def run(inp: Tensor) -> Tensor:
        res = _call_learner(fn, inp)
        return res[0] if isinstance(res, tuple) else res

    base = run(x.detach()).detach()
    check_finite(base, name)
    L = x.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(1)
    for t in range(L - 1):
        noisy = x.detach().clone()
        noisy[:, t + 1:] = torch.randn(noisy[:, t + 1:].shape, generator=gen, dtype=x.dtype).to(x.device) * 3
        changed = run(noisy).detach()
        if not torch.allclose(changed[:, :t + 1], base[:, :t + 1], atol=1e-12, rtol=0):
            diff = float((changed[:, :t + 1] - base[:, :t + 1]).abs().max())
            raise AssertionError(
                f"{name} at position {t} changed by {diff:.3g} when only later positions changed: "
                "future tokens leak -- is the causal mask applied, lower-triangular (tril, not triu), "
                "aligned at the bottom right when there are more keys than queries, and not inverted? "
                "Is it combined with any other mask by AND (not OR)? Do rows with no allowed key get zero "
                "weights (a finite fill such as finfo.min gives them a uniform row over every key, future "
                "ones included)? Are the heads split and merged with a transpose (view(B, L, H, d)"
                ".transpose(1, 2) and back), so that no values move between positions?"
            )
    xg = x.detach().clone().requires_grad_()
    out = run(xg)
    t = max(0, L // 2 - 1)
    check_backward_runs(lambda: out[:, t].sum())
    if xg.grad is not None and xg.grad[:, t + 1:].abs().max() != 0:
        leak = float(xg.grad[:, t + 1:].abs().max())
        raise AssertionError(
            f"the gradient of {name} at position {t} reaches later input positions (by up to "
            f"{leak:.1e}; it must be exactly 0): future tokens leak through the attention weights -- "
            "the causal mask is missing, inverted or applied after the softmax, or blocked scores "
            "get a finite fill (such as -1e4) that leaves them a tiny weight instead of -inf."
        )


def _code_objects(obj: Any) -> set[Any]:
    """The code objects of a function, or of every function defined in a class's body."""
    if isinstance(obj, type):
        return {f.__code__ for c in obj.__mro__ if c.__module__.startswith(("handson", "torch.nn.modules"))
                for f in vars(c).values() if hasattr(f, "__code__")} - _code_objects_of_base()
    fn = getattr(obj, "__func__", obj)
    return {fn.__code__} if hasattr(fn, "__code__") else set()


def _code_objects_of_base() -> set[Any]:
    return {f.__code__ for f in vars(torch.nn.Module).values() if hasattr(f, "__code__")}


def check_no_delegation(fn: Callable[..., Any], *args: Any, forbidden: Mapping[str, Any],
                        asked: str = "answer", **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` and assert that it never called a ``forbidden`` callable.

    ``forbidden`` maps a readable name to a function, builtin or class (a class stands for all the
    methods of its body). An exercise forbids the library piece (or PyTorch built-in) that it asks
    the learner to write; calling it anywhere inside ``fn``, by any name, fails with a message that
    says so. Returns ``fn``'s result.
    """
    import sys

    codes: dict[Any, str] = {}
    builtins_: dict[int, str] = {}
    for name, obj in forbidden.items():
        found = _code_objects(obj)
        for code in found:
            codes[code] = name
        if not found:
            builtins_[id(obj)] = name
    seen: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            seen.append(codes[frame.f_code])
        elif event == "c_call" and id(arg) in builtins_:
            seen.append(builtins_[id(arg)])

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = _call_learner(fn, *args, **kwargs)
    finally:
        sys.setprofile(old)
    if seen:
        raise AssertionError(
            f"the {asked} calls {seen[0]}, which this exercise asks you to write yourself: using the "
            "library's (or PyTorch's) version of the asked piece earns no marks for this part."
        )
    return result


# --- multi_query_attention ---

def _sorted_values(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).to(torch.float64).sort().values


def _holds_repeated(t: Tensor, ref_sorted: Tensor) -> bool:
    """Whether ``t`` holds the values of ``ref_sorted`` (sorted, flat), up to a positive factor."""
    got = _sorted_values(t)
    denom = float((ref_sorted * ref_sorted).sum())
    if denom == 0.0:
        return False
    c = float((got * ref_sorted).sum()) / denom
    return c > 0 and bool(torch.allclose(got, c * ref_sorted, rtol=1e-9, atol=1e-12))


def check_kv_not_repeated(fn: Callable[..., Any], *args: Any, keys: Tensor, values: Tensor,
                          n_head: int, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` and assert that it never creates the keys or values repeated
    to ``n_head`` heads.

    ``keys`` and ``values`` are the call's own K and V, ``(B, H_kv, S, d)``. Every tensor that an
    ATen operator produces during the call is recorded (a ``TorchDispatchMode``); one that owns
    new memory of ``B * n_head * S * d`` elements holding the keys' (or values') numbers, each
    ``n_head / H_kv`` times -- in any layout, transposed or scaled by a positive constant -- is a
    repetition: ``repeat_kv``, ``repeat_interleave``, ``expand(...).reshape``, a matrix product
    that broadcasts a ``(B, H_kv, 1, S, d)`` key against grouped queries (``matmul`` copies the
    broadcast operand), or ``F.scaled_dot_product_attention(..., enable_gqa=True)``, which runs here
    on its math path, the one that repeats. Returns ``fn``'s result.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    n_kv = keys.shape[-3]
    if n_head == n_kv:
        return _call_learner(fn, *args, **kwargs)
    g = n_head // n_kv
    refs = {}
    for name, t in (("K", keys), ("V", values)):
        rep = t.detach().repeat_interleave(g, dim=-3)
        refs[name] = (rep.numel(), _sorted_values(rep))
    found: list[tuple[str, tuple[int, ...], str]] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not found:
                for t in tree_flatten(out)[0]:
                    if not (isinstance(t, Tensor) and t.is_floating_point() and t.device.type != "meta"):
                        continue
                    owns = t.untyped_storage().nbytes() >= t.numel() * t.element_size()
                    for name, (numel, ref) in refs.items():
                        if owns and t.numel() == numel and _holds_repeated(t, ref):
                            found.append((name, tuple(t.shape), func.overloadpacket.__name__))
                            break
            return out

    with sdpa_kernel(SDPBackend.MATH), _Recorder():
        result = _call_learner(fn, *args, **kwargs)
    if found:
        name, shape, op = found[0]
        raise AssertionError(
            f"K/V were repeated to H = {n_head} heads ({name} of {n_kv} key/value "
            f"head{'s' if n_kv > 1 else ''}, copied {g} times each: a tensor of shape {_fmt_shape(shape)} "
            f"was created by {op}): fold the g "
            "query heads of each group into the query axis instead -- reshape q (B, H, L, d) to "
            "(B, H_kv, g * L, d) (or (B, H_kv, g, L, d) with einsum) and multiply by the un-repeated "
            "keys. repeat_kv, repeat_interleave, expand + reshape, a matmul that broadcasts a key of "
            "one head against several query heads, and SDPA's enable_gqa all copy K/V."
        )
    return result


# --- multi_head_attention ---

def mha_delegates() -> dict[str, Any]:
    """The ready-made attention pieces an exercise that asks for multi-head attention refuses.

    For :func:`check_no_delegation`: PyTorch's ``nn.MultiheadAttention.forward`` and
    ``F.multi_head_attention_forward``, the library's attention core (``handson.nn.attention``,
    ``handson.nn.MultiHeadAttention``) and the chapters' versions of attention and of the module.
    ``F.scaled_dot_product_attention``, ``split_heads`` and ``merge_heads`` are not in it.
    """
    import handson.nn as lib
    from handson.nn import multi_head_attention as chapter
    from handson.nn import self_attention as first

    return {"nn.MultiheadAttention.forward": torch.nn.MultiheadAttention.forward,
            "F.multi_head_attention_forward": F.multi_head_attention_forward,
            "handson.nn.attention": lib.attention, "handson.nn.MultiHeadAttention": lib.MultiHeadAttention,
            "the chapter's attention (handson.nn.multi_head_attention.attention)": chapter.attention,
            "the chapter's MultiHeadAttention (handson.nn.multi_head_attention)": chapter.MultiHeadAttention,
            "handson.nn.self_attention.scaled_dot_product_attention": first.scaled_dot_product_attention}


def _mha_layers(module: torch.nn.Module, d_model: int, inner: int, bias: bool | None, who: str) -> None:
    why = (f"{who}: q, k and v map d_model = {d_model} to n_head * head_dim = {inner}, and o maps "
           f"{inner} back to {d_model}")
    for name in ("q", "k", "v"):
        check_linear(module, name, d_model, inner, bias=bias, why=why)
    check_linear(module, "o", inner, d_model, bias=bias, why=why)
    if bias is None:
        has = {n: getattr(module, n).bias is not None for n in "qkvo"}
        if len(set(has.values())) > 1:
            raise AssertionError(f"{who}: some of q, k, v, o have a bias and others not ({has}): with "
                                 "bias=True all four have one, with bias=False none.")


def check_matches_mha_reference(
    module: torch.nn.Module,
    n_head: int,
    x: Tensor,
    attn_mask: Tensor | None = None,
    *,
    head_dim: int | None = None,
    bias: bool | None = None,
    forbidden: Mapping[str, Any] | None = None,
    atol: float = ATOL64,
    rtol: float = RTOL64,
) -> None:
    """Compare a multi-head self-attention module with attention computed from its own weights.

    The reference projects with the module's ``q, k, v`` (d_model -> n_head * head_dim), attends
    per head with ``F.scaled_dot_product_attention`` (scale 1/sqrt(head_dim); rows whose mask allows
    no key give zero weights and a zero result) and applies ``o`` (n_head * head_dim -> d_model), so
    head_dim need not be d_model / n_head and the layers may lack biases. ``module(x, attn_mask)``
    must return ``(out, weights (B, H, L, S))``; it is called through :func:`check_no_delegation`
    (``forbidden`` defaults to :func:`mha_delegates`). Compares output, weights, and the gradients
    with respect to ``x`` and every weight and bias.
    """
    B, L, d_model = x.shape
    head_dim = d_model // n_head if head_dim is None else head_dim
    inner = n_head * head_dim
    _mha_layers(module, d_model, inner, bias, f"MultiHeadAttention with n_head={n_head}, head_dim={head_dim}")
    module.zero_grad(set_to_none=True)
    x1 = x.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    result = _call_with_mask(module, x1, attn_mask, mha_delegates() if forbidden is None else forbidden)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError("the module should return a pair (out, weights).")
    out, weights = result
    params = {f"{n}.{p}": getattr(getattr(module, n), p) for n in "qkvo" for p in ("weight", "bias")
              if getattr(getattr(module, n), p) is not None}
    ref_params = {n: t.detach().clone().requires_grad_() for n, t in params.items()}

    def lin(name: str, t: Tensor) -> Tensor:
        return F.linear(t, ref_params[f"{name}.weight"], ref_params.get(f"{name}.bias"))

    q, k, v = (lin(n, x2).unflatten(-1, (n_head, head_dim)).transpose(1, 2) for n in "qkv")
    allowed = None
    if attn_mask is not None:
        allowed = torch.broadcast_to(attn_mask.to(x.device), (B, n_head, L, L))
    ref_attn, ref_w = sdpa_reference(q, k, v, allowed)
    if allowed is not None:
        ref_attn = ref_attn.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    ref_out = lin("o", ref_attn.transpose(1, 2).flatten(-2))
    check_shape(out, (B, L, d_model), "out", hint="the output has the input's shape (B, L, d_model)")
    check_shape(weights, (B, n_head, L, L), "weights",
                hint="weights are per head, shaped (batch, n_head, queries, keys), not averaged")
    check_dtype(out, x.dtype, "out")
    check_dtype(weights, x.dtype, "weights")
    _explain_mha_weights(weights, q.detach(), k.detach(), allowed, ref_w.detach(), d_model, head_dim)
    if d_model == inner and torch.allclose(weights.detach(), ref_w.detach(), atol=atol, rtol=rtol) and \
            torch.allclose(out.detach(), ref_attn.detach().transpose(1, 2).flatten(-2), atol=atol, rtol=rtol) and \
            not torch.allclose(out.detach(), ref_out.detach(), atol=atol, rtol=rtol):
        raise AssertionError("out equals the merged heads before the output projection: apply o to the "
                             "merged heads (out = o(merge_heads(weights @ v))).")
    check_finite(out, "out")
    check_finite(weights, "weights")
    check_close(weights, ref_w, "weights", atol=atol, rtol=rtol,
                hint=f"check the split into heads (view then transpose), the scale 1/sqrt(head_dim) "
                f"with head_dim = {head_dim}, the softmax dimension and the mask (True = may attend)")
    check_close(out, ref_out, "out", atol=atol, rtol=rtol,
                hint="check the attention result of queries with no allowed key (zero), how heads "
                "are merged back (transpose then reshape) and the output projection o")
    gen = torch.Generator(device="cpu").manual_seed(0)
    proj = torch.randn(out.shape, generator=gen, dtype=x.dtype).to(x.device)
    check_backward_runs(lambda: (out * proj).sum())
    (ref_out * proj).sum().backward()
    check_grads_close({"x": x1}, {"x": x2.grad}, atol=atol, rtol=rtol)
    check_grads_close(params, {n: t.grad for n, t in ref_params.items()}, atol=atol, rtol=rtol)


def _call_with_mask(module: torch.nn.Module, x: Tensor, attn_mask: Tensor | None,
                    forbidden: Mapping[str, Any]) -> Any:
    """module(x, attn_mask) without delegation or mutation; a failure that only the mask causes is named."""
    import copy

    def call(inp: Tensor, mask: Tensor | None) -> Any:
        return check_not_mutated(module if mask is attn_mask else copy.deepcopy(module), inp, mask)

    try:
        return check_no_delegation(call, x, attn_mask, forbidden=forbidden, asked="MultiHeadAttention")
    except (AssertionError, RuntimeError) as exc:
        if attn_mask is None or "modified in place" in str(exc) or "which this exercise asks" in str(exc):
            raise
        try:
            with torch.no_grad():
                call(x.detach(), None)
        except Exception:  # noqa: BLE001 - it fails without the mask too: not a mask problem
            raise exc from None
        raise AssertionError(
            f"the layer fails with a mask of shape {_fmt_shape(attn_mask.shape)} but works without one: use "
            "the mask as it is, broadcast against the (B, n_head, L, S) scores -- no view, expand or reshape "
            "to a fixed shape, and reductions over the keys (.any(dim=-1)) with keepdim=True so that they "
            f"broadcast back. (The failure: {exc})"
        ) from None


def _explain_mha_weights(weights: Tensor, q: Tensor, k: Tensor, allowed: Tensor | None, ref_w: Tensor,
                         d_model: int, head_dim: int) -> None:
    """When the weights differ from the reference, name a known mistake they match exactly, if any."""
    w = weights.detach().to(ref_w.dtype)
    if torch.allclose(w, ref_w, atol=1e-9, rtol=1e-7):
        return
    raw = q @ k.transpose(-2, -1)
    n_head = q.shape[1]

    def soft(scale: float, dim: int = -1, mask: Tensor | None = allowed) -> Tensor:
        s = raw * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=dim)

    def zero_empty(t: Tensor, mask: Tensor | None) -> Tensor:
        return t if mask is None else t.masked_fill(~mask.any(-1, keepdim=True), 0.0)

    right = 1.0 / math.sqrt(head_dim)
    candidates = []
    for scale, desc in [(1.0 / math.sqrt(d_model), "1/sqrt(d_model)"),
                        (1.0 / math.sqrt(max(d_model // n_head, 1)), "1/sqrt(d_model // n_head)"), (1.0, "1 (no scale)")]:
        if abs(scale - right) > 1e-12:
            candidates.append((zero_empty(soft(scale), allowed),
                               f"the scores are scaled by {desc} = {scale:.4g}, but the scale is 1/sqrt(head_dim) = "
                               f"1/sqrt({head_dim}): each head's dot products have head_dim terms."))
    if allowed is not None:
        inverted = soft(right, mask=~allowed)
        candidates += [(inverted, None), (zero_empty(inverted, ~allowed), None),
                       (torch.nan_to_num(inverted, nan=0.0), None)]
        candidates = [(c, m or "the weights are those of the mask inverted: in this book True = may attend "
                       "(nn.MultiheadAttention's convention is the opposite) -- block the scores where the mask is "
                       "False (masked_fill(~attn_mask, -inf)).") for c, m in candidates]
        uniform = torch.where(allowed.any(-1, keepdim=True), ref_w, torch.full_like(ref_w, 1.0 / ref_w.shape[-1]))
        candidates.append((uniform, "queries whose keys are all masked get uniform weights instead of zeros: a finite "
                           "fill (such as -1e9 or finfo.min) instead of -inf, without zeroing those rows -- a query "
                           "with no allowed key must get zero weights and a zero attention result."))
        candidates.append((soft(right, mask=None), "the weights are those of attention without the mask: the mask "
                           "was ignored."))
    for cand, message in candidates:
        if cand.shape == w.shape and torch.allclose(w, cand, atol=1e-9, rtol=1e-7, equal_nan=True):
            raise AssertionError(message)


def check_builds(fn: Callable[..., Any], *args: Any, what: str = "the method", **kwargs: Any) -> Any:
    """Call a constructor-like ``fn`` (``from_torch``, ``to_torch``) and assert it leaves its
    arguments' modules and tensors unchanged; explain the autograd errors of copying weights."""
    mods = [a for a in args if isinstance(a, torch.nn.Module)]
    before = [{n: (t, t.detach().clone(), t._version) for n, t in m.state_dict(keep_vars=True).items()}
              for m in mods]
    try:
        result = fn(*args, **kwargs)
    except RuntimeError as exc:
        text = str(exc)
        first = text.strip().splitlines()[0][:160] if text.strip() else ""
        if "leaf Variable" in text or "requires grad" in text:
            raise AssertionError(
                f"{what} copied weights into parameters that require grad outside torch.no_grad(): "
                "copy_ (or any in-place write) into a parameter must run under `with torch.no_grad():`."
                f" (PyTorch said: {first})") from None
        if "meta" in text or "device" in text:
            raise AssertionError(
                f"{what} mixed devices: build the new module on the source's device (and dtype), for example "
                f"with .to(device=w.device, dtype=w.dtype), before copying the weights. (PyTorch said: {first})"
            ) from None
        for needle, diagnosis in _RUNTIME_DIAGNOSES:
            if needle in text:
                raise AssertionError(f"{diagnosis} (PyTorch said: {text.strip().splitlines()[0][:160]})") from None
        raise
    for m, snap in zip(mods, before):
        for n, (t, copy, version) in snap.items():
            same = t.device.type == "meta" or torch.equal(t.detach(), copy)
            if not same or t._version != version:
                raise AssertionError(f"{what} modified its argument's {n} in place: read the source "
                                     "module's weights, never write into them.")
    return result


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def check_parameters_are_copies(module: torch.nn.Module, source: torch.nn.Module,
                                what: str = "the new module") -> None:
    """Assert that ``module``'s parameters are its own leaf tensors, none sharing memory with ``source``.

    Slicing a parameter (``in_proj_weight[:E]``, ``chunk``, ``split``) gives a *view* of its memory;
    ``nn.Parameter(view)`` and ``layer.weight.data = view`` keep sharing it, so training one module
    would silently change the other.
    """
    theirs = {_storage(t): n for n, t in source.named_parameters() if t.device.type != "meta"}
    for n, p in module.named_parameters():
        if not p.is_leaf or not p.requires_grad:
            raise AssertionError(f"{what}'s {n} is not a trainable leaf parameter (is_leaf={p.is_leaf}, "
                                 f"requires_grad={p.requires_grad}): copy the values into the layers' "
                                 "own parameters, which stay trainable.")
        if p.device.type != "meta" and _storage(p) in theirs:
            raise AssertionError(
                f"{what}'s {n} shares memory with the source's {theirs[_storage(p)]}: a slice, chunk or "
                "split of a parameter is a view of its memory, and nn.Parameter(view) or .data = view "
                "keeps it -- training one module would change the other. Copy: layer.weight.copy_(w) "
                "under torch.no_grad(), or w.clone().")


def _packed_slices(mha: torch.nn.MultiheadAttention) -> dict[str, Tensor | None]:
    E = mha.embed_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    return {"q.weight": w[:E], "k.weight": w[E:2 * E], "v.weight": w[2 * E:], "o.weight": mha.out_proj.weight,
            "q.bias": None if b is None else b[:E], "k.bias": None if b is None else b[E:2 * E],
            "v.bias": None if b is None else b[2 * E:], "o.bias": mha.out_proj.bias}


def check_same_weights_as_torch(module: torch.nn.Module, mha: torch.nn.MultiheadAttention,
                                who: str = "from_torch(mha)") -> None:
    """Assert that ``module``'s q, k, v, o hold exactly ``mha``'s packed weights, same dtype and device.

    Names the usual unpacking mistakes: q, k, v in the wrong order, a transposed matrix, a missing
    or extra bias, the wrong number of heads, another dtype or device.
    """
    if not mha._qkv_same_embed_dim:
        raise ValueError("check_same_weights_as_torch needs a module with kdim = vdim = embed_dim")
    E, has_bias = mha.embed_dim, mha.in_proj_bias is not None
    _mha_layers(module, E, E, has_bias, f"{who} (embed_dim={E}, bias={has_bias})")
    want = _packed_slices(mha)
    for n, t in want.items():
        if t is None:
            continue
        layer, kind = getattr(module, n[0]), n.split(".")[1]
        mine = getattr(layer, kind)
        if (mine.dtype, mine.device) != (t.dtype, t.device):
            raise AssertionError(
                f"{who}'s {n} is {mine.dtype} on {mine.device}, but mha's weights are {t.dtype} on "
                f"{t.device}: build the module with the source's dtype and device (for example "
                ".to(mha.in_proj_weight)) -- copy_ into a float32 layer silently rounds float64 weights.")
        if t.device.type == "meta" or torch.equal(mine.detach(), t.detach()):
            continue
        same = [m for m, u in want.items() if u is not None and m.endswith(kind) and u.shape == mine.shape
                and torch.equal(mine.detach(), u.detach())]
        if same:
            raise AssertionError(
                f"{who}'s {n} holds mha's {same[0]} block: in_proj_weight is cat([W_q, W_k, W_v]) along "
                "dimension 0 (and in_proj_bias likewise) -- rows 0..E-1 are q, E..2E-1 k, 2E..3E-1 v; "
                "check the order of the blocks.")
        if kind == "weight" and mine.shape == t.T.shape and torch.equal(mine.detach(), t.detach().T):
            raise AssertionError(
                f"{who}'s {n} is the transpose of mha's: nn.Linear and nn.MultiheadAttention both store "
                "weights as (out_features, in_features), so copy them without transposing.")
        raise AssertionError(f"{who}'s {n} differs from mha's (by up to {_max_abs_diff(mine, t):.3g}): "
                             "copy every block of in_proj_weight/in_proj_bias and out_proj exactly.")


def check_matches_given_torch_mha(
    module: torch.nn.Module,
    mha: torch.nn.MultiheadAttention,
    x: Tensor,
    attn_mask: Tensor | None = None,
    *,
    who: str = "the module",
    atol: float = ATOL64,
    rtol: float = RTOL64,
) -> None:
    """Compare ``module(x, attn_mask)`` with the given ``nn.MultiheadAttention`` (its own weights).

    ``x`` is batch-first (B, L, E) for ``module``; it is transposed for ``mha`` when
    ``mha.batch_first`` is False. ``attn_mask`` follows the book (True = may attend) and every query
    must be allowed some key. Compares output, per-head weights and the gradients with respect to
    ``x`` and to every weight (the ``mha``'s packed gradients are unpacked for the comparison).
    """
    H = mha.num_heads
    module.zero_grad(set_to_none=True)
    mha.zero_grad(set_to_none=True)
    B, L, _ = x.shape
    x1 = x.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch_mask = None
    if attn_mask is not None:
        allowed = torch.broadcast_to(attn_mask.to(x.device), (B, H, L, L))
        if not bool(allowed.any(-1).all()):
            raise ValueError("check_matches_given_torch_mha: every query must be allowed some key")
        torch_mask = (~allowed).reshape(B * H, L, L)
    result = check_no_delegation(module, x1, attn_mask, forbidden=mha_delegates(), asked=who)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"{who} should return a pair (out, weights).")
    out, weights = result
    xin = x2 if mha.batch_first else x2.transpose(0, 1)
    ref_out, ref_w = mha(xin, xin, xin, attn_mask=torch_mask, need_weights=True, average_attn_weights=False)
    if not mha.batch_first:
        ref_out = ref_out.transpose(0, 1)
    check_shape(out, ref_out.shape, "out")
    check_shape(weights, ref_w.shape, "weights",
                hint=f"weights are per head, (batch, n_head, queries, keys), with the mha's num_heads = {H} "
                "heads (mha.head_dim is their width)")
    check_dtype(out, x.dtype, "out")
    check_finite(out, "out")
    check_close(weights, ref_w, "weights", atol=atol, rtol=rtol,
                hint=f"the module must use the mha's num_heads = {H} heads of width head_dim = "
                f"{mha.head_dim}, the scale 1/sqrt(head_dim) and the mask (True = may attend)")
    check_close(out, ref_out, "out", atol=atol, rtol=rtol,
                hint="check the value and output projections (v, o) and how heads are merged back")
    gen = torch.Generator(device="cpu").manual_seed(0)
    proj = torch.randn(out.shape, generator=gen, dtype=x.dtype).to(x.device)
    check_backward_runs(lambda: (out * proj).sum())
    (ref_out * proj).sum().backward()
    check_grads_close({"x": x1}, {"x": x2.grad}, atol=atol, rtol=rtol)
    E = mha.embed_dim
    g, gb = mha.in_proj_weight.grad, (None if mha.in_proj_bias is None else mha.in_proj_bias.grad)
    want = {"q.weight": g[:E], "k.weight": g[E:2 * E], "v.weight": g[2 * E:], "o.weight": mha.out_proj.weight.grad}
    if gb is not None:
        want.update({"q.bias": gb[:E], "k.bias": gb[E:2 * E], "v.bias": gb[2 * E:], "o.bias": mha.out_proj.bias.grad})
    mine = {n: getattr(getattr(module, n[0]), n.split(".")[1]) for n in want}
    check_grads_close(mine, want, atol=atol, rtol=rtol)


# --- cross_attention ---
# Checks for attention modules whose keys and values come from a context of its own width
# (``k, v: nn.Linear(d_context, d_model)``) and may be projected once and passed back in as ``kv``.
# Every comparison first checks the structure, then names the likely mistake by recomputing the
# reference with the common mistakes and seeing which one the learner's numbers match.

_SHAPE_NEEDLES = ("must match the size of tensor", "shapes cannot be multiplied", "is invalid for input of size",
                  "Expected size", "expanded size", "size mismatch", "The size of tensor")
_CROSS_SIGNATURE = "forward(x, context=None, attn_mask=None, *, kv=None)"


def _describe_call(x: Tensor, context: Tensor | None, kv: Any, attn_mask: Tensor | None) -> str:
    parts = [f"x {_fmt_shape(x.shape)}"]
    if context is not None:
        parts.append(f"context {_fmt_shape(context.shape)}")
    if kv is not None:
        shapes = [_fmt_shape(t.shape) for t in kv if isinstance(t, Tensor)] if isinstance(kv, (tuple, list)) else []
        parts.append("kv of shapes " + " and ".join(shapes) if shapes else "kv")
    if attn_mask is not None:
        parts.append(f"a mask {_fmt_shape(attn_mask.shape)}")
    return ", ".join(parts)


def call_cross_attention(module: Any, x: Tensor, context: Tensor | None = None,
                         attn_mask: Tensor | None = None, *, kv: Any = None, positional: bool = False,
                         forbidden: Mapping[str, Any] | None = None, asked: str = "module") -> tuple[Tensor, Any]:
    """Call a cross-attention module as the tests do and return its ``(out, weights)``.

    With ``context``: ``module(x, context)``, ``module(x, context, attn_mask=m)`` or, with
    ``positional=True``, ``module(x, context, m)``; with ``kv``: ``module(x, kv=kv)`` or
    ``module(x, attn_mask=m, kv=kv)``. An absent mask is not passed at all. ``forbidden`` is handed
    to :func:`check_no_delegation`. Shape errors are reported with the shapes of the call and who
    reads what; a wrong signature is reported with the signature the exercise asks for.
    """
    if kv is not None:
        form = "module(x, kv=kv)" if attn_mask is None else "module(x, attn_mask=mask, kv=kv)"
        args, kwargs = (x,), ({"kv": kv} if attn_mask is None else {"attn_mask": attn_mask, "kv": kv})
    elif attn_mask is None:
        form, args, kwargs = "module(x, context)", (x, context), {}
    elif positional:
        form, args, kwargs = "module(x, context, mask)", (x, context, attn_mask), {}
    else:
        form, args, kwargs = "module(x, context, attn_mask=mask)", (x, context), {"attn_mask": attn_mask}
    where = _describe_call(x, context, kv, attn_mask)
    named = [("x", x), ("context", context), ("attn_mask", attn_mask)]
    if isinstance(kv, (tuple, list)):
        named += [(f"kv[{i}]", t) for i, t in enumerate(kv)]
    before = [(n, t, t.detach().clone(), t._version) for n, t in named if isinstance(t, Tensor)]

    def run() -> Any:
        try:
            return module(*args, **kwargs)
        except TypeError as exc:
            if "argument" in str(exc):
                raise AssertionError(
                    f"the module could not be called as {form} ({exc}): keep the signature "
                    f"{_CROSS_SIGNATURE}, with kv keyword-only.") from None
            raise
        except ValueError as exc:
            if positional:
                raise AssertionError(
                    f"the call {form} raised ValueError ({exc}): the third positional argument is the mask -- "
                    f"keep the signature {_CROSS_SIGNATURE}, with kv keyword-only.") from None
            raise
        except RuntimeError as exc:
            text = str(exc)
            first = text.strip().splitlines()[0][:160] if text.strip() else ""
            if any(n in text for n in _SHAPE_NEEDLES):
                found = next((d for n, d in _RUNTIME_DIAGNOSES if n in text), "the shapes do not fit")
                mask = (" and the mask broadcast to (B, n_head, L, S) (a (B, S) key padding mask does not: "
                        "shape it (B, 1, 1, S))") if attn_mask is not None else ""
                raise AssertionError(
                    f"the call {form} failed for {where} (PyTorch said: {first}): the queries come from x "
                    "(q: d_model -> d_model), the keys and values from the context (k, v: d_context -> "
                    f"d_model), split into (B, n_head, S, d_head){mask}. In general: {found}.") from None
            raise

    if forbidden:
        result = check_no_delegation(run, forbidden=forbidden, asked=asked)
    else:
        result = _call_learner(run)
    for n, t, copy, version in before:
        changed = t.device.type != "meta" and not torch.equal(t.detach(), copy)
        if changed or t._version != version:
            raise AssertionError(
                f"{n} was modified in place by the call {form} (version {version} -> {t._version}): an "
                "in-place operation (masked_fill_, logical_not_, +=, ...) wrote into the caller's tensor "
                "or a view of it -- use the out-of-place form, which makes a new tensor.")
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"{form} should return a pair (out, weights) but returned {type(result).__name__}.")
    return result


def check_cross_layers(module: torch.nn.Module, d_model: int, d_context: int | None = None) -> None:
    """Assert the layout ``q, o: nn.Linear(d_model, d_model)``, ``k, v: nn.Linear(d_context, d_model)``.

    Biases are free (with or without). ``d_context=None`` means ``d_model``.
    """
    d_context = d_model if d_context is None else d_context
    check_linear(module, "q", d_model, d_model, why="the queries come from x, of width d_model.")
    for name in ("k", "v"):
        check_linear(module, name, d_context, d_model,
                     why=f"{name} reads the context, of width d_context = {d_context}, and maps it to d_model = "
                     f"{d_model} (d_context defaults to d_model).")
    check_linear(module, "o", d_model, d_model, why="the heads, merged back, have width d_model.")


def _split(t: Tensor, n_head: int) -> Tensor:
    return t.unflatten(-1, (n_head, -1)).transpose(-3, -2)


def _split_wrong(t: Tensor, n_head: int) -> Tensor:
    B, N, D = t.shape
    return t.reshape(B, n_head, N, D // n_head)


def _merge(t: Tensor) -> Tensor:
    return t.transpose(-3, -2).flatten(-2)


def _soft(q: Tensor, k: Tensor, allowed: Tensor | None, scale: float, dim: int = -1) -> Tensor:
    s = (q @ k.transpose(-2, -1)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(s, dim=dim), nan=0.0)


def _first_match(actual: Tensor, candidates: list[tuple[str, Callable[[], Tensor]]]) -> str | None:
    a = actual.detach().to(torch.float64)
    for message, make in candidates:
        try:
            c = make().detach().to(torch.float64)
        except (RuntimeError, ValueError):
            continue
        if c.shape == a.shape and torch.allclose(a, c, atol=1e-7, rtol=1e-6):
            return message
    return None


def _diagnose_weights(weights: Tensor, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None,
                      mask: Tensor | None, raw: Mapping[str, Tensor] | None = None) -> str:
    """Which common mistake gives these weights? ``q, k, v`` are the reference's heads."""
    d_head, S, n_head = q.shape[-1], k.shape[-2], q.shape[-3]
    scale = 1 / math.sqrt(d_head)
    shape = weights.shape
    cands: list[tuple[str, Callable[[], Tensor]]] = []
    if allowed is not None:
        cands += [
            ("the mask is inverted: in this book True means 'may attend' (nn.MultiheadAttention uses the "
             "opposite) -- fill the scores with -inf where the mask is False",
             lambda: _soft(q, k, ~allowed, scale)),
            ("the mask is ignored: fill the scores with -inf where attn_mask is False, before the softmax",
             lambda: _soft(q, k, None, scale)),
            ("the mask multiplies the scores: a blocked key gets the score 0, which still has weight -- "
             "fill the scores with -inf where the mask is False (masked_fill(~mask, -inf))",
             lambda: torch.softmax((q @ k.transpose(-2, -1)) * scale * allowed, dim=-1)),
        ]
        if not bool(allowed.any(-1).all()):
            cands.append(("queries whose every key is masked get uniform weights: a finite fill (-1e9, "
                          "finfo.min) leaves such rows a softmax over equal scores -- rows with no allowed "
                          "key must give zero weights (and a zero attention result)",
                          lambda: torch.softmax(((q @ k.transpose(-2, -1)) * scale).masked_fill(~allowed, -1e9),
                                                dim=-1)))
        if mask is not None and mask.dim() >= 2:
            cands.append(("the mask was applied along the wrong axis (transposed): the last axis of the "
                          "scores (B, n_head, L, S) is the keys, and the mask's last axis must be too",
                          lambda: _soft(q, k, torch.broadcast_to(mask.transpose(-2, -1).to(q.device), shape),
                                        scale)))
    cands += [
        ("the softmax is taken over the wrong dimension: each query's row of weights, over the keys "
         "(dim=-1), must sum to 1", lambda: _soft(q, k, allowed, scale, dim=-2)),
        ("the scale uses d_model: each head's scores must be divided by sqrt(d_head), with d_head = "
         "d_model // n_head", lambda: _soft(q, k, allowed, 1 / math.sqrt(d_head * n_head))),
        ("the scores are not scaled: divide them by sqrt(d_head)", lambda: _soft(q, k, allowed, 1.0)),
        ("the scale uses the number of keys S: divide the scores by sqrt(d_head), the size of one head",
         lambda: _soft(q, k, allowed, 1 / math.sqrt(S))),
        ("the scores are divided by d_head: divide them by sqrt(d_head)",
         lambda: _soft(q, k, allowed, 1 / d_head)),
        ("the keys and values are swapped (k and v, or the order of the pair kv = (k, v)): the keys "
         "come from the k layer, the values from the v layer", lambda: _soft(q, v, allowed, scale)),
    ]
    if raw is not None:
        cands += [
            ("the queries were split into heads without the transpose: view(B, L, n_head, d_head)"
             ".transpose(1, 2) -- view(B, n_head, L, d_head) mixes positions",
             lambda: _soft(_split_wrong(raw["q"], n_head), k, allowed, scale)),
            ("the keys were split into heads without the transpose: view(B, S, n_head, d_head)"
             ".transpose(1, 2) -- view(B, n_head, S, d_head) mixes positions",
             lambda: _soft(q, _split_wrong(raw["k"], n_head), allowed, scale)),
            ("the queries and keys were split into heads without the transpose: view(B, N, n_head, "
             "d_head).transpose(1, 2) -- view(B, n_head, N, d_head) mixes positions",
             lambda: _soft(_split_wrong(raw["q"], n_head), _split_wrong(raw["k"], n_head), allowed, scale)),
        ]
    found = _first_match(weights, cands)
    return found or ("check the split into heads (view then transpose), the scale 1/sqrt(d_head), the softmax "
                     "dimension (over the keys) and the mask (bool, True = may attend)")


def _diagnose_out(out: Tensor, w: Tensor, v: Tensor, o: Callable[[Tensor], Tensor],
                  raw: Mapping[str, Tensor] | None = None) -> str:
    """Which common mistake gives this output, the weights being right?"""
    B, H, L, _ = w.shape
    cands: list[tuple[str, Callable[[], Tensor]]] = [
        ("the heads were merged back without the transpose: (B, n_head, L, d_head) -> transpose(1, 2) -> "
         "reshape(B, L, d_model)", lambda: o((w @ v).reshape(B, L, -1))),
        ("the output projection o is not applied", lambda: _merge(w @ v)),
    ]
    if raw is not None:
        cands += [
            ("the values were split into heads without the transpose (the weights are right): view(B, S, "
             "n_head, d_head).transpose(1, 2)", lambda: o(_merge(w @ _split_wrong(raw["v"], H)))),
            ("the values were computed with the k layer: the values come from v",
             lambda: o(_merge(w @ _split(raw["k"], H)))),
        ]
    found = _first_match(out, cands)
    return found or ("the weights are right but the output is not: check the values' split into heads, the merge "
                     "(transpose then reshape) and the output projection o")


def _check_nan_rows(weights: Tensor, allowed: Tensor | None) -> None:
    """NaN rows where the mask allows every key mean the mask was read the other way round."""
    if allowed is None or tuple(weights.shape) != tuple(allowed.shape):
        return
    nan_rows = torch.isnan(weights.detach()).any(-1)
    if not bool(nan_rows.any()):
        return
    if bool(allowed[nan_rows].all(-1).all()):
        raise AssertionError(
            f"weights are NaN in {int(nan_rows.sum())} row(s) whose queries may attend every key: the mask is "
            "inverted -- in this book True means 'may attend' (nn.MultiheadAttention uses the opposite), so "
            "fill the scores with -inf where the mask is False.")
    if bool(allowed[nan_rows].any(-1).all()):
        raise AssertionError(
            f"weights are NaN in {int(nan_rows.sum())} row(s) whose queries may attend some keys (True = may "
            "attend): the mask was read the wrong way or on the wrong axis -- block the keys where it is False.")


def _ref_mha(module: torch.nn.Module, n_head: int, d_model: int, d_context: int, dtype: torch.dtype,
             device: torch.device) -> torch.nn.MultiheadAttention:
    ref = torch.nn.MultiheadAttention(d_model, n_head, kdim=d_context, vdim=d_context, batch_first=True,
                                      dtype=dtype, device=device)
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            ref.in_proj_weight.copy_(torch.cat([module.q.weight, module.k.weight, module.v.weight]))
        else:
            ref.q_proj_weight.copy_(module.q.weight)
            ref.k_proj_weight.copy_(module.k.weight)
            ref.v_proj_weight.copy_(module.v.weight)
        ref.in_proj_bias.copy_(torch.cat([_bias(module.q), _bias(module.k), _bias(module.v)]))
        ref.out_proj.weight.copy_(module.o.weight)
        ref.out_proj.bias.copy_(_bias(module.o))
    return ref


def _ref_weight_grads(ref: torch.nn.MultiheadAttention, d: int) -> dict[str, Tensor | None]:
    if ref._qkv_same_embed_dim:
        g = ref.in_proj_weight.grad
        wq, wk, wv = g[:d], g[d:2 * d], g[2 * d:]
    else:
        wq, wk, wv = ref.q_proj_weight.grad, ref.k_proj_weight.grad, ref.v_proj_weight.grad
    gb = ref.in_proj_bias.grad
    return {"q.weight": wq, "k.weight": wk, "v.weight": wv, "o.weight": ref.out_proj.weight.grad,
            "q.bias": gb[:d], "k.bias": gb[d:2 * d], "v.bias": gb[2 * d:], "o.bias": ref.out_proj.bias.grad}


def check_matches_torch_cross_attention(
    module: torch.nn.Module,
    n_head: int,
    x: Tensor,
    context: Tensor,
    attn_mask: Tensor | None = None,
    *,
    use_kv: bool = False,
    forbidden: Mapping[str, Any] | None = None,
    asked: str = "module",
    atol: float = ATOL64,
    rtol: float = RTOL64,
) -> None:
    """Compare a cross-attention module with ``nn.MultiheadAttention(d_model, n_head, kdim=d_context,
    vdim=d_context, batch_first=True)`` holding the same weights (zeros for missing biases).

    The module is called as ``module(x, context[, attn_mask=m])`` or, with ``use_kv=True``, as
    ``module(x[, attn_mask=m], kv=module.project_context(context))``. The mask is boolean, True = may
    attend, broadcastable to (B, n_head, L, S); query rows that may attend no key are compared with
    zero weights and a zero attention result. Checks the layers first, then the output, the per-head
    weights and the gradients with respect to x, the context and every weight and bias, and names the
    likely mistake when they differ.
    """
    d, dc = x.shape[-1], context.shape[-1]
    check_cross_layers(module, d, dc)
    dtype, device = x.dtype, x.device
    module.zero_grad(set_to_none=True)
    ref = _ref_mha(module, n_head, d, dc, dtype, device)
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    c1, c2 = context.detach().clone().requires_grad_(), context.detach().clone().requires_grad_()
    if use_kv:
        kv = check_project_context(module, n_head, c1, forbidden=forbidden, asked=asked, compare=False)
        out, weights = call_cross_attention(module, x1, attn_mask=attn_mask, kv=kv, forbidden=forbidden, asked=asked)
    else:
        out, weights = call_cross_attention(module, x1, c1, attn_mask, forbidden=forbidden, asked=asked)
    B, L, S = x.shape[0], x.shape[1], context.shape[1]
    allowed = None if attn_mask is None else torch.broadcast_to(attn_mask.to(device), (B, n_head, L, S))
    if allowed is None or bool(allowed.any(-1).all()):
        mha_mask = None if allowed is None else (~allowed).reshape(B * n_head, L, S)
        ref_out, ref_w = ref(x2, c2, c2, attn_mask=mha_mask, need_weights=True, average_attn_weights=False)
    else:
        ref_out, ref_w = None, None
    # the reference's heads, recomputed from its own weights, for the zeroing case and the diagnoses
    if ref._qkv_same_embed_dim:
        wq, wk, wv = ref.in_proj_weight.split(d)
    else:
        wq, wk, wv = ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight
    bq, bk, bv = ref.in_proj_bias.split(d)
    if ref_out is None:
        rq, rk, rv = F.linear(x2, wq, bq), F.linear(c2, wk, bk), F.linear(c2, wv, bv)
        attn, ref_w = sdpa_reference(_split(rq, n_head), _split(rk, n_head), _split(rv, n_head), allowed)
        ref_out = ref.out_proj(_merge(attn))
    with torch.no_grad():
        raw = {"q": F.linear(x2, wq, bq), "k": F.linear(c2, wk, bk), "v": F.linear(c2, wv, bv)}
        qh, kh, vh = (_split(raw[n], n_head) for n in "qkv")
    check_shape(out, ref_out.shape, "out", hint="one output row per query (x), of width d_model")
    if isinstance(weights, Tensor) and tuple(weights.shape) == (B, L, S) and n_head > 1:
        raise AssertionError(f"weights have shape {_fmt_shape(weights.shape)}: they were averaged over the heads "
                             f"-- return them per head, ({B}, {n_head}, {L}, {S}).")
    check_shape(weights, ref_w.shape, "weights", hint="weights are per head: (B, n_head, L, S), S keys from the context")
    check_dtype(out, dtype, "out")
    _check_nan_rows(weights, allowed)
    check_finite(weights, "weights")
    check_finite(out, "out")
    if not torch.allclose(weights.detach(), ref_w.detach(), atol=atol, rtol=rtol):
        raise AssertionError(f"weights differ from the reference by up to {_max_abs_diff(weights, ref_w):.3g}: "
                             + _diagnose_weights(weights, qh, kh, vh, allowed, attn_mask, raw) + ".")
    if not torch.allclose(out.detach(), ref_out.detach(), atol=atol, rtol=rtol):
        with torch.no_grad():
            msg = _diagnose_out(out, ref_w.detach(), vh, ref.out_proj, raw)
        raise AssertionError(f"out differs from the reference by up to {_max_abs_diff(out, ref_out):.3g}: {msg}.")
    gen = torch.Generator(device="cpu").manual_seed(0)
    proj = torch.randn(out.shape, generator=gen, dtype=dtype).to(device)
    check_backward_runs(lambda: (out * proj).sum())
    (ref_out * proj).sum().backward()
    check_grads_close({"x": x1, "context": c1}, {"x": x2.grad, "context": c2.grad}, atol=atol, rtol=rtol)
    want = _ref_weight_grads(ref, d)
    mine = {}
    for name in "qkvo":
        layer = getattr(module, name)
        mine[f"{name}.weight"] = layer.weight
        if layer.bias is not None:
            mine[f"{name}.bias"] = layer.bias
    check_grads_close(mine, {n: want[n] for n in mine}, atol=atol, rtol=rtol)


def check_project_context(module: torch.nn.Module, n_head: int, context: Tensor, *,
                          forbidden: Mapping[str, Any] | None = None, asked: str = "module",
                          compare: bool = True) -> tuple[Tensor, Tensor]:
    """Call ``module.project_context(context)`` and check that it returns the pair ``(k, v)``, the
    context's keys and values split into heads, each ``(B, n_head, S, d_head)``. Returns the pair.

    ``compare=False`` checks only the form (a pair of tensors of the right shape).
    """
    fn = getattr(module, "project_context", None)
    if not callable(fn):
        raise AssertionError("the module has no method project_context(context) -> (k, v): write it, so that "
                             "the keys and values of a context can be computed once and reused.")
    B, S = context.shape[0], context.shape[1]
    d_model = module.k.out_features if isinstance(getattr(module, "k", None), torch.nn.Linear) else None
    if forbidden:
        kv = check_no_delegation(fn, context, forbidden=forbidden, asked=asked)
    else:
        kv = _call_learner(fn, context)
    if not (isinstance(kv, (tuple, list)) and len(kv) == 2):
        raise AssertionError(f"project_context should return a pair (k, v) but returned {type(kv).__name__}.")
    k, v = kv
    want = (B, n_head, S, (d_model or 0) // n_head)
    for name, t in (("k", k), ("v", v)):
        hint = "the heads split: (B, n_head, S, d_head), as the queries are split in forward"
        if isinstance(t, Tensor) and tuple(t.shape) == (B, S, d_model):
            hint = "the keys and values must come back already split into heads, (B, n_head, S, d_head)"
        check_shape(t, want, f"project_context(context)[{'0' if name == 'k' else '1'}] ({name})", hint=hint)
    if compare and context.device.type != "meta":
        with torch.no_grad():
            rk = F.linear(context, module.k.weight, module.k.bias)
            rv = F.linear(context, module.v.weight, module.v.bias)
        for name, t, raw, other in (("k", k, rk, rv), ("v", v, rv, rk)):
            if torch.allclose(t.detach(), _split(raw, n_head), atol=ATOL64, rtol=RTOL64):
                continue
            if torch.allclose(t.detach(), _split(other, n_head), atol=ATOL64, rtol=RTOL64):
                why = "k and v are swapped: return (k, v), k from the k layer and v from the v layer"
            elif torch.allclose(t.detach(), _split_wrong(raw, n_head), atol=ATOL64, rtol=RTOL64):
                why = ("split into heads without the transpose: view(B, S, n_head, d_head).transpose(1, 2) "
                       "-- view(B, n_head, S, d_head) mixes positions")
            else:
                why = f"it should be self.{name}(context) split into heads, head h taking columns h*d_head ... (h+1)*d_head - 1"
            raise AssertionError(f"project_context(context) returns a wrong {name}, off by up to "
                                 f"{_max_abs_diff(t, _split(raw, n_head)):.3g}: {why}.")
        if context.requires_grad and not (k.requires_grad and v.requires_grad):
            raise AssertionError("the k and v that project_context returns do not require grad: they were cut out of "
                                 "the graph (torch.no_grad(), .detach()) -- computing them once is no reason to "
                                 "stop the gradient, the encoder learns through them.")
    return k, v


def check_layers_not_called(module: torch.nn.Module, names: Sequence[str], fn: Callable[[], Any],
                            why: str = "") -> Any:
    """Call ``fn()`` and assert that none of ``module.<name>`` ran (counted with forward hooks)."""
    calls: dict[str, int] = {n: 0 for n in names}
    hooks = []
    for n in names:
        layer = getattr(module, n)
        hooks.append(layer.register_forward_hook(lambda mod, args, out, n=n: calls.__setitem__(n, calls[n] + 1)))
    try:
        result = fn()
    finally:
        for h in hooks:
            h.remove()
    ran = {n: c for n, c in calls.items() if c}
    if ran:
        listed = ", ".join(f"self.{n} {c} time(s)" for n, c in ran.items())
        raise AssertionError(f"the call ran {listed}" + (f": {why}" if why else "."))
    return result


def check_reused_instance(module: torch.nn.Module, cases: Sequence[tuple[Any, ...]],
                          check: Callable[..., None]) -> None:
    """Run ``check(module, *case)`` for every case on ONE module instance.

    When call i > 0 fails where a fresh copy of the module passes the same case, the module keeps
    state from an earlier call (cached keys and values, a size, a mask), and the message says so.
    """
    import copy

    fresh = copy.deepcopy(module)
    for i, case in enumerate(cases):
        try:
            check(module, *case)
        except AssertionError as exc:
            if i == 0:
                raise
            try:
                check(copy.deepcopy(fresh), *case)
            except AssertionError:
                raise exc from None
            sizes = ", ".join(_fmt_shape(c.shape) for c in case if isinstance(c, Tensor))
            raise AssertionError(
                f"the same module instance fails at call {i + 1} (inputs {sizes}) although a fresh instance "
                "passes it: the module keeps state across calls (keys and values, a size or a mask cached "
                f"at an earlier call) -- compute everything from the current inputs. (The failure: {exc})"
            ) from None


# --- causal_masking ---

def check_bool_mask(got: Any, expected: Tensor, name: str = "mask",
                    mistakes: Sequence[tuple[Tensor, str]] = ()) -> None:
    """Assert that ``got`` is a boolean mask equal to ``expected`` (True = may attend).

    ``mistakes`` are ``(wrong_mask, why)`` pairs: when ``got`` equals one of them, the message is
    its ``why``, naming the mistake that produces exactly that mask.
    """
    check_shape(got, expected.shape, name)
    if got.dtype != torch.bool:
        raise AssertionError(f"{name} has dtype {got.dtype}: it must be a boolean mask (dtype=torch.bool, "
                             "True = may attend).")
    if got.device.type == "meta" or expected.device.type == "meta":
        return
    got_c, exp_c = got.detach().cpu(), expected.detach().cpu()
    if torch.equal(got_c, exp_c):
        return
    why = next((w for m, w in mistakes if torch.equal(got_c, m.cpu())), None)
    if why is None and torch.equal(got_c, ~exp_c):
        why = ("the mask is inverted: True must mean 'may attend' (the convention of "
               "F.scaled_dot_product_attention, not of nn.MultiheadAttention)")
    show = "" if exp_c.numel() > 64 else f" Expected\n{exp_c.int()}\nbut got\n{got_c.int()}"
    raise AssertionError(f"{name} is wrong: {why or 'see the rule in the exercise'}.{show}")


def causal_attention_reference(module: torch.nn.Module, n_head: int, x: Tensor,
                               attn_mask: Tensor | None = None,
                               past_kv: tuple[Tensor, Tensor] | None = None,
                               ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Causal multi-head self-attention computed from ``module``'s own ``q, k, v, o`` layers.

    ``x`` (B, L, d_model); ``past_kv`` the cached keys and values (B, H, S_past, d_head), put
    before the new ones; the causal mask is aligned at the bottom right (query i is position
    i + S - L) and ANDed with ``attn_mask`` (True = may attend, broadcastable to (B, H, L, S)).
    The output comes from ``F.scaled_dot_product_attention`` with that explicit mask; rows that may
    attend no key give zero weights and a zero attention result. Returns
    ``(out, weights (B, H, L, S), (k, v) (B, H, S, d_head))``.
    """
    B, L, d_model = x.shape
    d_head = d_model // n_head
    for name in ("q", "k", "v", "o"):
        check_linear(module, name, d_model, d_model, why="every projection keeps d_model.")

    def split(t: Tensor) -> Tensor:
        return t.unflatten(-1, (n_head, d_head)).transpose(1, 2)

    q, k, v = split(module.q(x)), split(module.k(x)), split(module.v(x))
    if past_kv is not None:
        k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
    S = k.shape[2]
    allowed = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L)
    if attn_mask is not None:
        allowed = allowed & attn_mask.to(x.device)
    allowed = torch.broadcast_to(allowed, (B, n_head, L, S))
    attn, w = sdpa_reference(q, k, v, allowed)
    attn = attn.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return module.o(attn.transpose(1, 2).reshape(B, L, d_model)), w, (k, v)


def _step_mask(attn_mask: Tensor | None, L: int, a: int, b: int) -> Tensor | None:
    """The rows a..b-1 and columns 0..b-1 of a mask broadcastable to (..., L, L)."""
    if attn_mask is None:
        return None
    full = torch.broadcast_to(attn_mask, (*attn_mask.shape[:-2], L, L)) if attn_mask.dim() >= 2 \
        else torch.broadcast_to(attn_mask, (L, L))
    return full[..., a:b, :b]


def check_cache_matches_full(module: torch.nn.Module, x: Tensor, chunks: Sequence[int],
                             attn_mask: Tensor | None = None, n_head: int | None = None,
                             atol: float = ATOL64, rtol: float = RTOL64) -> None:
    """Assert that decoding ``x`` chunk by chunk with a KV cache gives the full causal pass.

    ``module(x, attn_mask)`` returns ``(out, weights)``; ``module(x_chunk, mask_chunk,
    past_kv=past, use_cache=True)`` returns ``(out, weights, present_kv)`` with ``present_kv = (k, v)``
    of shape (B, H, S, d_head), the cached keys and values followed by the chunk's. ``chunks`` are the
    chunk lengths (the first one is the prompt) and must sum to L; ``attn_mask`` is broadcastable to
    (..., L, L) and is sliced to each chunk's rows and to the keys seen so far. Every chunk's output
    and weights must equal the full pass's rows; the messages name the usual cache mistakes.
    """
    B, L, _ = x.shape
    if sum(chunks) != L:
        raise ValueError("check_cache_matches_full: the chunks must add up to L")
    x = x.detach()
    with torch.no_grad():
        full = _call_learner(module, x, attn_mask)
        if not (isinstance(full, tuple) and len(full) == 2):
            raise AssertionError("without use_cache the module must return a pair (out, weights).")
        full_out, full_w = full
        H = full_w.shape[1] if n_head is None else n_head
        past, a = None, 0
        for c in chunks:
            b = a + c
            where = (f"the chunk of {c} token(s) at positions {a}..{b - 1} (L = {c} queries over S = {b} "
                     f"keys, {a} of them cached)")
            versions = None if past is None else [t._version for t in past]
            try:
                res = _call_learner(module, x[:, a:b], _step_mask(attn_mask, L, a, b), past_kv=past,
                                    use_cache=True)
            except AssertionError as exc:
                extra = ""
                if "broadcast" in str(exc) and a > 0:
                    extra = (" -- with past_kv the scores are (B, H, L, S_past + L): the causal mask must be "
                             "(L, S) with S counting the cached keys too, causal_mask(L, S)")
                raise AssertionError(f"{where} failed: {exc}{extra}") from None
            if past is not None and [t._version for t in past] != versions:
                raise AssertionError(f"{where}: past_kv was modified in place by the call; concatenate "
                                     "into a new tensor (torch.cat) instead of writing into the cache.")
            if not (isinstance(res, tuple) and len(res) == 3):
                raise AssertionError(
                    f"with use_cache=True the module must return a triple (out, weights, present_kv), "
                    f"but it returned {type(res).__name__}"
                    + (f" of length {len(res)}" if isinstance(res, tuple) else "") + ".")
            out, w, present = res
            if not (isinstance(present, tuple) and len(present) == 2
                    and all(isinstance(t, Tensor) for t in present)):
                raise AssertionError("present_kv must be a pair of tensors (k, v).")
            d_head = full_out.shape[-1] // H
            for nm, t in zip(("present_kv[0] (keys)", "present_kv[1] (values)"), present):
                hint = ("present_kv holds the keys and values of ALL tokens so far, the cached ones followed "
                        "by the new ones: torch.cat([past_k, k], dim=2), shaped (B, n_head, S_past + L, d_head)")
                if t.dim() == 4 and t.shape[2] == c and b != c:
                    hint = "it holds only the new tokens: " + hint
                check_shape(t, (B, H, b, d_head), f"{nm} after {where}", hint=hint)
            if past is not None:
                for i, (nm, t, p) in enumerate(zip(("keys", "values"), present, past)):
                    if torch.equal(t[:, :, :a], p):
                        continue
                    if torch.equal(t[:, :, c:], p):
                        raise AssertionError(
                            f"present_kv's {nm} after {where} put the new tokens BEFORE the cached ones: the "
                            "order must be the positions' order, torch.cat([past, new], dim=2).")
                    raise AssertionError(f"present_kv's {nm} after {where} do not start with the cached "
                                         "ones unchanged: torch.cat([past, new], dim=2).")
            check_shape(w, (B, H, c, b), f"weights of {where}",
                        hint="with a cache the weights are (B, n_head, L, S), one column per cached or new key")
            check_finite(out, f"out of {where}")
            check_finite(w, f"weights of {where}")
            want_w = full_w[:, :, a:b, :b]
            allowed = torch.ones(c, b, dtype=torch.bool, device=x.device).tril(b - c)
            top_left = torch.ones(c, b, dtype=torch.bool, device=x.device).tril()
            nz = w != 0
            if a > 0 and bool((nz & ~allowed).any()):
                raise AssertionError(f"the weights of {where} are non-zero on keys after the query's own "
                                     "position: the causal mask must be aligned at the bottom right (query i is "
                                     "position i + S - L and may attend key j iff j <= i + S - L).")
            if a > 0 and not torch.equal(want_w != 0, nz) and bool((nz & ~top_left).sum() == 0) \
                    and bool(((want_w != 0) & ~top_left).any()):
                raise AssertionError(
                    f"the weights of {where} are zero on cached keys the queries may attend: the causal "
                    "mask is aligned top-left (is_causal=True, or tril() of the (L, S) rectangle, or a square "
                    "buffer sliced [:L, :S]), which treats the new queries as the FIRST positions. Align it "
                    "bottom-right: query i may attend key j iff j <= i + S - L, causal_mask(L, S).")
            if bool((nz & (want_w == 0) & allowed).any()):
                raise AssertionError(
                    f"the weights of {where} are non-zero on keys that attn_mask forbids (the full pass gives "
                    "them 0): apply attn_mask on every path, with a cache too, combined with the causal mask by AND.")
            check_close(w, want_w, f"weights of {where}", atol=atol, rtol=rtol,
                        hint="they must equal the full causal pass's rows for these queries: check the bottom-"
                        "right mask over all S keys and the order of the cached and new keys")
            check_close(out, full_out[:, a:b], f"out of {where}", atol=atol, rtol=rtol,
                        hint="the weights are right but the output is not: the values must be the cached ones "
                        "followed by the new ones, and an output from F.scaled_dot_product_attention needs the "
                        "same explicit mask (is_causal=True aligns it top-left, wrong with a cache)")
            past, a = present, b


#: The causal-masking exercise's name for the same check.
check_state_free = check_reused_instance


def _runs(ids: Tensor) -> list[tuple[int, int]]:
    """The (start, end) of each run of equal consecutive values of a 1-D tensor."""
    cuts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    return list(zip(cuts[:-1], cuts[1:]))


def check_packed_matches_separate(fn: Callable[..., Any], x: Tensor, doc_ids: Tensor, attn_mask: Tensor,
                                  extra_mask: Callable[[int], Tensor] | None = None,
                                  atol: float = ATOL64, rtol: float = RTOL64) -> None:
    """Assert that attention over packed documents equals attention over each document alone.

    ``fn(x, attn_mask)`` returns ``(out, weights (B, H, L, L))``; ``doc_ids`` (L,) or (B, L) gives each
    token's document (documents are runs of equal ids) and ``attn_mask`` is the mask that packs them.
    Each document is also run alone, ``fn(x[b:b+1, s:e], extra_mask(e - s))`` (``extra_mask`` default:
    none), and its outputs and weights must be the packed row's, with zero weight on other documents.
    """
    B, L, _ = x.shape
    ids = torch.broadcast_to(doc_ids, (B, L)).cpu()
    with torch.no_grad():
        out, w = _call_learner(fn, x, attn_mask)
        for b in range(B):
            for s, e in _runs(ids[b]):
                name = f"document {int(ids[b, s])} of row {b} (positions {s}..{e - 1})"
                others = torch.ones(L, dtype=torch.bool)
                others[s:e] = False
                leak = w[b, :, s:e][..., others.to(w.device)]
                if leak.numel() and bool((leak != 0).any()):
                    raise AssertionError(
                        f"the queries of {name} give weight (up to {float(leak.abs().max()):.3g}) to tokens of "
                        "other documents: the packed row's mask must allow only earlier tokens of the same "
                        "document (document_causal_mask), ANDed with the causal mask.")
                alone_out, alone_w = _call_learner(fn, x[b:b + 1, s:e],
                                                   None if extra_mask is None else extra_mask(e - s))
                check_close(w[b, :, s:e, s:e], alone_w[0], f"weights of {name}", atol=atol, rtol=rtol,
                            hint="they must equal the weights of the document run on its own")
                check_close(out[b, s:e], alone_out[0], f"out of {name}", atol=atol, rtol=rtol,
                            hint="packing must not change a document's outputs")


# --- self_attention ---
# Checks for the general attention function (bool and float masks, scale=, need_weights=False,
# queries with no allowed key) and for answers that must be the learner's own code.

def sdpa_delegates() -> dict[str, Any]:
    """The ready-made attention pieces that an exercise asking for attention itself refuses.

    For :func:`check_no_delegation`: the library's attention core (``handson.nn.attention``,
    ``handson.nn.MultiHeadAttention``), the chapters' attention functions and modules, and
    PyTorch's ``nn.MultiheadAttention`` and ``F.multi_head_attention_forward``.
    ``F.scaled_dot_product_attention`` is not in it.
    """
    import handson.nn as lib
    from handson.nn import multi_head_attention as mha_chapter
    from handson.nn import self_attention as chapter

    return {"handson.nn.attention": lib.attention, "handson.nn.MultiHeadAttention": lib.MultiHeadAttention,
            "the chapter's scaled_dot_product_attention (handson.nn.self_attention)":
                chapter.scaled_dot_product_attention,
            "the chapter's SelfAttention (handson.nn.self_attention)": chapter.SelfAttention,
            "handson.nn.multi_head_attention.attention": mha_chapter.attention,
            "nn.MultiheadAttention": torch.nn.MultiheadAttention.forward,
            "F.multi_head_attention_forward": F.multi_head_attention_forward}


#: Python errors of attention code (not RuntimeErrors) and what they usually mean.
_PYTHON_ERROR_DIAGNOSES = [
    (IndexError, "Dimension out of range", "a dimension index is out of range for this input: the code "
     "assumes a fixed number of dimensions -- count from the end (k.transpose(-2, -1), q.size(-1)) "
     "so that any number of batch dimensions works"),
    (TypeError, "operator.invert", "~ was applied to a float mask: only a boolean attn_mask is inverted "
     "(True = may attend); a float attn_mask is added to the scaled scores -- check attn_mask.dtype"),
]


def without_delegation(fn: Callable[..., Any], forbidden: Mapping[str, Any] | None = None,
                       asked: str = "answer") -> Callable[..., Any]:
    """``fn`` wrapped so that every call goes through :func:`check_no_delegation`.

    ``forbidden`` defaults to :func:`sdpa_delegates`. The wrapper also explains the Python errors
    (IndexError, TypeError) that attention code typically raises; other exceptions pass through.
    """
    refused = sdpa_delegates() if forbidden is None else forbidden

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return check_no_delegation(fn, *args, forbidden=refused, asked=asked, **kwargs)
        except (IndexError, TypeError) as exc:
            text = str(exc)
            for kind, needle, diagnosis in _PYTHON_ERROR_DIAGNOSES:
                if isinstance(exc, kind) and needle in text:
                    first = text.strip().splitlines()[0][:160]
                    raise AssertionError(f"{diagnosis} (Python said: {first})") from None
            raise

    return guarded


def check_mask_convention(weights: Any, allowed: Tensor, name: str = "weights") -> None:
    """Assert that weights computed with the boolean mask ``allowed`` are exactly 0 where it is False.

    Use a mask in which every query may attend some key and is refused some other key; then an
    inverted mask, an ignored mask and a finite fill are told apart.
    """
    check_shape(weights, weights.shape if isinstance(weights, Tensor) else (), name)
    check_finite(weights, name)
    allowed = torch.broadcast_to(allowed.to(weights.device), weights.shape)
    w = weights.detach()
    leaked = w[~allowed]
    if leaked.numel() == 0 or bool((leaked == 0).all()):
        return
    top = float(leaked.abs().max())
    if bool((w[allowed] == 0).all()):
        raise AssertionError(
            f"{name} are zero exactly where the mask is True and non-zero where it is False: the mask "
            "is inverted. In this book, as in F.scaled_dot_product_attention, True means 'may attend' "
            "(nn.MultiheadAttention uses the opposite convention).")
    if top < 1e-3:
        raise AssertionError(
            f"{name} give tiny non-zero weights (up to {top:.1e}) to positions the mask forbids: the "
            "blocked scores were filled with a finite value (such as -1e4) -- fill them with -inf so "
            "that their weight is exactly 0.")
    raise AssertionError(
        f"{name} give weight up to {top:.3g} to positions the mask forbids (False): the mask was "
        "ignored, or multiplied into the scores (a blocked score of 0 still gets weight) -- set the "
        "blocked scores to -inf before the softmax (True = may attend).")


def check_fully_masked_rows(out: Any, weights: Any, allowed: Tensor) -> None:
    """Assert that every query that may attend no key (a row of ``allowed`` all False) gets zero
    weights and a zero output, with no NaN. ``allowed`` is boolean, broadcastable to the weights."""
    check_shape(weights, weights.shape if isinstance(weights, Tensor) else (), "weights")
    check_shape(out, out.shape if isinstance(out, Tensor) else (), "out")
    allowed = torch.broadcast_to(allowed.to(weights.device), weights.shape)
    empty = ~allowed.any(-1)
    if not bool(empty.any()):
        raise ValueError("check_fully_masked_rows needs a mask with a query that may attend no key")
    idx = tuple(int(i) for i in empty.nonzero()[0])
    w, o = weights.detach()[empty], out.detach()[torch.broadcast_to(empty, out.shape[:-1])]
    if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(o).all())):
        raise AssertionError(
            f"query {idx} may attend no key, and its weights or output hold NaN: the softmax of a row "
            "that is all -inf is 0/0 = NaN. Such a query must get zero weights and a zero output (as "
            "F.scaled_dot_product_attention gives): make its scores finite before the softmax and zero "
            "its weights after.")
    if bool((w != 0).any()):
        total = float(weights.detach()[idx].sum())
        raise AssertionError(
            f"query {idx} may attend no key, but its weights sum to {total:.3g}: a finite fill (-1e9, "
            "torch.finfo(dtype).min) turns such a row into a uniform average of the values. Zero the "
            "weights of every query with no allowed key.")
    if bool((o != 0).any()):
        raise AssertionError(
            f"query {idx} may attend no key and has zero weights, but its output is not zero: the "
            "output must be weights @ v.")


def check_backward_finite(loss_fn: Callable[[], Tensor], inputs: Mapping[str, Tensor]) -> None:
    """Run ``loss_fn().backward()`` with anomaly detection and assert every input got a finite grad.

    Anomaly detection checks the output of every node of the backward pass for NaN, so a NaN that is
    zeroed later in the forward (a NaN softmax row filled with 0 afterwards) is found: its gradient
    may come out finite by luck, but the graph is not sound.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly(check_nan=True):
                check_backward_runs(loss_fn)
    except RuntimeError as exc:
        text = str(exc)
        if "returned nan values" in text:
            first = text.strip().splitlines()[0][:160]
            raise AssertionError(
                f"backward produced NaN (anomaly detection: {first}): the softmax of a fully masked "
                "row (all -inf) is NaN, and zeroing it after the softmax (masked_fill, nan_to_num, "
                "where) leaves that NaN in the graph. Give such rows finite scores before the softmax "
                "(for example fill them with 0), then zero their weights.") from None
        raise
    check_grads_present(inputs)


def check_not_materialised(fn: Callable[..., Any], *args: Any, scores_shape: Sequence[int],
                           **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` and assert that no floating-point tensor of the scores' shape is
    created: one ending in ``(L, S)`` with at least as many elements as ``scores_shape``.

    Every tensor that a torch function or Tensor method returns during the call is recorded (a
    ``TorchFunctionMode``: cheap, and it sees ``F.scaled_dot_product_attention`` as one call, whatever
    its kernel does inside); a view of an argument is not new memory and does not count. Run it on
    CPU tensors. Returns ``fn``'s result.
    """
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten

    L, S = int(scores_shape[-2]), int(scores_shape[-1])
    numel = math.prod(int(s) for s in scores_shape)
    found: list[tuple[tuple[int, ...], str]] = []

    class _Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not found:
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, Tensor)}
                for t in tree_flatten(out)[0]:
                    if (isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 2
                            and tuple(t.shape[-2:]) == (L, S) and t.numel() >= numel
                            and t.untyped_storage().data_ptr() not in inputs):
                        found.append((tuple(t.shape), getattr(func, "__name__", str(func))))
                        break
            return out

    with _Recorder():
        result = _call_learner(fn, *args, **kwargs)
    if found:
        shape, op = found[0]
        raise AssertionError(
            f"with need_weights=False a tensor of the scores' shape {_fmt_shape(shape)} was materialised "
            f"(by {op}): the point of need_weights=False is never to build the (..., L, S) scores or "
            "weights -- compute the output with F.scaled_dot_product_attention(q, k, v, attn_mask=..., "
            "scale=...) and return (out, None).")
    return result


def check_raises(exc_type: type[BaseException], fn: Callable[..., Any], *args: Any, why: str = "",
                 **kwargs: Any) -> BaseException:
    """Assert that ``fn(*args, **kwargs)`` raises ``exc_type``; return the exception."""
    try:
        fn(*args, **kwargs)
    except exc_type as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - any other exception is the wrong answer
        text = str(exc).strip().splitlines()
        raise AssertionError(
            f"the call should raise {exc_type.__name__}" + (f" ({why})" if why else "") + f", but it "
            f"raised {type(exc).__name__}: {text[0][:200] if text else ''}") from None
    raise AssertionError(f"the call should raise {exc_type.__name__}" + (f" ({why})" if why else "")
                         + ", but it returned normally.")
