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


def check_not_mutated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` and assert no tensor argument changed (values or ``_version``).

    Returns whatever ``fn`` returned.
    """
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    tensors = [(n, t) for n, t in named if isinstance(t, Tensor)]
    before = [(n, t, t.detach().clone(), t._version) for n, t in tensors]
    result = _call_learner(fn, *args, **kwargs)
    for n, t, copy, version in before:
        changed_values = not torch.equal(t.detach(), copy) if t.device.type != "meta" else False
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
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.size(-1)))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
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
) -> None:
    """Compare an attention ``fn`` with a reference ``ref``: outputs, weights and gradients.

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
                    hint="check the scale 1/sqrt(d_k), the softmax dimension and the mask "
                    "convention (True = may attend)", atol=atol, rtol=rtol)
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
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([module.q.weight, module.k.weight, module.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([_bias(module.q), _bias(module.k), _bias(module.v)]))
        ref.out_proj.weight.copy_(module.o.weight)
        ref.out_proj.bias.copy_(_bias(module.o))
    return ref


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
) -> None:
    """Compare an attention module with ``nn.MultiheadAttention`` holding the same weights.

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
                hint="check the split into heads (view then transpose), the scale 1/sqrt(d_head), "
                "the softmax dimension and the mask (True = may attend)")
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
                "aligned at the bottom right when there are more keys than queries, and not inverted?"
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
