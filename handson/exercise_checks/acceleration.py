"""Checks with diagnoses for the acceleration exercise: online softmax, tiled attention with its
log-sum-exp, merging partial attentions, tile schedules and a tiled sliding-window attention.

The references here are float64 and direct (they build the whole score matrix, which is what the
learner's code must not do). A dispatch mode watches the learner's code while it runs: the largest
tensor any operation creates, the softmax or fused-attention operators it reaches by any name, the
row reductions of the online softmax and the tiles of scores it computes. Every check raises
:class:`AssertionError` with one sentence naming what is wrong and its likely cause.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from handson import checks

__all__ = ["allowed_mask", "reference_attention", "reference_schedule", "reference_merge", "run_guarded",
           "check_online_softmax", "check_attention", "check_attention_grads", "check_memory",
           "check_empty_rows", "check_merge", "check_merge_grads", "check_schedule", "check_window_tiles"]

NEG_INF = float("-inf")


# --- references ---------------------------------------------------------------------------------

def allowed_mask(L: int, S: int, causal: bool = False, window: int | None = None,
                 device: Any = None) -> Tensor | None:
    """Boolean (L, S), True = may attend, bottom-right aligned (query i is position i + S - L):
    causal j <= i'; with a window also j > i' - window. None when nothing is masked."""
    if not causal and window is None:
        return None
    pos = torch.arange(L, device=device)[:, None] + (S - L)
    j = torch.arange(S, device=device)[None, :]
    mask = j <= pos
    if window is not None:
        mask = mask & (j > pos - window)
    return mask


def reference_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None,
                        scale: float | None = None, topleft: bool = False) -> tuple[Tensor, Tensor]:
    """(out, lse) the direct way: lse = torch.logsumexp of the scaled masked scores; a query with
    no allowed key gets out 0 and lse -inf."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    has_key = lse > NEG_INF
    w = torch.exp(s - torch.where(has_key, lse, 0.0)[..., None])
    return w @ v, lse


def reference_schedule(L: int, S: int, block_q: int, block_k: int, window: int | None = None) -> Tensor:
    """Bool (ceil(L / block_q), ceil(S / block_k)): True where the tile holds a pair that may attend
    under the bottom-right causal mask (and the window)."""
    return _blocks(allowed_mask(L, S, True, window), block_q, block_k)


def _blocks(mask: Tensor, block_q: int, block_k: int) -> Tensor:
    """Bool (ceil(L / block_q), ceil(S / block_k)): which tiles of ``mask`` hold a True."""
    L, S = mask.shape
    nq, nk = -(-L // block_q), -(-S // block_k)
    out = torch.zeros(nq, nk, dtype=torch.bool)
    for a in range(nq):
        for b in range(nk):
            out[a, b] = bool(mask[a * block_q:(a + 1) * block_q, b * block_k:(b + 1) * block_k].any())
    return out


def reference_merge(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint key sets from the two partial results."""
    m = torch.maximum(lse1, lse2)
    m_safe = torch.where(m == NEG_INF, 0.0, m)
    w1, w2 = torch.exp(lse1 - m_safe), torch.exp(lse2 - m_safe)
    total = w1 + w2
    has = total > 0
    t_safe = torch.where(has, total, 1.0)
    out = (w1[..., None] * out1 + w2[..., None] * out2) / t_safe[..., None]
    lse = torch.where(has, m_safe + torch.log(t_safe), NEG_INF)
    return out, lse


def _band(L: int, S: int, offset: int, causal: bool, window: int | None) -> Tensor | None:
    """Bool (L, S) with query i at position i + offset: j <= i' if causal, j > i' - window if a window."""
    pos = torch.arange(L)[:, None] + offset
    j = torch.arange(S)[None, :]
    mask = torch.ones(L, S, dtype=torch.bool)
    if causal:
        mask = mask & (j <= pos)
    if window is not None:
        mask = mask & (j > pos - window)
    return mask


def _variant(q: Tensor, k: Tensor, v: Tensor, bq: int, bk: int, causal: bool, scale: float | None,
             window: int | None, bug: str) -> tuple[Tensor, Tensor]:
    """A tiled computation with one known mistake, to recognise it in a learner's result."""
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    offset = S - L
    sched = reference_schedule(L, S, bq, bk, window) if (causal or window is not None) else None
    outs, lses = [], []
    for i0 in range(0, L, bq):
        i1 = min(i0 + bq, L)
        qt = q[..., i0:i1, :] * scale
        m = torch.full(q.shape[:-2] + (i1 - i0,), NEG_INF, dtype=q.dtype)
        l = torch.zeros(q.shape[:-2] + (i1 - i0,), dtype=q.dtype)
        o = torch.zeros(q.shape[:-2] + (i1 - i0, v.size(-1)), dtype=q.dtype)
        for j0 in range(0, S, bk):
            j1 = min(j0 + bk, S)
            if sched is not None and not bool(sched[i0 // bq, j0 // bk]):
                continue                                  # the tiles a causal / windowed loop skips
            s = qt @ k[..., j0:j1, :].transpose(-2, -1)
            if causal or window is not None:
                if bug == "local":
                    rows, cols = torch.arange(i1 - i0)[:, None], torch.arange(j1 - j0)[None, :]
                    ok = cols <= rows
                else:
                    rows, cols = torch.arange(i0, i1)[:, None] + offset, torch.arange(j0, j1)[None, :]
                    ok = cols <= rows
                    if window is not None and bug != "no_lower":
                        w = window + {"plus_one": 1, "minus_one": -1}.get(bug, 0)
                        ok = ok & (cols > rows - w)
                s = s.masked_fill(~ok, NEG_INF)
            m_new = torch.maximum(m, s.amax(-1))
            ms = torch.where(m_new == NEG_INF, 0.0, m_new)
            alpha = torch.exp(m - ms)
            p = torch.exp(s - ms[..., None])
            pv = p @ v[..., j0:j1, :]
            if bug == "per_block":
                ps = p.sum(-1)
                pv = pv / torch.where(ps > 0, ps, 1.0)[..., None]
            l = (l if bug == "l_not_rescaled" else alpha * l) + p.sum(-1)
            o = (o if bug == "o_not_rescaled" else alpha[..., None] * o) + pv
            m = m_new
        has = l > 0
        ls = torch.where(has, l, 1.0)
        outs.append(o if bug == "per_block" else o / ls[..., None])
        lses.append(torch.where(has, m + torch.log(ls), NEG_INF))
    return torch.cat(outs, -2), torch.cat(lses, -1)


# --- watching the learner's code -----------------------------------------------------------------

_FORBIDDEN_OPS = ("softmax", "scaled_dot_product", "flex_attention", "_flash_attention", "_efficient_attention")
_REDUCTIONS = ("amax", "max", "sum", "logsumexp", "mean", "nansum", "aminmax")
_MATMULS = ("mm", "bmm", "baddbmm", "addmm", "addbmm", "dot", "matmul")


def _forbidden_callables(online: bool) -> dict[str, Any]:
    import torch.nn.functional as F

    import handson.nn
    from handson.nn import acceleration as chapter

    out = {"F.scaled_dot_product_attention": F.scaled_dot_product_attention,
           "torch.softmax": torch.softmax, "F.softmax": F.softmax, "torch.nn.functional.log_softmax": F.log_softmax,
           "the library's attention (handson.nn.attention)": handson.nn.attention,
           "the chapter's online_softmax (handson.nn.acceleration)": chapter.online_softmax,
           "the chapter's tiled_attention (handson.nn.acceleration)": chapter.tiled_attention,
           "the chapter's naive_attention (handson.nn.acceleration)": chapter.naive_attention}
    try:
        from torch.nn.attention import flex_attention as flex

        out["flex_attention"] = flex.flex_attention
    except ImportError:  # pragma: no cover
        pass
    if online:
        out["torch.logsumexp"] = torch.logsumexp
    return out


class _Watch:
    """What a run of the learner's code did: largest tensor, forbidden operators, wide row
    reductions, score tiles computed."""

    def __init__(self, block: int | None = None, q_sizes: set[int] | None = None,
                 k_sizes: set[int] | None = None, online: bool = False):
        self.block, self.q_sizes, self.k_sizes, self.online = block, q_sizes, k_sizes, online
        self.numel, self.shape, self.op = 0, None, None
        self.forbidden: str | None = None
        self.wide: tuple[str, tuple[int, ...]] | None = None
        self.tiles = 0

    def mode(self, light: bool = False) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self

        class _Light(TorchDispatchMode):
            @classmethod
            def _should_skip_dynamo(cls):
                return False          # eager only: no torch._dynamo import (seconds) for the wrapper

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if watch.forbidden is None and (any(f in name for f in _FORBIDDEN_OPS)
                                                or (watch.online and name == "logsumexp")):
                    watch.forbidden = f"aten.{name}"
                return func(*args, **(kwargs or {}))

        class _Mode(TorchDispatchMode):
            @classmethod
            def _should_skip_dynamo(cls):
                return False          # eager only: no torch._dynamo import (seconds) for the wrapper

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.__name__.split(".")[0]
                if watch.forbidden is None and (any(f in name for f in _FORBIDDEN_OPS)
                                                or (watch.online and name == "logsumexp")):
                    watch.forbidden = f"aten.{name}"
                if watch.block is not None and watch.wide is None and name in _REDUCTIONS and args \
                        and isinstance(args[0], Tensor) and args[0].dim() >= 1:
                    x = args[0]
                    dims = args[1] if len(args) > 1 else kwargs.get("dim", None)
                    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
                        dims = list(range(x.dim()))
                    dims = [dims] if isinstance(dims, int) else list(dims)
                    if any(d % x.dim() == x.dim() - 1 for d in dims) and x.shape[-1] > watch.block:
                        watch.wide = (str(func.overloadpacket), tuple(x.shape))
                out = func(*args, **kwargs)
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, Tensor) and t.numel() > watch.numel:
                        watch.numel, watch.shape, watch.op = t.numel(), tuple(t.shape), f"aten.{name}"
                if watch.q_sizes and name in _MATMULS and isinstance(out, Tensor) and out.dim() >= 2 \
                        and out.shape[-1] in watch.k_sizes and out.shape[-2] in watch.q_sizes:
                    watch.tiles += 1
                return out

        return _Light() if light else _Mode()


def _names(code: Any) -> set[str]:
    out = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            out |= _names(const)
    return out


def _refused(fn: Any, forbidden: dict[int, str], seen: set[int], depth: int = 0) -> str | None:
    """The forbidden callable that ``fn`` (or a function of the learner's that it uses) names, if any."""
    if id(fn) in forbidden:
        return forbidden[id(fn)]
    code = getattr(fn, "__code__", None)
    if code is None or id(fn) in seen or depth > 4:
        return None
    seen.add(id(fn))
    names = _names(code)
    scope = dict(getattr(fn, "__globals__", {}))
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            scope[f"<closure {id(cell)}>"] = cell.cell_contents
        except ValueError:
            continue
    values = [scope[n] for n in names if n in scope] + [v for n, v in scope.items() if n.startswith("<closure")]
    for obj in values:
        if id(obj) in forbidden:
            return forbidden[id(obj)]
        if isinstance(obj, type(math)):
            for n in names:
                if id(getattr(obj, n, None)) in forbidden:
                    return forbidden[id(getattr(obj, n))]
        elif callable(obj) and hasattr(obj, "__code__") and not getattr(obj, "__module__", "").startswith("torch"):
            found = _refused(obj, forbidden, seen, depth + 1)
            if found:
                return found
    return None


def run_guarded(fn: Callable[..., Any], *args: Any, asked: str, online: bool = False,
                watch: _Watch | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, refusing the built-in and library pieces the exercise asks to write:
    the Python callables it names (read from its code, cheaply) and, while it runs, any ATen softmax
    or fused-attention operator, whatever the name it was reached by (Tensor.softmax too)."""
    forbidden = {id(obj): name for name, obj in _forbidden_callables(online).items()}
    found = _refused(fn, forbidden, set())
    if found:
        raise AssertionError(
            f"{asked} calls {found}, which this exercise asks you to write yourself: using the library's (or "
            "PyTorch's) version of the asked piece earns no marks for this part.")
    if watch is None:                 # values and gradients: no dispatch mode, for speed
        return checks._call_learner(fn, *args, **kwargs)
    watch.online = online
    with watch.mode():
        result = checks._call_learner(fn, *args, **kwargs)
    if watch.forbidden:
        raise AssertionError(
            f"{asked} runs the operator {watch.forbidden}, which this exercise asks you to replace: no "
            "softmax, log-softmax, logsumexp of a whole row or fused attention (by any name, including "
            "Tensor.softmax) -- build it from exp, max, sum and matrix products, tile by tile.")
    return result


def _as_pair(res: Any, name: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(res, tuple) and len(res) == 2 and all(isinstance(t, Tensor) for t in res)):
        got = f"a tuple of length {len(res)}" if isinstance(res, tuple) else type(res).__name__
        raise AssertionError(f"{name} must return a pair of tensors (out, logsumexp), but it returned {got}.")
    return res


# --- online softmax -------------------------------------------------------------------------------

def check_online_softmax(fn: Callable[..., Any], x: Tensor, block_size: int) -> None:
    """online_softmax(x, block_size) equals torch.softmax, reads x block by block, no built-in."""
    watch = _Watch(block=block_size)
    got = run_guarded(fn, x, block_size, asked="online_softmax", online=True, watch=watch)
    checks.check_shape(got, x.shape, f"online_softmax(x, {block_size})")
    checks.check_dtype(got, x.dtype, f"online_softmax(x, {block_size})")
    want = torch.softmax(x, dim=-1)
    finite = x[torch.isfinite(x)]
    if (bool(torch.isinf(got).any()) or bool(torch.isnan(got).any())) and finite.numel() \
            and float(finite.abs().max()) > 80:
        raise AssertionError(
            f"online_softmax(x, {block_size}) overflows (inf or NaN) on large inputs: subtract the running "
            "maximum before exponentiating (exp(x - m)), and rescale the sum when m grows.")
    if bool(torch.isnan(got).any()) and not bool(torch.isnan(want).any()):
        raise AssertionError(
            f"online_softmax(x, {block_size}) gives NaN where torch.softmax does not: a block whose values "
            "are all -inf makes the running maximum -inf, and exp(-inf - (-inf)) = exp(NaN); use 0 in place "
            "of a running maximum that is still -inf.")
    if watch.wide is not None:
        op, shape = watch.wide
        raise AssertionError(
            f"online_softmax reduced a whole row of {shape[-1]} values at once ({op} over the last dim of a "
            f"tensor of shape {shape}), more than block_size = {block_size}: that is the two-pass softmax; "
            "read x block_size columns at a time, keeping a running maximum m and sum l.")
    if not torch.allclose(got, want, rtol=checks.RTOL64, atol=checks.ATOL64):
        hint = "check the running sum"
        first = x[..., :block_size]
        if x.size(-1) > block_size and (got.sum(-1) - 1).abs().max() > 1e-6:
            hint = ("the rows do not sum to 1: the running sum l must be rescaled by exp(m_old - m_new) "
                    "whenever the maximum grows, and every block (the last, partial one too) added")
        elif bool(torch.allclose(got[..., :block_size], torch.softmax(first, -1), atol=1e-10)):
            hint = "each block is normalised on its own: keep one running maximum and sum over the whole row"
        diff = float((got - want).abs().max())
        raise AssertionError(f"online_softmax(x, {block_size}) differs from torch.softmax by up to {diff:.3g}: {hint}.")


# --- tiled attention --------------------------------------------------------------------------------

def _diagnose(out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, bq: int, bk: int, causal: bool,
              scale: float | None, window: int | None, name: str) -> str:
    """The sentence for a wrong (out, lse), recognising the common mistakes."""
    L, S = q.size(-2), k.size(-2)
    sc = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    allowed = allowed_mask(L, S, causal, window)
    ref_out, ref_lse = reference_attention(q, k, v, allowed, scale)
    close = lambda a, b: a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-7, atol=1e-9, equal_nan=True))
    cands: list[tuple[str, Callable[[], tuple[Tensor, Tensor]]]] = [
        ("the output accumulated so far is not rescaled by exp(m - m_new) when the running maximum grows "
         "(O = exp(m - m_new) * O + P V)", lambda: _variant(q, k, v, bq, bk, causal, scale, window, "o_not_rescaled")),
        ("the running sum l is not rescaled by exp(m - m_new) when the maximum grows "
         "(l = exp(m - m_new) * l + rowsum(P))", lambda: _variant(q, k, v, bq, bk, causal, scale, window, "l_not_rescaled")),
        ("each block's contribution is divided per block by its own sum: accumulate the unnormalised "
         "exp(S - m) V and divide by l once, at the end", lambda: _variant(q, k, v, bq, bk, causal, scale, window, "per_block")),
    ]
    if causal or window is not None:
        cands += [
            ("the causal mask of a tile uses indices local to the tile: compare the global positions "
             "i0 + r + S - L of its queries with the global positions j0 + c of its keys",
             lambda: _variant(q, k, v, bq, bk, causal, scale, None, "local")),
            ("the causal mask is aligned top-left (j <= i); queries are the last L of S positions, so "
             "query i is position i + S - L (bottom-right)",
             lambda: reference_attention(q, k, v, _band(L, S, 0, True, window), scale)),
            ("the causal mask is missing: query i (position i + S - L) may not attend later keys",
             lambda: reference_attention(q, k, v, _band(L, S, S - L, False, window), scale)),
        ]
    else:
        cands.append(("causal masking was applied although causal=False",
                      lambda: reference_attention(q, k, v, allowed_mask(L, S, True), scale)))
    if window is not None:
        cands += [
            ("the window holds window + 1 keys: it counts the query itself, so query i' sees the keys "
             "i' - window < j <= i'", lambda: reference_attention(q, k, v, allowed_mask(L, S, True, window + 1), scale)),
            ("the window holds window - 1 keys: it counts the query itself, so query i' sees the keys "
             "i' - window < j <= i'", lambda: reference_attention(q, k, v, allowed_mask(L, S, True, window - 1), scale)
             if window > 1 else (ref_out * 0 + float("nan"), ref_lse)),
            ("the window is ignored: this is plain causal attention; keys j <= i' - window must be masked",
             lambda: reference_attention(q, k, v, allowed_mask(L, S, True), scale)),
        ]
    if window is not None:
        cands += [(text, lambda b=b: _variant(q, k, v, bq, bk, True, scale, window, b)) for b, text in [
            ("plus_one", "the window holds window + 1 keys: it counts the query itself, so query i' sees the "
             "keys i' - window < j <= i'"),
            ("minus_one", "the window holds window - 1 keys: it counts the query itself, so query i' sees the "
             "keys i' - window < j <= i'")]]
        cands.append(("only whole tiles outside the window are skipped: inside a computed tile the keys "
                      "j <= i' - window must be masked too", lambda: _variant(q, k, v, bq, bk, True, scale, window,
                                                                              "no_lower")))
    cands += [
        ("the scale is applied twice (scores multiplied by scale**2)",
         lambda: reference_attention(q, k, v, allowed, sc * sc)),
        ("the scale is missing: the scores must be multiplied by scale (default 1/sqrt(d))",
         lambda: reference_attention(q, k, v, allowed, 1.0)),
    ]
    if scale is not None:
        cands.append(("the scale argument is ignored (1/sqrt(d) used instead)",
                      lambda: reference_attention(q, k, v, allowed, None)))
    if S % bk:
        cands.append(("the last, partial block of keys is dropped: loop over range(0, S, block_k) and slice "
                      "up to min(j0 + block_k, S)",
                      lambda: reference_attention(q, k[..., :S - S % bk, :], v[..., :S - S % bk, :],
                                                  None if allowed is None else allowed[:, :S - S % bk], scale)))
    for text, make in cands:
        try:
            c_out, c_lse = make()
        except Exception:  # noqa: BLE001 - a candidate that cannot be built is just skipped
            continue
        if close(out, c_out):
            return f"{name}'s output is wrong: {text}."
    if close(out, ref_out):
        has = ref_lse > NEG_INF
        row_max = ((q @ k.transpose(-2, -1)) * sc).masked_fill(
            ~allowed if allowed is not None else torch.zeros((), dtype=torch.bool), NEG_INF).amax(-1)
        if close(lse[has], (ref_lse - row_max)[has]):
            return (f"{name}'s logsumexp is log(l) without the running maximum: the sum l is relative to m, "
                    "so lse = m + log(l).")
        if close(lse[has], torch.logsumexp(((q @ k.transpose(-2, -1)) * sc).masked_fill(
                ~allowed if allowed is not None else torch.zeros((), dtype=torch.bool), NEG_INF) / sc, -1)[has]):
            return f"{name}'s logsumexp is of the unscaled scores: it is logsumexp of scale * q k^T (masked)."
        if close(lse[has], row_max[has]):
            return f"{name}'s logsumexp is the running maximum alone: lse = m + log(l)."
        diff = float((lse[has] - ref_lse[has]).abs().max()) if bool(has.any()) else float("nan")
        return (f"{name}'s logsumexp differs from torch.logsumexp of the scaled, masked scores by up to "
                f"{diff:.3g}: lse = m + log(l) with the final m and l of each query.")
    diff = float((out - ref_out).abs().max())
    return (f"{name}'s output differs from the reference (SDPA in float64) by up to {diff:.3g}: check the "
            "update m_new = max(m, rowmax(S)), P = exp(S - m_new), l = exp(m - m_new) l + rowsum(P), "
            "O = exp(m - m_new) O + P V, and out = O / l at the end.")


def _check_result(res: Any, q: Tensor, k: Tensor, v: Tensor, bq: int, bk: int, causal: bool,
                  scale: float | None, window: int | None, name: str) -> tuple[Tensor, Tensor]:
    out, lse = _as_pair(res, name)
    L, S = q.size(-2), k.size(-2)
    hint_q = ("" if L % bq == 0 else " -- the last, partial block of queries was dropped? loop over "
              "range(0, L, block_q) and slice up to min(i0 + block_q, L)")
    checks.check_shape(out, q.shape[:-1] + (v.size(-1),), f"{name}'s out", hint=hint_q or
                       "out is (..., L, d_v): one row per query, the values' width")
    checks.check_shape(lse, q.shape[:-1], f"{name}'s logsumexp", hint=hint_q or "one number per query: (..., L)")
    checks.check_dtype(out, q.dtype, f"{name}'s out")
    checks.check_dtype(lse, q.dtype, f"{name}'s logsumexp")
    allowed = allowed_mask(L, S, causal, window)
    ref_out, ref_lse = reference_attention(q.detach(), k.detach(), v.detach(), allowed, scale)
    if bool(torch.isnan(out).any()) or bool(torch.isnan(lse).any()):
        raise AssertionError(
            f"{name} returns NaN: in a tile where a query has no allowed key yet, the running maximum "
            "stays -inf and exp(m - m_new) = exp(-inf - (-inf)) = NaN; use 0 in place of a maximum that "
            "is still -inf (and give a query with no key at all out = 0, lse = -inf).")
    o, lz = out.detach(), lse.detach()
    empty = ref_lse == NEG_INF
    if bool(empty.any()) and bool((o[empty] != 0).any()):
        raise AssertionError(
            f"{name} gives a query with no allowed key a non-zero output: a finite fill (torch.finfo(dtype).min, "
            "-1e9) turns its row into an average of the values -- fill with -inf, and give such a query out = 0 "
            "and lse = -inf.")
    if not (torch.allclose(o, ref_out, rtol=checks.RTOL64, atol=checks.ATOL64)
            and torch.equal(lz == NEG_INF, ref_lse == NEG_INF)
            and torch.allclose(lz[ref_lse > NEG_INF], ref_lse[ref_lse > NEG_INF], rtol=checks.RTOL64,
                               atol=checks.ATOL64)):
        if torch.allclose(o, ref_out, rtol=checks.RTOL64, atol=checks.ATOL64) and \
                not torch.equal(lz == NEG_INF, ref_lse == NEG_INF) and \
                torch.allclose(lz[ref_lse > NEG_INF], ref_lse[ref_lse > NEG_INF], rtol=1e-7, atol=1e-9):
            raise AssertionError(
                f"{name}'s logsumexp of a query with no allowed key should be -inf (torch.logsumexp of a "
                "row of -inf), as its output is 0.")
        raise AssertionError(_diagnose(o, lz, q.detach(), k.detach(), v.detach(), bq, bk, causal, scale,
                                       window, name))
    return out, lse


def check_attention(fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, *args: Any, block_q: int,
                    block_k: int, causal: bool = False, scale: float | None = None, window: int | None = None,
                    name: str = "tiled_attention", **kwargs: Any) -> tuple[Tensor, Tensor]:
    """fn(q, k, v, *args, **kwargs) -> (out, lse) equals the float64 reference; inputs not modified."""
    res = checks.check_not_mutated(lambda *a, **kw: run_guarded(fn, *a, asked=name, **kw), q, k, v, *args,
                                   **kwargs)
    return _check_result(res, q, k, v, block_q, block_k, causal, scale, window, name)


def check_attention_grads(fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, *args: Any, causal: bool = False,
                          scale: float | None = None, window: int | None = None, name: str = "tiled_attention",
                          **kwargs: Any) -> None:
    """Gradients of a random projection of out and of the finite lse equal the reference's."""
    L, S = q.size(-2), k.size(-2)
    mine = {n: t.detach().clone().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    theirs = {n: t.detach().clone().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    out, lse = _as_pair(run_guarded(fn, mine["q"], mine["k"], mine["v"], *args, asked=name, **kwargs), name)
    ref_out, ref_lse = reference_attention(theirs["q"], theirs["k"], theirs["v"], allowed_mask(L, S, causal, window),
                                           scale)
    if out.grad_fn is None or lse.grad_fn is None:
        raise AssertionError(f"{name}'s out or logsumexp has no grad_fn: it was computed under torch.no_grad(), "
                             "detached or written through .data -- keep every step in the autograd graph.")
    gen = torch.Generator().manual_seed(0)
    p_out = torch.randn(ref_out.shape, generator=gen, dtype=q.dtype)
    p_lse = torch.randn(ref_lse.shape, generator=gen, dtype=q.dtype)
    fin = ref_lse > NEG_INF

    def loss(o: Tensor, lz: Tensor) -> Tensor:
        return (o * p_out).sum() + (torch.where(fin, lz, 0.0) * p_lse).sum()

    checks.check_backward_finite(lambda: loss(out, lse), mine)
    loss(ref_out, ref_lse).backward()
    for n in "qkv":
        g, want = mine[n].grad, theirs[n].grad
        if not torch.allclose(g, want, rtol=checks.RTOL64, atol=checks.ATOL64):
            raise AssertionError(
                f"the gradient of {name} with respect to {n} differs from the reference by up to "
                f"{float((g - want).abs().max()):.3g} although the forward pass is right: a step was taken out "
                "of the graph (.detach(), .data, .item(), an in-place write into a saved tensor).")


def check_memory(fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, *args: Any, block_q: int, block_k: int,
                 name: str = "tiled_attention", **kwargs: Any) -> None:
    """No tensor larger than a tile of scores or the inputs/outputs (per batch-head) is created, and
    no softmax or fused attention runs (by any name, Tensor.softmax too)."""
    L, S, d, dv = q.size(-2), k.size(-2), q.size(-1), v.size(-1)
    bh = math.prod(q.shape[:-2])
    limit = bh * max(block_q * block_k, L * max(d, dv), S * max(d, dv), L)
    watch = _Watch()
    with torch.no_grad():
        run_guarded(fn, q, k, v, *args, asked=name, watch=watch, **kwargs)
    if watch.numel > limit:
        raise AssertionError(
            f"{name} created a tensor of shape {watch.shape} ({watch.numel} elements, by {watch.op}), more than "
            f"a ({block_q}, {block_k}) tile of scores or the inputs and output allow ({limit} elements here): "
            "the whole (L, S) scores, weights or mask were built -- compute each tile's scores, and its mask "
            "from the global positions of that tile only.")


def check_empty_rows(fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, *args: Any, block_q: int, block_k: int,
                     causal: bool = True, window: int | None = None, name: str = "tiled_attention",
                     **kwargs: Any) -> None:
    """Queries with no allowed key (more queries than keys, or a tile outside the window) give out 0,
    lse -inf, no NaN forward or backward (anomaly detection)."""
    out, lse = _check_result(run_guarded(fn, q, k, v, *args, asked=name, **kwargs), q, k, v, block_q, block_k,
                             causal, None, window, name)
    mine = {n: t.detach().clone().requires_grad_() for n, t in zip("qkv", (q, k, v))}

    def loss() -> Tensor:
        o, lz = _as_pair(run_guarded(fn, mine["q"], mine["k"], mine["v"], *args, asked=name, **kwargs), name)
        return (o * o).sum() + torch.where(torch.isfinite(lz), lz, 0.0).sum()

    checks.check_backward_finite(loss, mine)


# --- merge ----------------------------------------------------------------------------------------------

def check_merge(fn: Callable[..., Any], out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor,
                want: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """merge_attention(out1, lse1, out2, lse2) -> (out, lse) equals the reference merge."""
    res = checks.check_not_mutated(lambda *a: run_guarded(fn, *a, asked="merge_attention"), out1, lse1, out2, lse2)
    out, lse = _as_pair(res, "merge_attention")
    ref_out, ref_lse = reference_merge(out1, lse1, out2, lse2) if want is None else want
    checks.check_shape(out, ref_out.shape, "merge_attention's out")
    checks.check_shape(lse, ref_lse.shape, "merge_attention's logsumexp")
    checks.check_dtype(out, out1.dtype, "merge_attention's out")
    o, lz = out.detach(), lse.detach()
    big = bool((torch.maximum(lse1, lse2) > 700).any())
    if bool(torch.isnan(o).any() or torch.isnan(lz).any() or torch.isinf(o).any()):
        if big:
            raise AssertionError(
                "merge_attention overflows (inf/NaN) for large log-sum-exps: exp(lse) is inf beyond ~709; "
                "weight each part by exp(lse_i - max(lse1, lse2)) instead.")
        raise AssertionError(
            "merge_attention returns NaN where a part is empty (its lse is -inf): exp(-inf - (-inf)) is NaN; "
            "use 0 in place of a maximum that is -inf, and give a query with no key in either part out 0, "
            "lse -inf.")
    fin = ref_lse > NEG_INF
    ok_lse = torch.equal(lz == NEG_INF, ref_lse == NEG_INF) and torch.allclose(
        lz[fin], ref_lse[fin], rtol=checks.RTOL64, atol=checks.ATOL64)
    if torch.allclose(o, ref_out, rtol=checks.RTOL64, atol=checks.ATOL64) and ok_lse:
        return out, lse
    close = lambda a, b: bool(torch.allclose(a, b, rtol=1e-7, atol=1e-9))
    if not torch.allclose(o, ref_out, rtol=checks.RTOL64, atol=checks.ATOL64):
        if close(o, (out1 + out2) / 2):
            raise AssertionError("merge_attention averages the two outputs: each part must be weighted by its "
                                 "share of the total, exp(lse_i - lse) with lse = log(exp(lse1) + exp(lse2)).")
        if close(o, out1 + out2):
            raise AssertionError("merge_attention adds the two outputs: they are normalised over their own keys, "
                                 "so each must be weighted by exp(lse_i - lse) before adding.")
        w1, w2 = torch.exp(lse1 - ref_lse)[..., None], torch.exp(lse2 - ref_lse)[..., None]
        if close(o, w2 * out1 + w1 * out2):
            raise AssertionError("merge_attention swaps the weights: out1 is weighted by exp(lse1 - lse), "
                                 "out2 by exp(lse2 - lse).")
        raise AssertionError(
            f"merge_attention's out differs from the attention over both key sets by up to "
            f"{float((o - ref_out).abs().max()):.3g}: out = (exp(lse1 - m) out1 + exp(lse2 - m) out2) / "
            "(exp(lse1 - m) + exp(lse2 - m)) with m = max(lse1, lse2).")
    if close(lz[fin], torch.maximum(lse1, lse2)[fin]):
        raise AssertionError("merge_attention's logsumexp is max(lse1, lse2): the merged one is "
                             "log(exp(lse1) + exp(lse2)) = m + log(exp(lse1 - m) + exp(lse2 - m)).")
    if close(lz[fin], (lse1 + lse2)[fin]):
        raise AssertionError("merge_attention's logsumexp is lse1 + lse2: log-sum-exps combine as "
                             "log(exp(lse1) + exp(lse2)), not by adding.")
    raise AssertionError("merge_attention's logsumexp is wrong (or not -inf for a query with no key in "
                         "either part): it is log(exp(lse1) + exp(lse2)), computed as m + log(exp(lse1 - m) + "
                         "exp(lse2 - m)).")


def check_merge_grads(fn: Callable[..., Any], out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> None:
    """Gradients with respect to all four inputs equal the reference merge's (finite lse only)."""
    mine = {n: t.detach().clone().requires_grad_() for n, t in zip(["out1", "lse1", "out2", "lse2"],
                                                                 (out1, lse1, out2, lse2))}
    theirs = {n: t.detach().clone().requires_grad_() for n, t in mine.items()}
    out, lse = _as_pair(run_guarded(fn, *mine.values(), asked="merge_attention"), "merge_attention")
    ref_out, ref_lse = reference_merge(*theirs.values())
    gen = torch.Generator().manual_seed(1)
    p1, p2 = (torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (ref_out, ref_lse))
    checks.check_backward_finite(lambda: (out * p1).sum() + (lse * p2).sum(), mine)
    ((ref_out * p1).sum() + (ref_lse * p2).sum()).backward()
    for n in mine:
        if not torch.allclose(mine[n].grad, theirs[n].grad, rtol=checks.RTOL64, atol=checks.ATOL64):
            raise AssertionError(
                f"the gradient of merge_attention with respect to {n} differs from the reference by up to "
                f"{float((mine[n].grad - theirs[n].grad).abs().max()):.3g}: a weight or the maximum was "
                "detached or computed outside the graph (.item(), .detach(), .data).")


# --- tile schedule and windowed tiles ------------------------------------------------------------------------

def check_schedule(fn: Callable[..., Any], L: int, S: int, block_q: int, block_k: int, window: int | None) -> None:
    """tile_schedule(L, S, block_q, block_k, window) equals the brute-force schedule."""
    got = checks._call_learner(fn, L, S, block_q, block_k, window)
    want = reference_schedule(L, S, block_q, block_k, window)
    call = f"tile_schedule({L}, {S}, {block_q}, {block_k}, window={window})"
    checks.check_shape(got, want.shape, call, hint="one row per query block and one column per key block, "
                       "the last blocks partial: ceil(L / block_q) by ceil(S / block_k)")
    if got.dtype != torch.bool:
        raise AssertionError(f"{call} has dtype {got.dtype}: return a boolean tensor (True = the tile is computed).")
    if torch.equal(got, want):
        return
    mistakes = [(_blocks(_band(L, S, 0, True, window), block_q, block_k),
                 "the diagonal is aligned top-left; query i is position i + S - L (bottom-right)"),
                (reference_schedule(L, S, block_q, block_k, None),
                 "the window is ignored: tiles whose keys all lie at or before i' - window for every query are skipped too"),
                (reference_schedule(L, S, block_q, block_k, window + 1) if window else None,
                 "off by one: the window holds window keys, the query included (i' - window < j <= i')"),
                (reference_schedule(L, S, block_q, block_k, window - 1) if window and window > 1 else None,
                 "off by one: the window holds window keys, the query included (i' - window < j <= i')")]
    for cand, text in mistakes:
        if cand is not None and cand.shape == got.shape and torch.equal(got, cand):
            raise AssertionError(f"{call} is wrong: {text}.")
    extra, missing = int((got & ~want).sum()), int((want & ~got).sum())
    raise AssertionError(
        f"{call} marks {extra} tile(s) with no allowed pair and misses {missing} tile(s) that hold one: a tile "
        "(a, b) is computed iff some query position i' in block a and key j in block b have "
        "i' - window < j <= i' (with i' = i + S - L; no lower bound when window is None).")


def check_window_tiles(fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, window: int, block_q: int,
                       block_k: int, name: str = "sliding_window_attention") -> None:
    """The windowed attention computes exactly the scheduled tiles (one score product each) and no
    tensor larger than a tile or the inputs/outputs."""
    L, S = q.size(-2), k.size(-2)
    q_sizes = {block_q} | ({L % block_q} if L % block_q else set())
    k_sizes = {block_k} | ({S % block_k} if S % block_k else set())
    watch = _Watch(q_sizes=q_sizes, k_sizes=k_sizes)
    with torch.no_grad():
        run_guarded(fn, q, k, v, window, block_q, block_k, asked=name, watch=watch)
    want = int(reference_schedule(L, S, block_q, block_k, window).sum())
    total = -(-L // block_q) * -(-S // block_k)
    causal = int(reference_schedule(L, S, block_q, block_k, None).sum())
    if watch.tiles > want:
        where = ("every tile" if watch.tiles >= total else
                 "the tiles of plain causal attention" if watch.tiles == causal else f"{watch.tiles} tiles")
        raise AssertionError(
            f"{name} computes {where} ({watch.tiles} products of a query block with a key block) but only "
            f"{want} of the {total} tiles hold a pair inside the window: skip the tiles after the diagonal "
            "and the tiles entirely before the window (loop only over the key blocks that tile_schedule marks).")
    if watch.tiles < want:
        raise AssertionError(
            f"{name} computes {watch.tiles} tiles of scores with a matrix product, fewer than the {want} that hold a "
            "pair inside the window: compute each scheduled tile's scores with one product q_tile @ k_tile^T.")
    dv = v.size(-1)
    bh = math.prod(q.shape[:-2])
    limit = bh * max(block_q * block_k, L * max(q.size(-1), dv), S * max(q.size(-1), dv), L)
    if watch.numel > limit:
        raise AssertionError(
            f"{name} created a tensor of shape {watch.shape} ({watch.numel} elements, by {watch.op}), larger than "
            f"a ({block_q}, {block_k}) tile or the inputs and output ({limit} elements here): the whole (L, S) "
            "scores or window mask were built -- build each tile's mask from its global positions.")
