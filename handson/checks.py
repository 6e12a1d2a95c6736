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
]

#: Tolerances for float64 comparisons against PyTorch's reference implementations.
ATOL64 = 1e-10
RTOL64 = 1e-8


def _fmt_shape(shape: Sequence[int] | torch.Size) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


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
    result = fn(*args, **kwargs)
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
