"""Checks with diagnoses for the encoder exercise.

The learner's ``EncoderLayer`` / ``Encoder`` are compared with ``nn.TransformerEncoderLayer`` /
``nn.TransformerEncoder`` holding copies of the learner's own weights, in float64, outputs and the
gradients of every parameter. When an output differs, a float64 reference computed from the same
weights with one known mistake at a time names the mistake (norm placement swapped, a norm on the
branch, no residual, the tanh GELU, an inverted mask, ...). ``load_from_torch`` is checked parameter
by parameter against the slices of PyTorch's packed weights; the classifier against masked mean
pooling computed from the learner's own modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from handson.checks import (ATOL64, RTOL64, _call_learner, _max_abs_diff, check_close, check_shape,
                            copy_into_torch_mha)

__all__ = ["forbidden", "check_feedforward", "check_layer_structure", "torch_layer_from",
           "torch_encoder_from", "check_layer_matches_torch", "check_encoder_matches_torch",
           "check_padding_invariance", "check_dropout_train_only", "check_loaded",
           "random_torch_encoder", "check_padding_mask", "check_classifier_pooling",
           "check_classifier_padding"]


def forbidden() -> dict[str, Any]:
    """PyTorch's encoder and attention, which the answers must not call."""
    return {"nn.TransformerEncoderLayer": nn.TransformerEncoderLayer,
            "nn.TransformerEncoder": nn.TransformerEncoder,
            "nn.MultiheadAttention": nn.MultiheadAttention,
            "F.multi_head_attention_forward": F.multi_head_attention_forward}


# --- structure -------------------------------------------------------------------------------------

def _get(module: nn.Module, path: str, why: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AssertionError(f"{type(module).__name__} has no attribute {path!r}: {why}")
        obj = getattr(obj, part)
    return obj


def _linear(module: nn.Module, path: str, n_in: int, n_out: int, why: str) -> nn.Module:
    lin = _get(module, path, why)
    w = getattr(lin, "weight", None)
    if not isinstance(w, Tensor) or tuple(w.shape) != (n_out, n_in):
        shape = None if not isinstance(w, Tensor) else tuple(w.shape)
        raise AssertionError(f"{path} should be an nn.Linear({n_in}, {n_out}) (weight shaped ({n_out}, {n_in})) "
                             f"but its weight is {shape}: {why}")
    if getattr(lin, "bias", None) is None:
        raise AssertionError(f"{path} has no bias: every linear layer of the encoder has one, as in "
                             "nn.TransformerEncoderLayer.")
    return lin


def _norm(module: nn.Module, path: str, d: int) -> nn.Module:
    norm = _get(module, path, "the layer has two LayerNorms, norm1 (attention) and norm2 (feed-forward)")
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not isinstance(w, Tensor) or tuple(w.shape) != (d,) or not isinstance(b, Tensor):
        raise AssertionError(f"{path} should be a LayerNorm({d}) with a weight and a bias (the book's "
                             "handson.nn.normalization.LayerNorm or nn.LayerNorm).")
    return norm


def check_layer_structure(layer: nn.Module, d_model: int, d_ff: int) -> None:
    """self_attn.q/k/v/o, ff.linear1/linear2 and norm1/norm2 with the right shapes."""
    for name in "qkvo":
        _linear(layer, f"self_attn.{name}", d_model, d_model,
                "self_attn is multi-head attention with Linear layers q, k, v, o (d_model -> d_model)")
    _linear(layer, "ff.linear1", d_model, d_ff, "the feed-forward network maps d_model -> d_ff with linear1")
    _linear(layer, "ff.linear2", d_ff, d_model, "the feed-forward network maps d_ff -> d_model with linear2")
    _norm(layer, "norm1", d_model)
    _norm(layer, "norm2", d_model)


def check_feedforward(ff_cls: type, d_model: int = 6, d_ff: int = 10) -> None:
    """FeedForward: layers, relu and exact gelu, position-wise, dropout after the activation only in training."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, d_model, dtype=torch.float64)
    for act, fn in [("relu", F.relu), ("gelu", F.gelu)]:
        ff = _call_learner(ff_cls, d_model, d_ff, activation=act).double()
        _linear(ff, "linear1", d_model, d_ff, "linear1 maps d_model -> d_ff")
        _linear(ff, "linear2", d_ff, d_model, "linear2 maps d_ff -> d_model")
        with torch.no_grad():
            for p in ff.parameters():
                p.copy_(torch.randn_like(p))
        out = _call_learner(ff, x)
        lin1, lin2 = ff.linear1, ff.linear2
        expected = lin2(fn(lin1(x)))
        if not torch.allclose(out, expected, atol=ATOL64, rtol=RTOL64):
            h = lin1(x)
            candidates = {
                "uses the tanh approximation of GELU; the exact GELU is F.gelu(x) (erf), as "
                "nn.TransformerEncoderLayer's \"gelu\"": lin2(F.gelu(h, approximate="tanh")),
                "has no activation between linear1 and linear2 (two linear layers are one linear map)": lin2(h),
                f"ignores activation={act!r}: it computes the other activation": lin2(F.gelu(h) if act == "relu"
                                                                                     else F.relu(h)),
                "applies the activation after linear2 as well": fn(lin2(fn(h))),
                "applies the activation after linear2 instead of between the layers": fn(lin2(h)),
            }
            for msg, cand in candidates.items():
                if tuple(cand.shape) == tuple(out.shape) and torch.allclose(out, cand, atol=ATOL64, rtol=RTOL64):
                    raise AssertionError(f"FeedForward(activation={act!r}) {msg}.")
            check_close(out, expected, f"FeedForward(activation={act!r}) output",
                        hint="it should be linear2(activation(linear1(x)))")
    # position-wise: changing one position changes only that row
    ff = _call_learner(ff_cls, d_model, d_ff).double().eval()
    x2 = x.clone()
    x2[1, 2] += 1.0
    moved = (_call_learner(ff, x2) - _call_learner(ff, x)).abs().amax(-1) > 0
    if moved.sum() != 1 or not moved[1, 2]:
        raise AssertionError("changing the input at one position changed the FeedForward output at other "
                             "positions: the network is applied to each position on its own (no mixing over L).")
    # dropout: after the activation, inverted scaling, only in training
    p = 0.5
    ff = _call_learner(ff_cls, d_model, 64, activation="gelu", dropout=p).double()
    seen: dict[str, Any] = {}
    h1 = ff.linear1.register_forward_hook(lambda m, i, o: seen.update(in1=i[0], out1=o))
    h2 = ff.linear2.register_forward_hook(lambda m, i, o: seen.update(in2=i[0], out2=o))
    try:
        ff.eval()
        a, b = _call_learner(ff, x), _call_learner(ff, x)
        if not torch.equal(a, b) or not torch.allclose(a, ff.linear2(F.gelu(ff.linear1(x))), atol=ATOL64):
            raise AssertionError("FeedForward with dropout in eval mode is random or not linear2(gelu(linear1(x))): "
                                 "dropout must act only in training mode (nn.Dropout, or F.dropout(..., "
                                 "training=self.training)).")
        ff.train()
        torch.manual_seed(1)
        out = _call_learner(ff, x)
    finally:
        h1.remove()
        h2.remove()
    if "in1" not in seen or "in2" not in seen:
        raise AssertionError("FeedForward must call its layers linear1 and linear2 in forward.")
    if not torch.equal(seen["in1"], x):
        raise AssertionError("in training mode linear1 received something other than x: dropout is applied to "
                             "the input; nn.TransformerEncoderLayer drops the hidden units, after the activation.")
    if not torch.equal(out, seen["out2"]):
        raise AssertionError("in training mode the output is not linear2's output: the dropout is applied after "
                             "linear2; inside the feed-forward network it belongs after the activation.")
    act = F.gelu(seen["out1"])
    got = seen["in2"]
    dropped = got == 0
    kept_ok = torch.allclose(got[~dropped], act[~dropped] / (1 - p), atol=1e-12)
    n_zero_act = int((act == 0).sum())
    if torch.equal(got, act):
        raise AssertionError("in training mode with dropout=0.5 nothing was dropped between the activation and "
                             "linear2: the dropout belongs after the activation (and must be active in training).")
    if not kept_ok:
        if torch.allclose(got[~dropped], act[~dropped], atol=1e-12):
            raise AssertionError("the dropped-out hidden units are not rescaled by 1/(1 - p): use nn.Dropout or "
                                 "F.dropout (inverted dropout), not a bare random mask.")
        raise AssertionError("linear2's input is not the activation with some units dropped: the dropout "
                             "belongs after the activation, before linear2 (is it before the activation?).")
    if int(dropped.sum()) <= n_zero_act:
        raise AssertionError("in training mode with dropout=0.5 no hidden unit was dropped: pass dropout= to "
                             "the feed-forward's nn.Dropout.")


# --- copies into PyTorch's modules ---------------------------------------------------------------

def torch_layer_from(layer: nn.Module, d_model: int, n_head: int, d_ff: int, norm_first: bool,
                     activation: str) -> nn.TransformerEncoderLayer:
    """nn.TransformerEncoderLayer (dropout 0, float64, batch_first) holding copies of the learner's weights."""
    check_layer_structure(layer, d_model, d_ff)
    t = nn.TransformerEncoderLayer(d_model, n_head, d_ff, dropout=0.0, activation=activation, batch_first=True,
                                   norm_first=norm_first, dtype=torch.float64)
    copy_into_torch_mha(layer.self_attn, t.self_attn)
    with torch.no_grad():
        for ours, theirs in [(layer.ff.linear1, t.linear1), (layer.ff.linear2, t.linear2),
                             (layer.norm1, t.norm1), (layer.norm2, t.norm2)]:
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return t


def torch_encoder_from(encoder: nn.Module, d_model: int, n_head: int, d_ff: int, norm_first: bool,
                       activation: str) -> nn.TransformerEncoder:
    """nn.TransformerEncoder (no fast path) holding copies of the learner's layers and final norm."""
    layers = [torch_layer_from(lay, d_model, n_head, d_ff, norm_first, activation) for lay in encoder.layers]
    norm = None
    if norm_first:
        norm = nn.LayerNorm(d_model, dtype=torch.float64)
        with torch.no_grad():
            norm.weight.copy_(encoder.norm.weight)
            norm.bias.copy_(encoder.norm.bias)
    t = nn.TransformerEncoder(layers[0], len(layers), norm=norm, enable_nested_tensor=False)
    t.layers = nn.ModuleList(layers)
    return t


def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() == 1:         # norm weights near 1
                p.add_(1.0)


# --- float64 references with one mistake at a time (for the diagnoses) ----------------------------

def _params(layer: nn.Module) -> dict[str, Tensor]:
    a = layer.self_attn
    return {"q": (a.q.weight, a.q.bias), "k": (a.k.weight, a.k.bias), "v": (a.v.weight, a.v.bias),
            "o": (a.o.weight, a.o.bias), "l1": (layer.ff.linear1.weight, layer.ff.linear1.bias),
            "l2": (layer.ff.linear2.weight, layer.ff.linear2.bias), "n1": (layer.norm1.weight, layer.norm1.bias),
            "n2": (layer.norm2.weight, layer.norm2.bias)}


def _ref_layer(P: Mapping[str, tuple[Tensor, Tensor]], x: Tensor, allowed: Tensor | None, n_head: int,
               norm_first: bool, activation: str, bug: str = "") -> Tensor:
    d = x.size(-1)
    det = {k: (w.detach(), b.detach()) for k, (w, b) in P.items()}

    def ln(t: Tensor, key: str) -> Tensor:
        w, b = det[key]
        return F.layer_norm(t, (d,), w, b, 1e-5)

    def attn(t: Tensor) -> Tensor:
        B, L, _ = t.shape
        heads = [F.linear(t, *det[n]).view(B, L, n_head, d // n_head).transpose(1, 2) for n in "qkv"]
        q, k, v = heads
        scale = 1.0 if bug == "no_scale" else 1.0 / math.sqrt(d // n_head)
        scores = (q @ k.transpose(-2, -1)) * scale
        mask = allowed
        if mask is not None:
            if bug == "mask_inverted":
                mask = ~mask
            elif bug == "mask_queries":
                mask = mask.transpose(-2, -1)
            elif bug == "no_mask":
                mask = None
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
            has = mask.any(-1, keepdim=True)
            scores = scores.masked_fill(~has, 0.0)
        w = torch.softmax(scores, -1)
        if mask is not None:
            w = w.masked_fill(~has, 0.0)
        return F.linear((w @ v).transpose(1, 2).reshape(B, L, d), *det["o"])

    def ff(t: Tensor) -> Tensor:
        h = F.linear(t, *det["l1"])
        act = activation
        if bug == "other_activation":
            act = "gelu" if activation == "relu" else "relu"
        if bug == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif bug != "no_activation":
            h = F.relu(h) if act == "relu" else F.gelu(h)
        return F.linear(h, *det["l2"])

    first = (not norm_first) if bug == "swapped" else norm_first
    n1, n2 = ("n2", "n1") if bug == "norms_swapped" else ("n1", "n2")

    def sub(t: Tensor, f: Callable[[Tensor], Tensor], n: str) -> Tensor:
        if bug == "norm_on_branch":
            return t + ln(f(t), n)
        if bug == "no_residual":
            return f(ln(t, n)) if first else ln(f(t), n)
        if bug == "residual_normed" and first:
            return ln(t, n) + f(ln(t, n))
        return t + f(ln(t, n)) if first else ln(t + f(t), n)

    return sub(sub(x, attn, n1), ff, n2)


_LAYER_BUGS = {
    "swapped": "the norm placement is swapped: norm_first=True is pre-LN, x + sublayer(norm(x)); "
               "norm_first=False is post-LN, norm(x + sublayer(x))",
    "norm_on_branch": "the norm is applied to the sub-layer's output, x + norm(sublayer(x)): pre-LN normalizes "
                      "the sub-layer's input, post-LN the sum",
    "no_residual": "the residual connection is missing: each sub-layer's output must be added to its input x",
    "residual_normed": "the residual adds norm(x) instead of x: pre-LN is x + sublayer(norm(x)), the residual "
                       "path is never normalized",
    "norms_swapped": "norm1 and norm2 are swapped: norm1 belongs to the attention sub-layer, norm2 to the "
                     "feed-forward one",
    "gelu_tanh": "the GELU is the tanh approximation; nn.TransformerEncoderLayer's \"gelu\" is the exact "
                 "F.gelu(x) (erf)",
    "other_activation": "the activation argument is ignored: the layer uses the other activation",
    "no_activation": "the feed-forward network has no activation between linear1 and linear2",
    "mask_inverted": "the mask is inverted: in this book True = may attend (PyTorch's masks are True = ignore)",
    "mask_queries": "the padding mask is applied to the queries instead of the keys: a key mask (B, 1, 1, L) "
                    "blocks columns, never transpose it",
    "no_mask": "attn_mask is ignored: the mask must reach the self-attention",
    "no_scale": "the attention scores are not scaled by 1/sqrt(head_dim)",
}


def _diagnose_layer(layer: nn.Module, out: Tensor, x: Tensor, allowed: Tensor | None, n_head: int,
                    norm_first: bool, activation: str) -> str | None:
    P = _params(layer)
    for bug, msg in _LAYER_BUGS.items():
        if allowed is None and bug in ("mask_inverted", "mask_queries", "no_mask"):
            continue
        try:
            cand = _ref_layer(P, x, allowed, n_head, norm_first, activation, bug)
        except RuntimeError:
            continue
        if tuple(cand.shape) == tuple(out.shape) and torch.allclose(out.detach(), cand, atol=1e-9, rtol=1e-7):
            return msg
    return None


def _mask_desc(allowed: Tensor | None) -> str:
    return "no mask" if allowed is None else f"a bool mask {tuple(allowed.shape)}"


def _grad_pairs_layer(layer: nn.Module, t: nn.TransformerEncoderLayer, prefix: str = "") -> list[tuple[str, Tensor, Tensor | None]]:
    a = layer.self_attn
    gw = t.self_attn.in_proj_weight.grad
    gb = t.self_attn.in_proj_bias.grad
    pairs = []
    for i, n in enumerate("qkv"):
        lin = getattr(a, n)
        d = lin.weight.shape[0]
        pairs += [(f"{prefix}self_attn.{n}.weight", lin.weight, None if gw is None else gw[i * d:(i + 1) * d]),
                  (f"{prefix}self_attn.{n}.bias", lin.bias, None if gb is None else gb[i * d:(i + 1) * d])]
    pairs += [(f"{prefix}self_attn.o.weight", a.o.weight, t.self_attn.out_proj.weight.grad),
              (f"{prefix}self_attn.o.bias", a.o.bias, t.self_attn.out_proj.bias.grad)]
    for ours, theirs, name in [(layer.ff.linear1, t.linear1, "ff.linear1"), (layer.ff.linear2, t.linear2, "ff.linear2"),
                               (layer.norm1, t.norm1, "norm1"), (layer.norm2, t.norm2, "norm2")]:
        pairs += [(f"{prefix}{name}.weight", ours.weight, theirs.weight.grad),
                  (f"{prefix}{name}.bias", ours.bias, theirs.bias.grad)]
    return pairs


def _check_grads(pairs: list[tuple[str, Tensor, Tensor | None]], what: str) -> None:
    for name, p, ref in pairs:
        if p.grad is None:
            raise AssertionError(f"{what}: {name} received no gradient although the output is right: the "
                                 "parameter is not used through autograd (a detach(), .data or torch.no_grad() "
                                 "in forward, or a copy of the weights).")
        if ref is not None and not torch.allclose(p.grad, ref, atol=ATOL64, rtol=RTOL64):
            raise AssertionError(f"{what}: the gradient of {name} differs from PyTorch's by up to "
                                 f"{_max_abs_diff(p.grad, ref):.3g} although the output is right: part of the "
                                 "computation is hidden from autograd (.data, detach(), an in-place write).")


def _zero_grads(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def _real_rows(allowed: Tensor | None, B: int, L: int) -> Tensor:
    """(B, L) True at the positions compared: all of them, or the real ones of a (B, 1, 1, L) key mask."""
    if allowed is None:
        return torch.ones(B, L, dtype=torch.bool)
    return allowed[:, 0, 0, :].expand(B, L)


def _key_padding(allowed: Tensor | None) -> Tensor | None:
    """A (B, 1, 1, L) key mask (True = may attend) as PyTorch's src_key_padding_mask (True = ignore)."""
    return None if allowed is None else ~allowed[:, 0, 0, :]


def check_layer_matches_torch(layer: nn.Module, x: Tensor, allowed: Tensor | None, *, n_head: int, d_ff: int,
                              norm_first: bool, activation: str) -> None:
    """EncoderLayer (dropout 0) against nn.TransformerEncoderLayer with its weights: output and every gradient.

    ``allowed`` is None or a key padding mask (B, 1, 1, L), True = may attend.
    """
    d_model = x.size(-1)
    check_layer_structure(layer, d_model, d_ff)
    _randomize(layer, 21)                                  # norms apart from ones and zeros
    t = torch_layer_from(layer, d_model, n_head, d_ff, norm_first, activation)
    what = f"EncoderLayer(norm_first={norm_first}, activation={activation!r}) with {_mask_desc(allowed)}"
    out = _call_learner(layer, x, allowed) if allowed is not None else _call_learner(layer, x)
    ref = t(x, src_key_padding_mask=_key_padding(allowed))
    check_shape(out, ref.shape, f"the output of {what}")
    rows = _real_rows(allowed, x.size(0), x.size(1))
    if not torch.allclose(out.detach()[rows], ref.detach()[rows], atol=ATOL64, rtol=RTOL64):
        msg = _diagnose_layer(layer, out, x, allowed, n_head, norm_first, activation)
        if msg:
            raise AssertionError(f"{what}: {msg}.")
        check_close(out[rows], ref[rows], f"the output of {what} (real positions)",
                    hint="compare each sub-block with the formulas of the chapter")
    _zero_grads(layer, t)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=ref.dtype)
    (out[rows] * g[rows]).sum().backward()
    (ref[rows] * g[rows]).sum().backward()
    _check_grads(_grad_pairs_layer(layer, t), what)


def _check_independent(encoder: nn.Module, n_layers: int) -> None:
    layers = _get(encoder, "layers", "the encoder keeps its layers in an nn.ModuleList named layers")
    if not isinstance(layers, nn.ModuleList):
        raise AssertionError(f"encoder.layers is a {type(layers).__name__}: keep the layers in an nn.ModuleList "
                             "so that their parameters are registered.")
    if len(layers) != n_layers:
        raise AssertionError(f"Encoder({n_layers}, ...) has {len(layers)} layers.")
    ids = [id(m) for m in layers]
    if len(set(ids)) != len(ids):
        raise AssertionError("the encoder's layers are one module object used several times ([layer] * n): "
                             "they share their parameters; build a new EncoderLayer for each layer.")
    ptrs = [p.data_ptr() for m in layers for p in m.parameters()]
    if len(set(ptrs)) != len(ptrs):
        raise AssertionError("two layers of the encoder share parameter memory: build a new EncoderLayer for "
                             "each layer (or deep-copy it); the layers must have independent parameters.")


def check_encoder_matches_torch(encoder: nn.Module, x: Tensor, allowed: Tensor | None, *, n_layers: int,
                                n_head: int, d_ff: int, norm_first: bool, activation: str) -> None:
    """Encoder (dropout 0) against nn.TransformerEncoder with its weights (layers randomized apart first)."""
    d_model = x.size(-1)
    _check_independent(encoder, n_layers)
    norm = getattr(encoder, "norm", "missing")
    if isinstance(norm, str):
        raise AssertionError("the encoder has no attribute norm: it is the final LayerNorm when norm_first, else None.")
    if norm_first and norm is None:
        raise AssertionError("a pre-LN encoder (norm_first=True) has no final norm: the last layer's output is a raw "
                             "residual sum; encoder.norm must be a LayerNorm applied after the last layer.")
    if not norm_first and norm is not None:
        raise AssertionError("a post-LN encoder (norm_first=False) has a final norm: its last layer already ends with "
                             "a LayerNorm, so encoder.norm must be None (two norms in a row, pytorch #74092).")
    if norm_first:
        _norm(encoder, "norm", d_model)
    for i, lay in enumerate(encoder.layers):
        _randomize(lay, 100 + i)
    if norm is not None:
        _randomize(norm, 99)
    t = torch_encoder_from(encoder, d_model, n_head, d_ff, norm_first, activation)
    what = f"Encoder(n_layers={n_layers}, norm_first={norm_first}, activation={activation!r}) with {_mask_desc(allowed)}"
    out = _call_learner(encoder, x, allowed) if allowed is not None else _call_learner(encoder, x)
    ref = t(x, src_key_padding_mask=_key_padding(allowed))
    check_shape(out, ref.shape, f"the output of {what}")
    rows = _real_rows(allowed, x.size(0), x.size(1))
    if not torch.allclose(out.detach()[rows], ref.detach()[rows], atol=ATOL64, rtol=RTOL64):
        # which layer? run the torch layers one by one and compare each learner layer on the same input
        h = x
        for i, (lay, tl) in enumerate(zip(encoder.layers, t.layers)):
            mine = _call_learner(lay, h, allowed) if allowed is not None else _call_learner(lay, h)
            theirs = tl(h, src_key_padding_mask=_key_padding(allowed))
            if not torch.allclose(mine.detach()[rows], theirs.detach()[rows], atol=ATOL64, rtol=RTOL64):
                msg = _diagnose_layer(lay, mine, h, allowed, n_head, norm_first, activation)
                raise AssertionError(f"{what}: layer {i} " + (msg + "." if msg else "differs from "
                                     "nn.TransformerEncoderLayer with its weights."))
            h = theirs.detach()
        if norm_first:
            no_final = h
            if torch.allclose(out.detach()[rows], no_final[rows], atol=ATOL64, rtol=RTOL64):
                raise AssertionError(f"{what}: the final norm is never applied: a pre-LN stack ends with "
                                     "encoder.norm after the last layer.")
        if allowed is not None:
            h = x
            for i, tl in enumerate(t.layers):
                h = tl(h, src_key_padding_mask=_key_padding(allowed) if i == 0 else None)
            if t.norm is not None:
                h = t.norm(h)
            if torch.allclose(out.detach()[rows], h.detach()[rows], atol=ATOL64, rtol=RTOL64):
                raise AssertionError(f"{what}: the mask reaches the first layer only: every layer must get attn_mask.")
        raise AssertionError(f"{what}: the output differs from nn.TransformerEncoder with the same weights "
                             f"by up to {_max_abs_diff(out[rows], ref[rows]):.3g} although each layer agrees: check "
                             "the order of the layers and the final norm.")
    _zero_grads(encoder, t)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8), dtype=ref.dtype)
    (out[rows] * g[rows]).sum().backward()
    (ref[rows] * g[rows]).sum().backward()
    pairs = []
    for i, (lay, tl) in enumerate(zip(encoder.layers, t.layers)):
        pairs += _grad_pairs_layer(lay, tl, f"layers.{i}.")
    if norm_first:
        pairs += [("norm.weight", encoder.norm.weight, t.norm.weight.grad),
                  ("norm.bias", encoder.norm.bias, t.norm.bias.grad)]
    _check_grads(pairs, what)


# --- properties ---------------------------------------------------------------------------------

def check_padding_invariance(module: nn.Module, x: Tensor, lengths: Tensor, what: str = "the encoder") -> None:
    """Changing the padded positions' inputs never changes a real position's output."""
    L = x.size(1)
    real = torch.arange(L) < lengths[:, None]
    allowed = real[:, None, None, :]
    out = _call_learner(module, x, allowed)
    g = torch.Generator().manual_seed(3)
    other = torch.where(real[..., None], x, 50 * torch.randn(x.shape, generator=g, dtype=x.dtype))
    out2 = _call_learner(module, other, allowed)
    if not torch.allclose(out.detach()[real], out2.detach()[real], atol=ATOL64, rtol=RTOL64):
        raise AssertionError(f"changing only the padded positions of the input changed the outputs of real positions "
                             f"of {what} (by up to {_max_abs_diff(out[real], out2[real]):.3g}): padded keys must be "
                             "blocked for every query, in every layer (mask (B, 1, 1, L), True = real key).")
    for b in range(x.size(0)):
        n = int(lengths[b])
        alone = _call_learner(module, x[b:b + 1, :n])
        if not torch.allclose(alone[0].detach(), out[b, :n].detach(), atol=ATOL64, rtol=RTOL64):
            raise AssertionError(f"sequence {b} ({n} real tokens) alone gives other outputs than in the padded batch "
                                 f"of {what}: padding must not change real positions' outputs.")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{what} gives NaN or infinite outputs with a padding mask: a padded query still has "
                             "real keys; never mask whole rows of the scores.")


def check_dropout_train_only(build: Callable[[float], nn.Module], x: Tensor) -> None:
    """With dropout 0.5: random in training, deterministic in eval and equal to the dropout-free model."""
    torch.manual_seed(0)
    model = build(0.5).double()
    plain = build(0.0).double()
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    a, b = _call_learner(model, x), _call_learner(model, x)
    if not torch.equal(a, b):
        raise AssertionError("in eval mode two calls gave different outputs: dropout is active in evaluation; use "
                             "nn.Dropout modules (or pass training=self.training to F.dropout).")
    if not torch.allclose(a, _call_learner(plain, x), atol=ATOL64, rtol=RTOL64):
        raise AssertionError("in eval mode the model with dropout=0.5 differs from the same weights with dropout=0: "
                             "dropout must do nothing in evaluation (an output scaled by 1 - p?).")
    model.train()
    torch.manual_seed(1)
    c = _call_learner(model, x)
    d = _call_learner(model, x)
    if torch.equal(c, d) or torch.allclose(c, a, atol=1e-12):
        raise AssertionError("in training mode with dropout=0.5 the output is deterministic: the dropout= argument "
                             "never reaches the layers' dropout (attention weights, feed-forward, residual branches).")


# --- load_from_torch -----------------------------------------------------------------------------

def random_torch_encoder(n_layers: int, d_model: int, n_head: int, d_ff: int, norm_first: bool, activation: str,
                         seed: int = 0, dtype: torch.dtype = torch.float64, final_norm: bool | None = None
                         ) -> nn.TransformerEncoder:
    """An nn.TransformerEncoder whose layers (and final norm) all hold different random weights."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model, n_head, d_ff, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first, dtype=dtype)
    final_norm = norm_first if final_norm is None else final_norm
    norm = nn.LayerNorm(d_model, dtype=dtype) if final_norm else None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = nn.TransformerEncoder(layer, n_layers, norm=norm, enable_nested_tensor=False)
    _randomize(t, seed + 1)
    return t


def _expected_slices(t: nn.TransformerEncoder) -> dict[str, Tensor]:
    exp: dict[str, Tensor] = {}
    for i, tl in enumerate(t.layers):
        pre = f"layers.{i}."
        w = tl.self_attn.in_proj_weight.detach()
        b = tl.self_attn.in_proj_bias.detach()
        d = w.shape[1]
        for j, n in enumerate("qkv"):
            exp[pre + f"self_attn.{n}.weight"] = w[j * d:(j + 1) * d]
            exp[pre + f"self_attn.{n}.bias"] = b[j * d:(j + 1) * d]
        exp[pre + "self_attn.o.weight"] = tl.self_attn.out_proj.weight.detach()
        exp[pre + "self_attn.o.bias"] = tl.self_attn.out_proj.bias.detach()
        for ours, theirs in [("ff.linear1", "linear1"), ("ff.linear2", "linear2"), ("norm1", "norm1"),
                             ("norm2", "norm2")]:
            exp[pre + ours + ".weight"] = getattr(tl, theirs).weight.detach()
            exp[pre + ours + ".bias"] = getattr(tl, theirs).bias.detach()
    if t.norm is not None:
        exp["norm.weight"] = t.norm.weight.detach()
        exp["norm.bias"] = t.norm.bias.detach()
    return exp


def _explain_param(name: str, got: Tensor, exp: dict[str, Tensor]) -> str:
    got = got.detach().to(torch.float64)
    for other, t in exp.items():
        if other != name and t.shape == got.shape and torch.allclose(got, t.to(torch.float64), atol=1e-6):
            li = name.split(".")[1] if name.startswith("layers.") else None
            lo = other.split(".")[1] if other.startswith("layers.") else None
            if li is not None and lo is not None and li != lo and name.split(".", 2)[2] == other.split(".", 2)[2]:
                return (f"{name} holds the weights of layer {lo}: layer i of the encoder must get layer i of "
                        "torch_encoder.layers")
            if "self_attn" in name and "self_attn" in other:
                return (f"{name} holds {other}'s weights: in_proj_weight is cat([W_q, W_k, W_v]) along dim 0, so "
                        "q, k, v are its first, second and third blocks of d_model rows")
            if "norm" in name and "norm" in other:
                return f"{name} holds {other}'s weights: norm1, norm2 and the final norm are copied from their namesakes"
            return f"{name} holds {other}'s weights"
    target = exp[name].to(torch.float64)
    if got.dim() == 2 and got.shape == target.shape[::-1] or (got.dim() == 2 and got.shape == target.shape
                                                              and torch.allclose(got, target.T, atol=1e-6)):
        return f"{name} is the transpose of PyTorch's weight: nn.Linear and in_proj_weight are both (out, in)"
    if "self_attn" in name and got.dim() == 2 and got.shape != target.shape:
        return (f"{name} has shape {tuple(got.shape)}, not {tuple(target.shape)}: split in_proj_weight (3 d_model, "
                "d_model) into three (d_model, d_model) blocks along dim 0")
    if got.shape != target.shape:
        return f"{name} has shape {tuple(got.shape)} but the source has {tuple(target.shape)}"
    if name.endswith("bias"):
        return f"{name} was not copied (biases too: in_proj_bias holds q, k, v's; out_proj.bias is o's)"
    if name.startswith("norm."):
        return "the final norm (torch_encoder.norm) was not copied into encoder.norm"
    return f"{name} differs from the source by up to {_max_abs_diff(got, target):.3g}: it was not copied"


def check_loaded(encoder: nn.Module, t: nn.TransformerEncoder, before_ids: Mapping[str, int] | None = None,
                 atol: float = 0.0) -> None:
    """Every parameter of the learner's encoder equals its slice of t's weights, as its own memory."""
    exp = _expected_slices(t)
    got = dict(encoder.named_parameters())
    for name in exp:
        if name not in got:
            raise AssertionError(f"the encoder has no parameter {name}: keep the names of the contract "
                                 "(layers.i.self_attn.q/k/v/o, ff.linear1/2, norm1/2, norm).")
    t_ptrs = {p.untyped_storage().data_ptr() for p in t.parameters()}
    for name, target in exp.items():
        p = got[name]
        if not isinstance(p, nn.Parameter) or not p.requires_grad or p.grad_fn is not None:
            raise AssertionError(f"after loading, {name} is not a trainable leaf nn.Parameter: copy into the "
                                 "existing parameters with p.copy_(w) under torch.no_grad().")
        if before_ids is not None and id(p) != before_ids.get(name):
            raise AssertionError(f"load_from_torch replaced the parameter object {name}: load in place (copy_ into "
                                 "the existing parameters), so an optimizer built before loading still trains them.")
        if p.device.type != "meta" and p.untyped_storage().data_ptr() in t_ptrs:
            raise AssertionError(f"{name} shares memory with torch_encoder's weights (a view of in_proj_weight): "
                                 "copy the values (copy_ or clone), or training one model changes the other.")
        ok = p.shape == target.shape and torch.allclose(p.detach().to(torch.float64), target.to(torch.float64),
                                                        atol=atol, rtol=0 if atol == 0 else 1e-5)
        if not ok:
            raise AssertionError("after load_from_torch, " + _explain_param(name, p, exp) + ".")


# --- the classifier ------------------------------------------------------------------------------

def check_padding_mask(fn: Callable[..., Any]) -> None:
    lengths = torch.tensor([3, 1, 5])
    out = _call_learner(fn, lengths, 5)
    check_shape(out, (3, 1, 1, 5), "padding_mask(lengths, 5)",
                hint="a key mask shaped (B, 1, 1, L) broadcasts over heads and queries")
    if out.dtype != torch.bool:
        raise AssertionError(f"padding_mask returns dtype {out.dtype}: the book's masks are bool, True = may attend.")
    expected = (torch.arange(5) < lengths[:, None])[:, None, None, :]
    if torch.equal(out, ~expected):
        raise AssertionError("padding_mask is inverted: True = may attend (a real token), False at padded keys; "
                             "PyTorch's src_key_padding_mask is the opposite.")
    if torch.equal(out, (torch.arange(5) <= lengths[:, None])[:, None, None, :]):
        raise AssertionError("padding_mask marks one position too many: positions 0 .. length - 1 are real (j < length).")
    if not torch.equal(out, expected):
        raise AssertionError("padding_mask(lengths, L)[b, 0, 0, j] should be j < lengths[b].")
    out = _call_learner(fn, torch.tensor([4, 4]), 6)
    if not torch.equal(out, (torch.arange(6) < 4).expand(2, 6)[:, None, None, :]):
        raise AssertionError("padding_mask(lengths, L) must have L columns, whatever the lengths (here L = 6 > max "
                             "length 4): use L, not lengths.max().")


def _pool_candidates(h: Tensor, real: Tensor) -> dict[str, Tensor]:
    m = real[..., None].to(h.dtype)
    n = real.sum(1, keepdim=True).to(h.dtype)
    last = (real.sum(1) - 1).clamp(min=0)
    return {
        "pools over all positions, padding included: average over the real tokens only (masked mean)": h.mean(1),
        "sums the real positions without dividing by their number: a masked MEAN divides by the length":
            (h * m).sum(1),
        "divides by L instead of by the number of real tokens": (h * m).sum(1) / h.size(1),
        "takes the first position (CLS pooling): the exercise asks for the mean over real tokens": h[:, 0],
        "takes the last real position: the exercise asks for the mean over real tokens":
            h[torch.arange(h.size(0)), last],
        "takes the last position, which is padding in short sequences": h[:, -1],
        "the mean over real tokens": (h * m).sum(1) / n,
    }


def check_classifier_pooling(model: nn.Module, idx: Tensor, lengths: Tensor, max_len: int) -> None:
    """logits == head(masked mean of encoder(tok_emb + pos_emb, padding mask)), from the model's own modules."""
    for name in ("tok_emb", "pos_emb", "encoder", "head"):
        _get(model, name, "the classifier has tok_emb, pos_emb (nn.Embedding(max_len, d_model)), encoder and head")
    if model.pos_emb.weight.shape[0] != max_len:
        raise AssertionError(f"pos_emb has {model.pos_emb.weight.shape[0]} positions, not max_len = {max_len}.")
    B, L = idx.shape
    real = torch.arange(L) < lengths[:, None]
    out = _call_learner(model, idx, lengths)
    check_shape(out, (B, model.head.weight.shape[0]), "the classifier's logits", hint="one row of n_classes per sequence")
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(L))
    h = model.encoder(x, real[:, None, None, :])
    cands = _pool_candidates(h, real)
    expected = model.head(cands.pop("the mean over real tokens"))
    if torch.allclose(out, expected, atol=ATOL64, rtol=RTOL64):
        return
    for msg, pooled in cands.items():
        if torch.allclose(out, model.head(pooled), atol=ATOL64, rtol=RTOL64):
            raise AssertionError(f"the classifier {msg}.")
    h_queries = model.encoder(x, real[:, None, :, None])
    if torch.allclose(out, model.head((h_queries * real[..., None]).sum(1) / real.sum(1, keepdim=True)),
                      atol=ATOL64, rtol=RTOL64):
        raise AssertionError("the classifier's padding mask is applied to the queries instead of the keys: "
                             "padding_mask is (B, 1, 1, L), one column per key.")
    h_nomask = model.encoder(x)
    if torch.allclose(out, model.head((h_nomask * real[..., None]).sum(1) / real.sum(1, keepdim=True)),
                      atol=ATOL64, rtol=RTOL64):
        raise AssertionError("the classifier gives the encoder no padding mask: pass padding_mask(lengths, L) so that "
                             "real tokens never attend the padding.")
    if torch.allclose(out, model.head(((model.encoder(model.tok_emb(idx), real[:, None, None, :])) * real[..., None])
                                      .sum(1) / real.sum(1, keepdim=True)), atol=ATOL64, rtol=RTOL64):
        raise AssertionError("the classifier adds no position embeddings: x = tok_emb(idx) + pos_emb(positions 0 .. L-1).")
    check_close(out, expected, "the classifier's logits",
                hint="head(masked mean over real positions of encoder(tok_emb(idx) + pos_emb(arange(L)), padding mask))")


def check_classifier_padding(model: nn.Module, idx: Tensor, lengths: Tensor, pad_id: int, extra: int) -> None:
    """Logits independent of the padding token and of the amount of padding; no gradient reaches padding."""
    B, L = idx.shape
    real = torch.arange(L) < lengths[:, None]
    base = _call_learner(model, idx, lengths)
    other = idx.masked_fill(~real, (pad_id + 1) % model.tok_emb.weight.shape[0])
    if not torch.allclose(_call_learner(model, other, lengths), base, atol=ATOL64, rtol=RTOL64):
        raise AssertionError("the classifier's logits change when only the token ids at padded positions change: "
                             "the padding leaks in (mask the keys and pool over real tokens only).")
    longer = torch.cat([idx, torch.full((B, extra), pad_id)], dim=1)
    if not torch.allclose(_call_learner(model, longer, lengths), base, atol=ATOL64, rtol=RTOL64):
        raise AssertionError(f"the classifier's logits change when {extra} more padding positions are appended: the "
                             "prediction must not depend on the amount of padding (masked mean over real tokens).")
    model.zero_grad()
    padded_idx = idx.masked_fill(~real, pad_id)
    _call_learner(model, padded_idx, lengths).sum().backward()
    g = model.tok_emb.weight.grad
    if g is None:
        raise AssertionError("tok_emb received no gradient: the embeddings must be used through autograd.")
    if g[pad_id].abs().max() > 1e-12:
        raise AssertionError("the padding token's embedding receives a gradient although it occurs at padded "
                             "positions only: padded positions influence the logits.")
    with torch.no_grad():
        check_shape(_call_learner(model, idx[:, :L], lengths), base.shape, "the logits")
    try:
        too_long = torch.zeros(1, model.pos_emb.weight.shape[0] + 1, dtype=torch.long)
        _call_learner(model, too_long, torch.tensor([1]))
    except ValueError:
        pass
    except (IndexError, RuntimeError) as exc:
        raise AssertionError(f"a sequence longer than max_len raised {type(exc).__name__} from deep inside the "
                             "embedding: check the length first and raise ValueError.") from None
    else:
        raise AssertionError("a sequence longer than max_len should raise ValueError.")
