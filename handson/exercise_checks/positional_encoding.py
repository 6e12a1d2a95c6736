"""Checks with diagnoses for the positional-encoding exercise.

Float64 references written here independently of the book's library (per-coordinate formulas,
complex rotations, the ALiBi authors' recursive ``get_slopes``), and checks that compare a
submission with them. When a result is wrong, the check computes the usual mistakes (the other
RoPE pairing, the exponent i/d instead of 2i/d, positions counted from 1, a forgotten offset,
slopes in reverse order, ...) and names the one the submission matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from handson import checks

__all__ = ["ref_sinusoidal", "ref_rope_angles", "ref_cos_sin", "ref_rotate", "ref_slopes", "ref_alibi_bias",
           "ref_rotary_attention", "check_sinusoidal", "check_rope_cos_sin", "check_apply_rope",
           "check_rope_relative", "check_alibi_slopes", "check_alibi_bias", "check_alibi_attention", "check_rope_cos_sin_at",
           "check_rotary_layers", "check_rotary_reference", "check_rotary_translation",
           "check_rotary_cache", "check_rotary_left_padding", "check_tensor_on", "check_rounded"]

F64 = torch.float64
_MATCH = dict(atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------- references (float64)
def ref_sinusoidal(n_positions: int, d_model: int, base: float = 10000.0, *, first: int = 0,
                   freq_denominator: float | None = None, concatenated: bool = False,
                   swap: bool = False) -> Tensor:
    """Vaswani 3.5 coordinate by coordinate; the keyword arguments build the usual variants."""
    half = (d_model + 1) // 2
    rows = []
    for p in range(n_positions):
        row = []
        for c in range(d_model):
            i = c // 2 if not concatenated else (c if c < half else c - half)
            is_sin = (c % 2 == 0) if not concatenated else c < half
            if swap:
                is_sin = not is_sin
            expo = 2 * i / d_model if freq_denominator is None else i / freq_denominator
            angle = (p + first) / base ** expo
            row.append(math.sin(angle) if is_sin else math.cos(angle))
        rows.append(row)
    return torch.tensor(rows, dtype=F64).reshape(n_positions, d_model)


def ref_rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0, *, scaling: float = 1.0,
                    exponent: str = "2i/d") -> Tensor:
    """(..., head_dim / 2) angles m * theta_i, theta_i = base^(-2i/head_dim), m = position / scaling."""
    i = torch.arange(head_dim // 2, dtype=F64)
    expo = 2 * i / head_dim if exponent == "2i/d" else i / head_dim
    theta = torch.tensor([1.0 / base ** float(e) for e in expo], dtype=F64)
    return (positions.detach().cpu().to(F64) / scaling)[..., None] * theta


def ref_cos_sin(positions: Tensor, head_dim: int, base: float = 10000.0, *, scaling: float = 1.0,
                layout: str = "half", exponent: str = "2i/d") -> tuple[Tensor, Tensor]:
    """cos, sin (..., head_dim) in the rotate-half layout (or "interleaved": repeat_interleave)."""
    a = ref_rope_angles(positions, head_dim, base, scaling=scaling, exponent=exponent)
    a = torch.cat([a, a], -1) if layout == "half" else a.repeat_interleave(2, -1)
    return a.cos(), a.sin()


def ref_rotate(x: Tensor, angles: Tensor, pairing: str = "half") -> Tensor:
    """Rotate the pairs of x (..., d) by angles (broadcastable to (..., d/2)) as complex numbers."""
    x = x.to(F64)
    d = x.size(-1)
    if pairing == "half":
        z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    else:
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    z = z * torch.polar(torch.ones_like(angles), angles)
    if pairing == "half":
        return torch.cat([z.real, z.imag], -1)
    return torch.stack([z.real, z.imag], -1).flatten(-2)


def ref_slopes(n: int) -> list[float]:
    """The ALiBi authors' get_slopes (attention_with_linear_biases, fairseq), as written there."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + ref_slopes(2 * closest)[0::2][: n - closest]


def ref_alibi_bias(n_head: int, L: int, S: int | None = None) -> Tensor:
    """(n_head, L, S) float64: slope_h * (j - (i + S - L)) for every pair, future included."""
    S = L if S is None else S
    vals = [[[m * (j - (i + S - L)) for j in range(S)] for i in range(L)] for m in ref_slopes(n_head)]
    return torch.tensor(vals, dtype=F64).reshape(n_head, L, S)


def _split(t: Tensor, n_head: int) -> Tensor:
    B, L, D = t.shape
    return t.reshape(B, L, n_head, D // n_head).transpose(1, 2)


def ref_rotary_attention(module: Any, n_head: int, x: Tensor, positions: Tensor | None = None,
                         attn_mask: Tensor | None = None, past_kv: tuple[Tensor, Tensor] | None = None,
                         base: float = 10000.0, *, variant: str = "") -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal self-attention with RoPE on q and k, written out in float64 with the module's weights.

    ``variant`` builds a known mistake: "rope_v", "no_rope", "q_only", "interleaved",
    "no_offset", "top_left", "no_scale".
    """
    B, L, D = x.shape
    hd = D // n_head
    lin = lambda layer, t: t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)
    q, k, v = (_split(lin(getattr(module, n), x), n_head) for n in "qkv")
    S_past = 0 if past_kv is None else past_kv[0].size(-2)
    if positions is None:
        start = 0 if variant == "no_offset" else S_past
        positions = torch.arange(start, start + L)
    pos = positions.to(x.device)
    a = ref_rope_angles(pos, hd, base).to(x.device)            # (L, hd/2) or (B, L, hd/2)
    if a.dim() == 3:
        a = a[:, None]
    pairing = "interleaved" if variant == "interleaved" else "half"
    if variant != "no_rope":
        q = ref_rotate(q, a, pairing)
        if variant != "q_only":
            k = ref_rotate(k, a, "interleaved" if variant == "mixed" else pairing)
        if variant == "rope_v":
            v = ref_rotate(v, a, pairing)
    if variant == "no_mask":
        attn_mask = None
    if past_kv is not None:
        pk = past_kv[0]
        if variant == "rerotate_cache":
            pk = ref_rotate(pk, ref_rope_angles(torch.arange(S_past), hd, base).to(x.device))
        k, v = torch.cat([pk, k], -2), torch.cat([past_kv[1], v], -2)
    S = k.size(-2)
    scale = 1.0 if variant == "no_scale" else 1.0 / math.sqrt(hd)
    s = (q @ k.transpose(-2, -1)) * scale
    ii = torch.arange(L, device=x.device)[:, None] + (S - L if variant != "top_left" else 0)
    allowed = torch.arange(S, device=x.device)[None, :] <= ii
    if attn_mask is not None:
        allowed = allowed & attn_mask
    s = s.masked_fill(~allowed, float("-inf"))
    w = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    out = (w @ v).transpose(1, 2).reshape(B, L, n_head * hd)
    return lin(module.o, out), (k, v)


# ----------------------------------------------------------------------------- helpers
def _compare(got: Any, want: Tensor, name: str, mistakes: Sequence[tuple[Callable[[], Tensor], str]] = (),
             hint: str = "", angles: bool = False) -> None:
    """got must match want (float64 tolerances); otherwise name the first mistake it matches.

    ``angles``: the values are sines and cosines, whose small errors mean float32 angles.
    """
    checks.check_shape(got, want.shape, name, hint=hint or "see the shapes asked in the text")
    g = got.detach().cpu().to(F64)
    if torch.allclose(g, want, atol=checks.ATOL64, rtol=checks.RTOL64):
        return
    for make, why in mistakes:
        try:
            cand = make()
        except Exception:  # noqa: BLE001 - a variant that cannot be built is not the mistake
            continue
        if cand.shape != want.shape or torch.allclose(cand, want, **_MATCH):
            continue                                     # this case cannot tell the mistake from the answer
        if torch.allclose(g, cand, **_MATCH):
            raise AssertionError(f"{name} is wrong: {why}.")
    diff = float((g - want).abs().max())
    if angles and diff < 1e-2:
        raise AssertionError(f"{name} differs from the float64 reference by up to {diff:.3g}: the angles were "
                             "computed in float32 and cast afterwards (a float32 position times theta loses "
                             "digits) -- compute positions, frequencies and angles in float64, cast at the end.")
    checks.check_close(g, want, name, hint=hint)


def check_tensor_on(t: Any, device: str, dtype: torch.dtype, name: str) -> None:
    """t is a tensor on ``device`` with ``dtype``."""
    if not isinstance(t, Tensor):
        raise AssertionError(f"{name} should be a torch.Tensor but is {type(t).__name__}.")
    if t.device.type != torch.device(device).type:
        raise AssertionError(f"{name} is on {t.device}, not on {device}: create every tensor with device=device "
                             "(torch.arange(..., device=device)).")
    if t.dtype != dtype:
        raise AssertionError(f"{name} has dtype {t.dtype}, not {dtype}: compute in float64 and cast to the "
                             "requested dtype at the end (dtype=None means torch.get_default_dtype()).")


def _pair(res: Any, name: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(res, tuple) and len(res) == 2 and all(isinstance(t, Tensor) for t in res)):
        raise AssertionError(f"{name} must return a pair of tensors (cos, sin), not {type(res).__name__}.")
    return res


# ----------------------------------------------------------------------------- part 1: sinusoidal
def check_sinusoidal(fn: Callable[..., Any], cases: Sequence[tuple[int, int, float]]) -> None:
    """sinusoidal_encoding(n, d, base, dtype=float64) against Vaswani 3.5, with the usual mistakes named."""
    for n, d, base in cases:
        got = checks._call_learner(fn, n, d, base, dtype=F64)
        name = f"sinusoidal_encoding({n}, {d}, base={base:g})"
        h = d // 2
        _compare(got, ref_sinusoidal(n, d, base), name, [
            (lambda: ref_sinusoidal(n, d, 10000.0), "the base argument is ignored (10000 was used)"),
            (lambda: ref_sinusoidal(n, d, base, concatenated=True),
             "it lays out all the sines then all the cosines ([sin | cos]); Vaswani 3.5 interleaves them: "
             "sin in the even columns 2i, cos in the odd columns 2i + 1"),
            (lambda: ref_sinusoidal(n, d, base, concatenated=True, freq_denominator=h - 1),
             "these are fairseq's / tensor2tensor's encodings ([sin | cos] with log(10000)/(half - 1)); "
             "the paper interleaves sin and cos with the frequency base^(-2i/d_model)"),
            (lambda: ref_sinusoidal(n, d, base, swap=True),
             "sin and cos are swapped: PE[p, 2i] is the sine and PE[p, 2i + 1] the cosine"),
            (lambda: ref_sinusoidal(n, d, base, freq_denominator=d),
             "the exponent is i/d_model with i the index of the (sin, cos) pair: it is 2i/d_model (the even "
             "column index over d_model), so columns 2i and 2i + 1 share the frequency base^(-2i/d_model)"),
            (lambda: ref_sinusoidal(n, d, base, freq_denominator=d / 4),
             "the exponent counts 2i twice (4i/d_model): columns 2i and 2i + 1 share the frequency "
             "base^(-2i/d_model), with i the index of the pair"),
            (lambda: ref_sinusoidal(n, d, base, first=1),
             "positions are counted from 1: the first row is position 0 (sin 0 = 0, cos 0 = 1)"),
        ], hint="PE[p, 2i] = sin(p / base^(2i/d_model)), PE[p, 2i + 1] = cos(p / base^(2i/d_model))", angles=True)


# ----------------------------------------------------------------------------- part 2: RoPE
def check_rope_cos_sin(fn: Callable[..., Any], cases: Sequence[tuple[int, int, float, int]]) -> None:
    """rope_cos_sin(n, head_dim, base, offset=, dtype=float64): rotate-half layout, positions from offset."""
    for n, hd, base, off in cases:
        got = _pair(checks._call_learner(fn, n, hd, base, offset=off, dtype=F64), "rope_cos_sin")
        name = f"rope_cos_sin({n}, {hd}, base={base:g}, offset={off})"
        pos = torch.arange(off, off + n)
        want = ref_cos_sin(pos, hd, base)
        for idx, what in enumerate(["cos", "sin"]):
            mistakes = [
                (lambda: ref_cos_sin(torch.arange(n), hd, base)[idx],
                 "the offset is ignored: the rows are positions offset .. offset + n_positions - 1 (a token "
                 "decoded after a KV cache of `offset` tokens is not at position 0)"),
                (lambda: ref_cos_sin(pos + 1, hd, base)[idx],
                 "positions are counted from 1 (or from offset + 1): the first row is position offset"),
                (lambda: ref_cos_sin(pos, hd, base, layout="interleaved")[idx],
                 "this is the interleaved layout (each angle repeated twice in a row, repeat_interleave); the "
                 "rotate-half layout is cat(angles, angles): column i and column i + head_dim/2 share theta_i"),
                (lambda: ref_cos_sin(pos, hd, base, exponent="i/d")[idx],
                 "the exponent is i/head_dim: theta_i = base^(-2i/head_dim) for pair i = 0 .. head_dim/2 - 1 "
                 "(torch.arange(0, head_dim, 2) / head_dim)"),
                (lambda: ref_cos_sin(pos, hd, base)[1 - idx],
                 "cos and sin are swapped: return (cos, sin) in this order"),
                (lambda: ref_cos_sin(pos, hd, 10000.0)[idx], "the base argument is ignored (10000 was used)"),
            ]
            _compare(got[idx], want[idx], f"{what} of {name}", mistakes,
                     hint="cos = cat(cos(m theta), cos(m theta)) with m = offset .. offset + n - 1 and "
                     "theta_i = base^(-2i/head_dim), computed in float64", angles=True)


def check_apply_rope(fn: Callable[..., Any], x: Tensor, positions: Tensor, base: float = 10000.0) -> None:
    """apply_rope(x, cos, sin) with float64 cos, sin from the reference: values, norms, m - n property."""
    hd = x.size(-1)
    cos, sin = ref_cos_sin(positions, hd, base)
    got = checks.check_not_mutated(fn, x, cos, sin)
    a = ref_rope_angles(positions, hd, base)
    name = f"apply_rope(x {tuple(x.shape)}, cos, sin)"
    _compare(got, ref_rotate(x, a), name, [
        (lambda: ref_rotate(x, a, "interleaved"),
         "it rotates the pairs (2i, 2i + 1) (the interleaved pairing); this exercise pairs coordinate i with "
         "i + head_dim/2 (rotate-half: x * cos + rotate_half(x) * sin)"),
        (lambda: ref_rotate(x, -a),
         "it rotates by -m theta: rotate_half(x) is cat(-x2, x1), not cat(x2, -x1)"),
        (lambda: x.to(F64) * cos + torch.cat([x[..., hd // 2:], x[..., : hd // 2]], -1).to(F64) * sin,
         "rotate_half swaps the halves without the minus sign: it is cat(-x2, x1)"),
        (lambda: x.to(F64) * cos, "the rotate_half(x) * sin term is missing"),
        (lambda: x.to(F64) * cos + torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2).to(F64) * sin,
         "rotate_half pairs (2i, 2i + 1) (the interleaved pairing) while cos and sin are in the rotate-half "
         "layout: pair i with i + head_dim/2, rotate_half(x) = cat(-x2, x1) over the two halves"),
    ], hint="x' = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1)")
    norms = got.detach().to(F64).norm(dim=-1)
    if not torch.allclose(norms, x.to(F64).norm(dim=-1), atol=1e-9, rtol=1e-9):
        raise AssertionError(f"{name} changes the length of the vectors: a rotation preserves norms.")


def check_rope_relative(fn: Callable[..., Any], cos_sin: Callable[..., Any], head_dim: int,
                        pairs: Sequence[tuple[int, int]]) -> None:
    """With the submission's own cos/sin: (R_m q).(R_n k) is the same for pairs with the same m - n."""
    torch.manual_seed(12)
    q, k = torch.randn(head_dim, dtype=F64), torch.randn(head_dim, dtype=F64)
    top = max(max(p) for p in pairs) + 1
    cos, sin = _pair(checks._call_learner(cos_sin, top, head_dim, dtype=F64), "rope_cos_sin")
    qr = checks._call_learner(fn, q.expand(top, head_dim), cos, sin)
    kr = checks._call_learner(fn, k.expand(top, head_dim), cos, sin)
    scores = [float(qr[m] @ kr[n]) for m, n in pairs]
    d = {m - n for m, n in pairs}
    if len(d) == 1 and max(scores) - min(scores) > 1e-9 * max(1.0, abs(scores[0])):
        raise AssertionError(f"q_m . k_n differs between the position pairs {list(pairs)} (all {d.pop()} apart): "
                             f"{[round(s, 6) for s in scores]} -- after RoPE the score must depend only on m - n; "
                             "are cos and sin laid out for the same pairing as apply_rope?")


# ----------------------------------------------------------------------------- part 3: ALiBi
def check_alibi_slopes(fn: Callable[..., Any], counts: Sequence[int]) -> None:
    """alibi_slopes(n) against the reference get_slopes."""
    for n in counts:
        got = checks._call_learner(fn, n, dtype=F64)
        if isinstance(got, (list, tuple)):
            raise AssertionError(f"alibi_slopes({n}) returned a {type(got).__name__}: return a tensor of shape (n_head,).")
        want = torch.tensor(ref_slopes(n), dtype=F64)
        p = 2 ** math.floor(math.log2(n))
        _compare(got, want, f"alibi_slopes({n})", [
            (lambda: want.flip(0), "the slopes are in reverse head order: head 0 gets the steepest slope 2^(-8/n)"),
            (lambda: torch.tensor([2.0 ** (-8 * k / n) for k in range(1, n + 1)], dtype=F64),
             "for a head count that is not a power of two the reference code does not use the paper's 2^(-8/n) "
             f"sequence: it takes the {p} slopes of {p} heads, then every other slope of {2 * p} heads"),
            (lambda: -want, "the slopes are negative: they are positive, the bias is -slope * distance"),
            (lambda: torch.tensor(ref_slopes(p) + ref_slopes(2 * p)[1::2][: n - p], dtype=F64),
             f"the extra slopes are taken at the odd places of the {2 * p}-head sequence: take [0::2]"),
            (lambda: torch.tensor(ref_slopes(2 * p)[:n], dtype=F64),
             f"these are the first {n} slopes of {2 * p} heads: the reference takes the {p} slopes of {p} "
             f"heads, then every other slope of {2 * p} heads"),
        ], hint="slopes of n = 2^k heads: 2^(-8/n), 2^(-16/n), ..., 2^(-8)")


def check_alibi_bias(fn: Callable[..., Any], cases: Sequence[tuple[int, int, int | None]]) -> None:
    """alibi_bias(n_head, L, S, dtype=float64) against the reference, bottom-right aligned, future unmasked."""
    for h, L, S in cases:
        got = checks._call_learner(fn, h, L, S, dtype=F64)
        S_ = L if S is None else S
        name = f"alibi_bias({h}, {L}, {S})"
        want = ref_alibi_bias(h, L, S_)
        slopes = torch.tensor(ref_slopes(h), dtype=F64)[:, None, None]
        rel = torch.arange(S_, dtype=F64)[None, :] - torch.arange(L, dtype=F64)[:, None]        # top-left j - i
        past = torch.arange(S_)[None, :] <= torch.arange(L)[:, None] + (S_ - L)
        checks.check_shape(got, want.shape, name, hint="the bias is (n_head, n_queries, n_keys)")
        g = got.detach().cpu().to(F64)
        if (torch.allclose(g[:, past], want[:, past], atol=checks.ATOL64, rtol=checks.RTOL64)
                and not torch.allclose(g, want, atol=checks.ATOL64, rtol=checks.RTOL64)):
            raise AssertionError(f"{name} is right on the past keys but not on the future ones: the bias leaves the "
                                 "future unmasked, slope * (j - i') > 0 there; the caller combines it with the "
                                 "causal mask (is_causal=True).")
        _compare(got, want, name, [
            (lambda: -want, "the sign is flipped: a key d tokens before the query gets -slope * d (a penalty), "
             "not +slope * d"),
            (lambda: slopes * rel, "the bias is aligned top-left: query i is position i + S - L (the queries are "
             "the last L of the S positions), as the causal mask"),
            (lambda: -(want.abs()), "the bias is -slope * |i - j|, symmetric: keys after the query get "
             "+slope * distance here (the bias leaves the future to the causal mask)"),
            (lambda: want.flip(0), "the heads are in reverse order: head 0 gets the steepest slope"),
            (lambda: slopes * torch.arange(S_, dtype=F64).expand(L, S_),
             "this is Bloom's form slope * j (equal after a causal softmax, but not the bias asked): the bias is "
             "slope * (j - i'), 0 on the diagonal"),
        ], hint="bias[h, i, j] = slope_h * (j - (i + S - L))")


def check_alibi_attention(bias_fn: Callable[..., Any], attention: Callable[..., Any], n_head: int, L: int,
                          S: int | None = None) -> None:
    """The bias through the library's attention with is_causal=True: rows sum to 1, future 0, gradients."""
    S_ = L if S is None else S
    torch.manual_seed(13)
    q = torch.randn(2, n_head, L, 8, dtype=F64, requires_grad=True)
    k = torch.randn(2, n_head, S_, 8, dtype=F64, requires_grad=True)
    v = torch.randn(2, n_head, S_, 8, dtype=F64, requires_grad=True)
    bias = checks._call_learner(bias_fn, n_head, L, S, dtype=F64)
    checks.check_shape(bias, (n_head, L, S_), f"alibi_bias({n_head}, {L}, {S})")
    if not bias.is_floating_point():
        raise AssertionError("alibi_bias must be a float tensor (an additive mask), not a boolean one.")
    if torch.isnan(bias).any() or (bias == float("inf")).any():
        raise AssertionError("alibi_bias holds NaN or +inf: the bias is finite (slope * (j - i')).")
    out, w = attention(q, k, v, bias, is_causal=True)
    allowed = torch.arange(S_)[None, :] <= torch.arange(L)[:, None] + (S_ - L)
    checks.check_rows_sum_to_one(w, allowed, "weights with the ALiBi bias and is_causal=True")
    checks.check_masked_weights_zero(w, allowed, "weights with the ALiBi bias and is_causal=True")
    s = (q @ k.transpose(-2, -1)) / math.sqrt(8) + ref_alibi_bias(n_head, L, S_)
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(nan=0.0) @ v
    checks.check_close(out, ref, "the attention output with the ALiBi bias",
                       hint="the weights must equal softmax(q k^T / sqrt(d) + slope * (j - i')) over the past keys")
    checks.check_backward_runs(lambda: out.sum())
    checks.check_grads_present({"q": q, "k": k, "v": v})


# ----------------------------------------------------------------------------- part 4: explicit positions
def check_rope_cos_sin_at(fn: Callable[..., Any], positions: Tensor, head_dim: int, base: float = 10000.0,
                          scaling: float = 1.0) -> None:
    """rope_cos_sin_at(positions, head_dim, base, scaling=, dtype=float64) against the reference."""
    got = _pair(checks._call_learner(fn, positions, head_dim, base, scaling=scaling, dtype=F64),
                "rope_cos_sin_at")
    name = f"rope_cos_sin_at(positions {tuple(positions.shape)}, {head_dim}, base={base:g}, scaling={scaling:g})"
    want = ref_cos_sin(positions, head_dim, base, scaling=scaling)
    for idx, what in enumerate(["cos", "sin"]):
        mistakes = [
            (lambda: ref_cos_sin(positions * scaling ** 2, head_dim, base, scaling=scaling)[idx],
             "the positions are multiplied by the scaling factor: position interpolation divides them "
             "(m / scaling), so that a longer context maps into the trained range of angles"),
            (lambda: ref_cos_sin(positions, head_dim, base * scaling)[idx],
             "the scaling factor was applied to the base: linear scaling (position interpolation) divides the "
             "positions, base^(-2i/d) stays"),
            (lambda: ref_cos_sin(positions, head_dim, base)[idx], "the scaling argument is ignored"),
            (lambda: ref_cos_sin(positions, head_dim, base, scaling=scaling, layout="interleaved")[idx],
             "this is the interleaved layout; use the rotate-half layout cat(angles, angles)"),
            (lambda: ref_cos_sin(positions, head_dim, base, scaling=scaling, exponent="i/d")[idx],
             "the exponent is i/head_dim: theta_i = base^(-2i/head_dim)"),
            (lambda: ref_cos_sin(positions, head_dim, base, scaling=scaling)[1 - idx],
             "cos and sin are swapped: return (cos, sin) in this order"),
            (lambda: ref_cos_sin(positions + 1, head_dim, base, scaling=scaling)[idx],
             "the positions are shifted by one: use them as given"),
        ]
        _compare(got[idx], want[idx], f"{what} of {name}", mistakes,
                 hint="cos[..., :] = cat(cos(m theta), cos(m theta)) with m = positions / scaling, one row per "
                 "position, shape positions.shape + (head_dim,)", angles=True)


# ----------------------------------------------------------------------------- part 5: the module
def _call_module(module: Any, *args: Any, **kwargs: Any) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    try:
        res = checks._call_learner(module, *args, **kwargs)
    except (RuntimeError, AssertionError) as exc:
        pos = kwargs.get("positions")
        if pos is not None and pos.dim() == 2 and "must match the size" in str(exc):
            raise AssertionError("with positions of shape (B, L), cos and sin are (B, L, head_dim) and meet q, k of "
                                 "shape (B, n_head, L, head_dim): add the head axis, (B, 1, L, head_dim), before "
                                 "rotating.") from None
        raise
    if not (isinstance(res, tuple) and len(res) == 2 and isinstance(res[0], Tensor)
            and isinstance(res[1], tuple) and len(res[1]) == 2):
        raise AssertionError("RotarySelfAttention must return (out, (k, v)): the output and the keys and values "
                             "of every position seen so far (the cache to pass as past_kv next time).")
    return res


def check_rotary_layers(module: Any, d_model: int, bias: bool = True) -> None:
    for n in "qkvo":
        checks.check_linear(module, n, d_model, d_model, bias=bias)


_VARIANTS = [
    ("rope_v", "the values are rotated too: RoPE rotates queries and keys only (it is about which keys match, "
               "not about what is read)"),
    ("q_only", "only the queries are rotated: rotate the keys too, each at its own position"),
    ("no_rope", "no rotation is applied: rotate q and k with RoPE after the projection, before the scores"),
    ("interleaved", "the pairs (2i, 2i + 1) are rotated (interleaved pairing): this module pairs i with "
                    "i + head_dim/2 (rotate-half)"),
    ("no_offset", "the new tokens are rotated from position 0: with past_kv of S_past tokens they are at "
                  "positions S_past .. S_past + L - 1 (the offset every KV cache needs)"),
    ("mixed", "the queries and the keys are rotated with different pairings (rotate-half for one, interleaved for "
              "the other): the score is then no longer a function of m - n; use rotate-half for both"),
    ("rerotate_cache", "the cached keys are rotated again: past_kv holds keys already rotated at their positions, "
                       "append the new rotated keys after them"),
    ("no_mask", "attn_mask is ignored: combine it with the causal mask by AND (True = may attend)"),
    ("top_left", "the causal mask is aligned top-left: query i is position i + S - L of the S keys"),
    ("no_scale", "the scores are not divided by sqrt(head_dim)"),
]


def _explain(module: Any, n_head: int, x: Tensor, got: Tensor, want: Tensor, name: str, **kw: Any) -> None:
    if torch.allclose(got.detach().to(F64), want, atol=checks.ATOL64, rtol=checks.RTOL64):
        return
    for variant, why in _VARIANTS:
        with torch.no_grad():
            cand, _ = ref_rotary_attention(module, n_head, x, variant=variant, **kw)
        if torch.allclose(got.detach().to(F64), cand, **_MATCH):
            raise AssertionError(f"{name} is wrong: {why}.")
    checks.check_close(got, want, name, hint="q and k are rotated (rotate-half) at their positions after the "
                       "projection, v is not; the scores are causal (bottom-right), scaled by 1/sqrt(head_dim)")


def check_rotary_reference(module: Any, n_head: int, x: Tensor, positions: Tensor | None = None,
                           attn_mask: Tensor | None = None, past_kv: tuple[Tensor, Tensor] | None = None,
                           base: float = 10000.0) -> None:
    """Output, present_kv and gradients (x and the cache) against the float64 reference."""
    kw = {"positions": positions, "attn_mask": attn_mask, "base": base}
    leaves = {"x": x.detach().clone().requires_grad_()}
    if past_kv is not None:
        leaves["past_k"] = past_kv[0].detach().clone().requires_grad_()
        leaves["past_v"] = past_kv[1].detach().clone().requires_grad_()
    mine_past = (leaves["past_k"], leaves["past_v"]) if past_kv is not None else None
    out, present = _call_module(module, leaves["x"], positions=positions, attn_mask=attn_mask, past_kv=mine_past)
    B, L, D = x.shape
    checks.check_shape(out, (B, L, D), "out")
    theirs = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    ref_past = (theirs["past_k"], theirs["past_v"]) if past_kv is not None else None
    want, (wk, wv) = ref_rotary_attention(module, n_head, theirs["x"], past_kv=ref_past, **kw)
    _explain(module, n_head, x, out, want.detach(), "out", past_kv=past_kv, **kw)
    checks.check_close(present[0], wk.detach(), "present_kv[0] (keys)",
                       hint="the cache holds the rotated keys of every position so far: cat(past_k, RoPE(k))")
    checks.check_close(present[1], wv.detach(), "present_kv[1] (values)",
                       hint="the cache holds the (unrotated) values of every position so far: cat(past_v, v)")
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    checks.check_backward_runs(lambda: (out * proj).sum())
    (want * proj).sum().backward()
    checks.check_grads_close({n: t for n, t in leaves.items()}, {n: t.grad for n, t in theirs.items()})


def check_rotary_translation(module: Any, x: Tensor, shift: int) -> None:
    """Shifting every position by the same amount leaves the output unchanged (RoPE is relative)."""
    L = x.size(1)
    with torch.no_grad():
        a, _ = _call_module(module, x, positions=torch.arange(L))
        b, _ = _call_module(module, x, positions=torch.arange(shift, shift + L))
    if not torch.allclose(a, b, atol=1e-9, rtol=1e-9):
        raise AssertionError(f"shifting every position by {shift} changes the output (by up to "
                             f"{float((a - b).abs().max()):.3g}): with RoPE on q and k only, the scores depend on "
                             "m - n and the output cannot change -- are the values rotated, or the positions "
                             "argument ignored?")


def check_rotary_cache(module: Any, x: Tensor, chunks: Sequence[int]) -> None:
    """Decoding chunk by chunk with past_kv equals one full pass."""
    with torch.no_grad():
        full, _ = _call_module(module, x)
        past, start = None, 0
        for n in chunks:
            out, past = _call_module(module, x[:, start:start + n], past_kv=past)
            if not torch.allclose(out, full[:, start:start + n], atol=1e-9, rtol=1e-9):
                raise AssertionError(
                    f"decoding tokens {start} .. {start + n - 1} after a cache of {start} gives another output "
                    f"than the full pass (by up to {float((out - full[:, start:start + n]).abs().max()):.3g}): "
                    "without positions, the new tokens are at positions len(cache) .. len(cache) + L - 1 (the "
                    "offset), the cached keys are already rotated (do not rotate them again), and the causal "
                    "mask is aligned bottom-right.")
            start += n


def check_rotary_left_padding(module: Any, x: Tensor, lengths: Sequence[int]) -> None:
    """Left-padded rows with explicit positions and a key-padding mask give each row's unpadded output."""
    B, L, D = x.shape
    n_pad = L - torch.tensor(list(lengths))
    positions = (torch.arange(L)[None, :] - n_pad[:, None]).clamp(min=0)              # (B, L)
    real = torch.arange(L)[None, :] >= n_pad[:, None]                                  # (B, L)
    with torch.no_grad():
        out, _ = _call_module(module, x, positions=positions, attn_mask=real[:, None, None, :])
        for b, n in enumerate(lengths):
            alone, _ = _call_module(module, x[b:b + 1, L - n:])
            if not torch.allclose(out[b, L - n:], alone[0], atol=1e-9, rtol=1e-9):
                raise AssertionError(
                    f"row {b}, left-padded with {L - n} tokens, differs from the same {n} tokens alone: the "
                    "positions argument (B, L) gives each row its own positions (the first real token is 0) "
                    "and attn_mask (True = may attend) is combined with the causal mask by AND.")


def check_rounded(got: Any, want: Tensor, dtype: torch.dtype, name: str) -> None:
    """got (in ``dtype``) is the float64 ``want`` rounded to ``dtype`` (within one rounding of it)."""
    check_tensor_on(got, "cpu", dtype, name)
    checks.check_shape(got, want.shape, name)
    diff = float((got.to(F64) - want).abs().max()) if want.numel() else 0.0
    if diff > max(0.75 * torch.finfo(dtype).eps, 1e-12) * max(1.0, float(want.abs().max())):
        raise AssertionError(f"{name} differs from the float64 values rounded to {dtype} by up to {diff:.3g}: compute "
                             "the angles in float64 and cast at the end (angles computed in float32 lose digits at "
                             "large positions).")
