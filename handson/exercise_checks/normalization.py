"""Checks with diagnoses for the normalization exercise.

The learner's norms are compared with ``nn.LayerNorm`` / ``nn.RMSNorm`` holding the same parameters
(outputs and gradients with respect to the input, the weight and the bias, float64 and float32); a
mismatch is explained by the known wrong variant it matches (unbiased variance, eps outside the
square root, statistics over the wrong dimensions, a missing gain or shift, a fixed eps instead of
``torch.finfo(x.dtype).eps``, the mean subtracted in RMSNorm, float32 arithmetic, ...). Residual
sub-blocks are checked against ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``.
Like ``handson.checks``, every failure is an AssertionError with one sentence naming the likely cause.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from handson import checks

__all__ = [
    "norm_delegates",
    "check_parameters",
    "check_layernorm",
    "check_rmsnorm",
    "check_gemma_rmsnorm",
    "check_per_vector",
    "check_shape_mismatch_raises",
    "check_residual",
    "check_stack",
]


def norm_delegates(library: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ready-made norms the exercise refuses: PyTorch's, plus the given library pieces."""
    import torch.nn as nn
    import torch.nn.functional as F

    out = {"nn.LayerNorm": nn.LayerNorm, "F.layer_norm": F.layer_norm, "torch.layer_norm": torch.layer_norm,
           "torch.native_layer_norm": torch.native_layer_norm, "nn.RMSNorm": nn.RMSNorm,
           "F.rms_norm": F.rms_norm, "torch.rms_norm": torch.rms_norm, "nn.GroupNorm": nn.GroupNorm,
           "F.group_norm": F.group_norm, "F.batch_norm": F.batch_norm, "F.instance_norm": F.instance_norm}
    out.update(library or {})
    return out


def _shape(normalized_shape: int | tuple[int, ...]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def check_parameters(module: Any, shape: tuple[int, ...], *, weight_init: float = 1.0, bias: bool | None = None,
                     what: str = "the module") -> None:
    """``module.weight`` a Parameter of ``shape`` filled with ``weight_init``; ``module.bias`` zeros of
    ``shape`` when ``bias`` is True, None when False (and no bias parameter when ``bias`` is None);
    no other parameter."""
    import torch.nn as nn

    shape = tuple(shape)
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter):
        raise AssertionError(f"{what} has no nn.Parameter named weight (the gain): create it in __init__ as "
                             f"nn.Parameter(torch.ones({shape})) so that it is learned and saved.")
    if tuple(w.shape) != shape:
        raise AssertionError(f"{what}.weight has shape {tuple(w.shape)} instead of {shape}: one gain per "
                             "normalised feature, the shape given as normalized_shape.")
    if w.device.type != "meta" and not torch.all(w.detach() == weight_init):
        raise AssertionError(f"{what}.weight is not initialised at {weight_init:g} everywhere: the weight was "
                             f"initialised wrong (it must start at {weight_init:g}, so that the fresh module is "
                             "the plain normalisation).")
    expected = {"weight"}
    b = getattr(module, "bias", None)
    if bias is True:
        expected.add("bias")
        if not isinstance(b, nn.Parameter):
            raise AssertionError(f"{what} has no nn.Parameter named bias although bias=True: create "
                                 f"nn.Parameter(torch.zeros({shape})).")
        if tuple(b.shape) != shape:
            raise AssertionError(f"{what}.bias has shape {tuple(b.shape)} instead of {shape}.")
        if b.device.type != "meta" and not torch.all(b.detach() == 0):
            raise AssertionError(f"{what}.bias is not initialised at zeros: the shift must start at 0.")
    elif bias is False:
        if b is not None:
            raise AssertionError(f"{what}.bias is {type(b).__name__}, not None, although bias=False: a bias "
                                 "was created when bias=False (set self.bias = None, or "
                                 "self.register_parameter('bias', None), as nn.LayerNorm does).")
    names = {n for n, _ in module.named_parameters()}
    if names != expected:
        extra = sorted(names - expected)
        raise AssertionError(f"{what} has the parameters {sorted(names)} instead of {sorted(expected)}: "
                             f"remove {extra} (a bias was created when it should not be?)." if extra else
                             f"{what} lacks the parameters {sorted(expected - names)}.")


def _stats_dims(x: Tensor, k: int) -> tuple[int, ...]:
    return tuple(range(x.dim() - k, x.dim()))


def _ln(x: Tensor, w: Tensor, b: Tensor | None, eps: float, dims: tuple[int, ...], correction: int = 0,
        eps_outside: bool = False, use_w: bool = True, use_b: bool = True) -> Tensor:
    mu = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, correction=correction)
    den = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
    y = (x - mu) / den
    if use_w:
        y = y * w
    if use_b and b is not None:
        y = y + b
    return y


def _rms(x: Tensor, w: Tensor, eps: float, dims: tuple[int, ...], centre: bool = False,
         eps_outside: bool = False, l2: bool = False, use_w: bool = True, offset: float = 0.0) -> Tensor:
    if centre:
        x = x - x.mean(dims, keepdim=True)
    ms = x.pow(2).sum(dims, keepdim=True) if l2 else x.pow(2).mean(dims, keepdim=True)
    den = ms.sqrt() + eps if eps_outside else (ms + eps).sqrt()
    y = x / den
    return y * (offset + w) if use_w else y


def _wrong_dims(x: Tensor, k: int) -> list[tuple[str, tuple[int, ...]]]:
    n = x.dim()
    right = _stats_dims(x, k)
    out = []
    if k > 1:
        out.append(("statistics over the last dimension only, although normalized_shape has "
                    f"{k} dimensions (normalise over all the trailing dims of normalized_shape)", (n - 1,)))
    if n >= 2:
        out.append(("statistics over the batch dimension (dim 0) too: each vector must be normalised on "
                    "its own, over its features only", (0,) + right))
        out.append(("statistics over the batch dimension (dim 0) instead of the features", (0,)))
    if n >= 3:
        out.append(("statistics over the positions (sequence dimension) too: each vector must be normalised "
                    "on its own, over its features only", (n - k - 1,) + right))
        out.append(("statistics over the positions (sequence dimension) instead of the features", (n - k - 1,)))
        out.append(("statistics over the whole tensor (batch and positions included) instead of each vector's "
                    "features", tuple(range(n))))
    return [(m, d) for m, d in out if d != right]


def _explain(y: Tensor, variants: list[tuple[str, Callable[[], Tensor]]], tol: float = 1e-9) -> str | None:
    y = y.detach()
    for msg, make in variants:
        try:
            v = make()
        except Exception:
            continue
        if v.shape == y.shape and torch.allclose(y.to(v.dtype), v, atol=tol, rtol=tol):
            return msg
    return None


def _layernorm_variants(x: Tensor, w: Tensor, b: Tensor | None, eps: float, k: int) -> list:
    dims = _stats_dims(x, k)
    out = [
        ("unbiased standard deviation with eps added outside the square root (the Annotated Transformer's "
         "LayerNorm): use the biased variance (divide by d) and sqrt(var + eps)",
         lambda: _ln(x, w, b, eps, dims, correction=1, eps_outside=True)),
        ("unbiased variance (divided by d - 1, torch.var's default): LayerNorm uses the biased variance, "
         "divided by d (correction=0 or unbiased=False)", lambda: _ln(x, w, b, eps, dims, correction=1)),
        ("eps outside the square root, (x - mean) / (std + eps): it belongs inside, (x - mean) / sqrt(var + eps)",
         lambda: _ln(x, w, b, eps, dims, eps_outside=True)),
        ("the weight (gain) is not applied: multiply the normalised vector by self.weight",
         lambda: _ln(x, w, b, eps, dims, use_w=False)),
        ("the bias (shift) is not added: add self.bias after the gain",
         lambda: _ln(x, w, b, eps, dims, use_b=False)),
        ("the weight and the bias are not applied (forgetting the weight/bias): y = normalised * weight + bias",
         lambda: _ln(x, w, b, eps, dims, use_w=False, use_b=False)),
        ("eps is ignored: add self.eps to the variance inside the square root",
         lambda: _ln(x, w, b, 0.0, dims)),
        ("eps fixed at 1e-5 instead of the eps given to the constructor",
         lambda: _ln(x, w, b, 1e-5, dims)),
        ("the mean is not subtracted (that would be RMSNorm): LayerNorm centres, (x - mean) / sqrt(var + eps)",
         lambda: _rms(x, w, eps, dims) + (0 if b is None else b)),
    ]
    for msg, d in _wrong_dims(x, k):
        out.append((msg, lambda d=d: _ln(x, w, b, eps, d)))
    if x.dtype == torch.float64:
        out.append(("the computation ran in float32 (computing in float32 then casting back): keep the "
                    "input's dtype, float64 in gives float64 arithmetic",
                    lambda: _ln(x.float(), w.float(), None if b is None else b.float(), eps, dims).double()))
    return out


def _rmsnorm_variants(x: Tensor, w: Tensor, eps: float | None, k: int, offset: float = 0.0) -> list:
    dims = _stats_dims(x, k)
    e = torch.finfo(x.dtype).eps if eps is None else eps
    out = [
        ("the mean is subtracted (RMSNorm subtracting the mean is LayerNorm): RMSNorm divides x itself by "
         "sqrt(mean(x^2) + eps)", lambda: _rms(x, w, e, dims, centre=True, offset=offset)),
        ("divides by the L2 norm sqrt(sum(x^2)) instead of the root mean square sqrt(mean(x^2)): take the mean "
         "over the features", lambda: _rms(x, w, e, dims, l2=True, offset=offset)),
        ("eps outside the square root, x / (rms + eps): it belongs inside, x / sqrt(mean(x^2) + eps)",
         lambda: _rms(x, w, e, dims, eps_outside=True, offset=offset)),
        ("the weight (gain) is not applied: multiply by " + ("(1 + self.weight)" if offset else "self.weight"),
         lambda: _rms(x, w, e, dims, use_w=False)),
        ("eps is ignored: add it to the mean square inside the square root", lambda: _rms(x, w, 0.0, dims, offset=offset)),
    ]
    if offset:
        out.insert(0, ("multiplies by self.weight instead of (1 + self.weight): Gemma's gain is 1 + weight, "
                       "with weight initialised at 0", lambda: _rms(x, w, e, dims)))
    if eps is None:
        for fixed in (1e-6, 1e-5, 1e-8, 1e-12):
            out.append((f"eps fixed at {fixed:g} although eps=None: eps=None means torch.finfo(x.dtype).eps, "
                        "the machine epsilon of the input's dtype, as nn.RMSNorm",
                        lambda fixed=fixed: _rms(x, w, fixed, dims, offset=offset)))
        if x.dtype != torch.float32:
            out.append(("eps=None used float32's machine epsilon: take torch.finfo(x.dtype).eps of the input",
                        lambda: _rms(x, w, torch.finfo(torch.float32).eps, dims, offset=offset)))
    else:
        out.append(("the given eps is ignored (torch.finfo(x.dtype).eps used instead): eps=None only means finfo",
                    lambda: _rms(x, w, torch.finfo(x.dtype).eps, dims, offset=offset)))
    for msg, d in _wrong_dims(x, k):
        out.append((msg, lambda d=d: _rms(x, w, e, d, offset=offset)))
    if x.dtype == torch.float64:
        out.append(("the computation ran in float32 (computing in float32 then casting back, as Hugging Face's "
                    "Llama does): keep the input's dtype, float64 in gives float64 arithmetic",
                    lambda: _rms(x.float(), w.float(), torch.finfo(torch.float32).eps if eps is None else eps,
                                 dims, offset=offset).double()))
        out.append(("the computation ran in float32 (computing in float32 then casting back): keep the input's "
                    "dtype, float64 in gives float64 arithmetic",
                    lambda: _rms(x.float(), w.float(), e, dims, offset=offset).double()))
    return out


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-10, 1e-8) if dtype == torch.float64 else (2e-5, 1e-4)


def _randomise(module: Any, gen: torch.Generator, offset: float = 0.0) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(offset + torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _compare(kind: str, module: Any, ref: Any, x: Tensor, variants: list, forbidden: Mapping[str, Any],
             what: str, params: tuple[str, ...]) -> None:
    """Outputs (no delegation, input unchanged, dtype kept) and gradients of module vs ref."""
    atol, rtol = _tolerances(x.dtype)
    y = checks.check_no_delegation(lambda t: checks.check_not_mutated(module, t), x.clone(), forbidden=forbidden,
                                   asked=f"{kind} forward")
    checks.check_shape(y, tuple(x.shape), f"{what}(x)", hint="a norm keeps the input's shape")
    checks.check_dtype(y, x.dtype, f"{what}(x)")
    with torch.no_grad():
        expected = ref(x)
    if not torch.allclose(y.detach(), expected, atol=atol, rtol=rtol):
        why = _explain(y, variants, tol=1e-9 if x.dtype == torch.float64 else 1e-6)
        if why:
            raise AssertionError(f"{what}(x) differs from the reference: {why}.")
        checks.check_close(y, expected, f"{what}(x) for x of shape {tuple(x.shape)}",
                           hint=f"compare your formula with {kind}'s, term by term", atol=atol, rtol=rtol)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    for m in (module, ref):
        m.zero_grad(set_to_none=True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(x.dtype)
    checks.check_backward_runs(lambda: (checks._call_learner(module, x1) * g).sum())
    (ref(x2) * g).sum().backward()
    inputs = {"x": x1, **{f"{what}.{n}": getattr(module, n) for n in params}}
    grads = {"x": x2.grad, **{f"{what}.{n}": getattr(ref, n).grad for n in params}}
    checks.check_grads_close(inputs, grads, atol=atol, rtol=rtol)


def check_layernorm(cls: Any, normalized_shape: int | tuple[int, ...], x: Tensor, *, eps: float | None = None,
                    bias: bool = True, forbidden: Mapping[str, Any], seed: int = 0) -> None:
    """``cls(normalized_shape[, eps=eps], bias=bias)`` against ``nn.LayerNorm`` holding the same random
    parameters, in ``x``'s dtype: parameters at initialisation, outputs, gradients (x, weight, bias)."""
    import torch.nn as nn

    shape = _shape(normalized_shape)
    kwargs = {"bias": bias} if eps is None else {"eps": eps, "bias": bias}
    what = f"LayerNorm({normalized_shape!r}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})"
    module = checks._call_learner(cls, normalized_shape, **kwargs)
    check_parameters(module, shape, bias=bias, what=what)
    module = module.to(x.dtype)
    _randomise(module, torch.Generator().manual_seed(seed))
    e = 1e-5 if eps is None else eps
    ref = nn.LayerNorm(normalized_shape, eps=e, bias=bias, dtype=x.dtype)
    ref.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
    w, b = ref.weight.detach(), None if ref.bias is None else ref.bias.detach()
    params = ("weight", "bias") if bias else ("weight",)
    _compare("nn.LayerNorm", module, ref, x, _layernorm_variants(x, w, b, e, len(shape)), forbidden, what, params)


def check_rmsnorm(cls: Any, normalized_shape: int | tuple[int, ...], x: Tensor, *, eps: Any = "default",
                  forbidden: Mapping[str, Any], seed: int = 0) -> None:
    """``cls(normalized_shape[, eps=eps])`` against ``nn.RMSNorm`` with the same random weight."""
    import torch.nn as nn

    shape = _shape(normalized_shape)
    kwargs = {} if eps == "default" else {"eps": eps}
    e = None if eps == "default" else eps
    what = f"RMSNorm({normalized_shape!r}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})"
    module = checks._call_learner(cls, normalized_shape, **kwargs)
    check_parameters(module, shape, bias=None, what=what)
    module = module.to(x.dtype)
    _randomise(module, torch.Generator().manual_seed(seed))
    ref = nn.RMSNorm(normalized_shape, eps=e, dtype=x.dtype)
    ref.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
    variants = _rmsnorm_variants(x, ref.weight.detach(), e, len(shape))
    _compare("nn.RMSNorm", module, ref, x, variants, forbidden, what, ("weight",))


class _GemmaReference(torch.nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + weight), in the input's dtype (a float64 oracle)."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(x.dim() - self.weight.dim(), x.dim()))
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + self.eps) * (1 + self.weight)


def check_gemma_rmsnorm(cls: Any, normalized_shape: int | tuple[int, ...], x: Tensor, *, eps: float | None = None,
                        forbidden: Mapping[str, Any], seed: int = 0) -> None:
    """Gemma's RMSNorm: weight initialised at zeros, gain (1 + weight), default eps 1e-6."""
    shape = _shape(normalized_shape)
    kwargs = {} if eps is None else {"eps": eps}
    e = 1e-6 if eps is None else eps
    what = f"GemmaRMSNorm({normalized_shape!r}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})"
    module = checks._call_learner(cls, normalized_shape, **kwargs)
    check_parameters(module, shape, weight_init=0.0, bias=None, what=what)
    module = module.to(x.dtype)
    _randomise(module, torch.Generator().manual_seed(seed))
    ref = _GemmaReference(module.weight.detach(), e).to(x.dtype)
    w = ref.weight.detach()
    variants = _rmsnorm_variants(x, w, e, len(shape), offset=1.0)
    variants.insert(1, ("eps fixed at torch.finfo(x.dtype).eps (nn.RMSNorm's default) instead of Gemma's 1e-6 "
                        "(or the eps given)", lambda: _rms(x, w, torch.finfo(x.dtype).eps, _stats_dims(x, len(shape)),
                                                          offset=1.0)))
    _compare("Gemma's RMSNorm", module, ref, x, variants, forbidden, what, ("weight",))


def check_per_vector(module: Any, x: Tensor, what: str = "the norm") -> None:
    """Changing one example (dim 0) or one position (dim 1) of ``x`` (B, L, ...) leaves every other
    example's and position's output unchanged: no batch or sequence statistics."""
    with torch.no_grad():
        y = checks._call_learner(module, x)
        gen = torch.Generator().manual_seed(3)
        other = x.clone()
        other[1] = torch.randn(other[1].shape, generator=gen, dtype=torch.float64).to(x.dtype) * 5 + 2
        y2 = checks._call_learner(module, other)
        if not torch.allclose(y2[0], y[0], atol=1e-12, rtol=0) or not torch.allclose(y2[2:], y[2:], atol=1e-12, rtol=0):
            raise AssertionError(f"changing example 1 changed the output of other examples of {what}: statistics "
                                 "over the batch dimension mix the examples; normalise each vector over its "
                                 "features only.")
        pos = x.clone()
        pos[:, 2] = torch.randn(pos[:, 2].shape, generator=gen, dtype=torch.float64).to(x.dtype) * 5 + 2
        y3 = checks._call_learner(module, pos)
        keep = [i for i in range(x.shape[1]) if i != 2]
        if not torch.allclose(y3[:, keep], y[:, keep], atol=1e-12, rtol=0):
            raise AssertionError(f"changing position 2 changed the output at other positions of {what}: statistics "
                                 "over the positions (sequence dimension) leak between tokens; normalise each "
                                 "vector over its features only.")


def check_shape_mismatch_raises(module: Any, x: Tensor, what: str) -> None:
    """``module(x)`` must raise ValueError when x's trailing dims are not the normalised shape."""
    try:
        module(x)
    except ValueError:
        return
    except Exception as exc:
        raise AssertionError(f"{what} on an input of shape {tuple(x.shape)} raised {type(exc).__name__} instead "
                             "of ValueError: check that x.shape ends with normalized_shape before computing.") from None
    raise AssertionError(f"{what} accepted an input of shape {tuple(x.shape)} whose trailing dims are not "
                         "normalized_shape: raise ValueError (it would normalise the wrong features).")


class _Counted:
    """A callable that counts its calls."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, t: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(t)


def _encoder_layer(d: int, norm_first: bool, seed: int, dtype: torch.dtype = torch.float64) -> Any:
    import torch.nn as nn

    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first,
                                       dtype=dtype).eval()
    with torch.no_grad():                       # non-trivial norms: a swapped order cannot hide
        for n in (layer.norm1, layer.norm2):
            n.weight.add_(0.5 * torch.randn_like(n.weight))
            n.bias.add_(0.5 * torch.randn_like(n.bias))
    return layer


def check_residual(residual: Callable[..., Any], norm_first: bool, *, d: int = 8, seed: int = 0,
                   forbidden: Mapping[str, Any]) -> None:
    """``residual`` composed twice with ``nn.TransformerEncoderLayer(norm_first=...)``'s own branches and
    norms equals the layer; each sublayer and norm is called exactly once per sub-block."""
    layer = _encoder_layer(d, norm_first, seed)
    x = torch.randn(2, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    sa = _Counted(lambda t: layer._sa_block(t, None, None))
    n1 = _Counted(layer.norm1)
    h = checks.check_no_delegation(lambda t: checks.check_not_mutated(residual, t, sa, n1, norm_first), x.clone(),
                                   forbidden=forbidden, asked="residual")
    if n1.calls == 0 or sa.calls == 0:
        missing = "the norm is never applied" if n1.calls == 0 else "the sublayer is never called"
        raise AssertionError(f"residual(x, sublayer, norm, norm_first={norm_first}): {missing}; pre-LN is "
                             "x + sublayer(norm(x)), post-LN norm(x + sublayer(x)).")
    if sa.calls != 1 or n1.calls != 1:
        raise AssertionError(f"residual(x, sublayer, norm, norm_first={norm_first}) called the sublayer "
                             f"{sa.calls} and the norm {n1.calls} times: each must run exactly once (a sublayer "
                             "with dropout would give different results on each call).")
    with torch.no_grad():
        ref1 = layer.norm1(x + layer._sa_block(x, None, None)) if not norm_first else x + layer._sa_block(layer.norm1(x), None, None)
    if not torch.allclose(h.detach(), ref1, atol=1e-10, rtol=1e-8):
        f, n = (lambda t: layer._sa_block(t, None, None)), layer.norm1
        with torch.no_grad():
            wrong = [("the pre/post order is swapped: norm_first=True is pre-LN x + sublayer(norm(x)), "
                      "norm_first=False post-LN norm(x + sublayer(x))",
                      lambda: (x + f(n(x))) if not norm_first else n(x + f(x))),
                     ("the norm is applied to the residual branch output, x + norm(sublayer(x)): pre-LN normalises "
                      "the sublayer's input, post-LN the sum", lambda: x + n(f(x))),
                     ("the residual starts from the normalised x, norm(x) + sublayer(norm(x)): the identity path "
                      "must carry x itself", lambda: n(x) + f(n(x))),
                     ("the residual connection is missing: the sublayer's output must be added to x",
                      lambda: n(f(x)) if not norm_first else f(n(x))),
                     ("the norm is never applied", lambda: x + f(x))]
            why = _explain(h, wrong)
        if why:
            raise AssertionError(f"residual(..., norm_first={norm_first}) differs from nn.TransformerEncoderLayer's "
                                 f"sub-block: {why}.")
        checks.check_close(h, ref1, f"residual(..., norm_first={norm_first})",
                           hint="pre-LN: x + sublayer(norm(x)); post-LN: norm(x + sublayer(x))")
    out = residual(residual(x, sa, n1, norm_first), layer._ff_block, layer.norm2, norm_first)
    with torch.no_grad():
        checks.check_close(out, layer(x), f"two residual sub-blocks vs nn.TransformerEncoderLayer(norm_first={norm_first})",
                           hint="the layer is residual(residual(x, self-attention, norm1), feed-forward, norm2)")
    # gradients flow through both paths
    xg = x.clone().requires_grad_()
    checks.check_backward_runs(lambda: residual(xg, layer._ff_block, layer.norm2, norm_first).pow(2).sum())
    xr = x.clone().requires_grad_()
    ref = (layer.norm2(xr + layer._ff_block(xr)) if not norm_first else xr + layer._ff_block(layer.norm2(xr)))
    ref.pow(2).sum().backward()
    checks.check_grads_close({"x": xg}, {"x": xr.grad})


def check_stack(residual_stack: Callable[..., Any], norm_first: bool, final: bool, *, n_layers: int = 3,
                d: int = 8, seed: int = 0, forbidden: Mapping[str, Any]) -> None:
    """``residual_stack`` over the branches and norms of ``nn.TransformerEncoder``'s layers (and its final
    norm when ``final``) equals the encoder."""
    import copy

    import torch.nn as nn

    layer = _encoder_layer(d, norm_first, seed)
    norm = None
    if final:
        norm = nn.LayerNorm(d, dtype=torch.float64)
        with torch.no_grad():
            norm.weight.add_(0.5 * torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    enc = nn.TransformerEncoder(layer, n_layers, norm=norm, enable_nested_tensor=False).eval()
    with torch.no_grad():      # the encoder deep-copies its layer: make the layers differ
        for p in enc.layers.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(seed + 7)))
    sublayers, norms = [], []
    for lay in enc.layers:
        sublayers += [_Counted(lambda t, lay=lay: lay._sa_block(t, None, None)), _Counted(lay._ff_block)]
        norms += [_Counted(lay.norm1), _Counted(lay.norm2)]
    fin = None if norm is None else _Counted(norm)
    x = torch.randn(2, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    what = f"residual_stack(x, ..., norm_first={norm_first}, final_norm={'a LayerNorm' if final else None})"
    out = checks.check_no_delegation(lambda t: checks.check_not_mutated(residual_stack, t, sublayers, norms, norm_first,
                                                                        fin), x.clone(), forbidden=forbidden,
                                     asked="residual_stack")
    calls = [s.calls for s in sublayers] + [n.calls for n in norms]
    if any(c != 1 for c in calls):
        raise AssertionError(f"{what} called the sublayers {[s.calls for s in sublayers]} and the norms "
                             f"{[n.calls for n in norms]} times: each sublayer with its own norm, exactly once, "
                             "in order.")
    if fin is not None and fin.calls != 1:
        raise AssertionError(f"{what} called the final norm {fin.calls} times: apply it once, after the last "
                             "sub-block (a pre-LN stack's residual stream is never normalised otherwise).")
    with torch.no_grad():
        expected = enc(x)
        if not torch.allclose(out.detach(), expected, atol=1e-10, rtol=1e-8):
            h = x
            for f, n in zip(sublayers, norms):
                h = (h + f.fn(n.fn(h))) if norm_first else n.fn(h + f.fn(h))
            if final and torch.allclose(out.detach(), h, atol=1e-10, rtol=1e-8):
                raise AssertionError(f"{what} never applied final_norm: apply it after the last sub-block.")
            rev = x
            for f, n in zip(reversed(sublayers), reversed(norms)):
                rev = (rev + f.fn(n.fn(rev))) if norm_first else n.fn(rev + f.fn(rev))
            if norm is not None:
                rev = norm(rev)
            if torch.allclose(out.detach(), rev, atol=1e-10, rtol=1e-8):
                raise AssertionError(f"{what} ran the sublayers in reverse order: sublayers[0] comes first.")
        checks.check_close(out, expected, f"{what} vs nn.TransformerEncoder",
                           hint="each (sublayer, norm) pair is one residual sub-block, in order, then final_norm")
    # the same modules, from the encoder's own copy, give the same gradients
    enc2 = copy.deepcopy(enc)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    subs2, norms2 = [], []
    for lay in enc2.layers:
        subs2 += [lambda t, lay=lay: lay._sa_block(t, None, None), lay._ff_block]
        norms2 += [lay.norm1, lay.norm2]
    checks.check_backward_runs(lambda: residual_stack(x1, subs2, norms2, norm_first, enc2.norm).pow(2).sum())
    enc(x2).pow(2).sum().backward()
    checks.check_grads_close({"x": x1}, {"x": x2.grad})
