"""Checks with diagnoses for the decoder exercise: decoder layers, a small GPT, generation.

The references are PyTorch's own layers (``nn.TransformerDecoderLayer``, ``nn.TransformerEncoderLayer``
with a causal mask) holding copies of the learner's weights, float64 re-computations from the learner's
own submodules, and a reference sampler that follows the release's rules exactly (one
``torch.multinomial(probs, 1, generator=generator)`` call per step). When a result differs, the
likely mistakes are recomputed one by one and the first that reproduces the learner's result names
the cause. Every failure is an AssertionError with one sentence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from handson.checks import _call_learner, check_close, check_linear, check_shape, copy_into_torch_mha

__all__ = [
    "torch_decoder_layer_like", "check_layer_structure", "check_decoder_layer",
    "check_gpt_structure", "check_gpt_forward", "check_no_token_leakage", "gpt_params_reference",
    "check_param_count", "BigramLM", "ContextSumLM", "reference_generate", "check_generate",
    "check_no_tensor_work", "check_next_token_loss",
]

_TOL = dict(atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------- the decoder layer

def _norm_state(norm: nn.Module, who: str) -> dict[str, Tensor]:
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not isinstance(w, Tensor) or not isinstance(b, Tensor):
        raise AssertionError(f"{who} should be a LayerNorm with a weight and a bias (the library's "
                             "LayerNorm or nn.LayerNorm), but it has no weight or no bias.")
    return {"weight": w, "bias": b}


def check_layer_structure(layer: nn.Module, d_model: int, d_ff: int, cross_attention: bool) -> None:
    """The release's submodules: self_attn, cross_attn (or None), ff.linear1/linear2, norm1..3."""
    for name in ["self_attn", "ff", "norm1", "norm2"]:
        if getattr(layer, name, None) is None:
            raise AssertionError(f"DecoderLayer has no submodule {name!r}: the release names them self_attn, "
                                 "cross_attn, ff, norm1, norm2, norm3.")
    for name in "qkvo":
        check_linear(layer.self_attn, name, d_model, d_model, bias=True,
                     why="self_attn is a multi-head attention with Linear layers q, k, v, o of d_model features.")
    cross = getattr(layer, "cross_attn", None)
    if cross_attention and cross is None:
        raise AssertionError("DecoderLayer(cross_attention=True) has no cross_attn: the encoder-decoder layer "
                             "needs a second attention whose keys and values come from memory.")
    if not cross_attention and cross is not None:
        raise AssertionError("DecoderLayer(cross_attention=False) has a cross_attn: a decoder-only (GPT) block "
                             "has self-attention and feed-forward only, and cross_attn must be None.")
    if cross is not None and (cross is layer.self_attn or cross.q.weight is layer.self_attn.q.weight):
        raise AssertionError("cross_attn shares its parameters with self_attn: the two attentions are separate "
                             "modules with their own weights.")
    if cross is not None:
        for name in "qkvo":
            check_linear(cross, name, d_model, d_model, bias=True,
                         why="cross_attn has Linear layers q, k, v, o of d_model features.")
    check_linear(layer.ff, "linear1", d_model, d_ff, bias=True, why="the feed-forward is d_model -> d_ff -> d_model.")
    check_linear(layer.ff, "linear2", d_ff, d_model, bias=True, why="the feed-forward is d_model -> d_ff -> d_model.")
    n3 = getattr(layer, "norm3", None)
    if cross_attention and n3 is None:
        raise AssertionError("DecoderLayer(cross_attention=True) has no norm3: three sublayers need three norms "
                             "(norm1 self-attention, norm2 cross-attention, norm3 feed-forward).")
    if not cross_attention and n3 is not None:
        raise AssertionError("DecoderLayer(cross_attention=False) has a norm3: with two sublayers norm3 must be "
                             "None (norm2 is the feed-forward's norm).")
    for name in ["norm1", "norm2"] + (["norm3"] if cross_attention else []):
        st = _norm_state(getattr(layer, name), name)
        if tuple(st["weight"].shape) != (d_model,):
            raise AssertionError(f"{name}.weight has shape {tuple(st['weight'].shape)}, not ({d_model},): "
                                 "LayerNorm normalises over the d_model features of each position.")


def torch_decoder_layer_like(layer: nn.Module, n_head: int, norm_first: bool, activation: str) -> nn.Module:
    """PyTorch's layer holding copies of layer's weights (float64, batch_first, dropout 0).

    With a cross_attn: nn.TransformerDecoderLayer; without: nn.TransformerEncoderLayer (to be called
    with a causal mask), which is what a GPT block is.
    """
    d_model, d_ff = layer.ff.linear1.in_features, layer.ff.linear1.out_features
    kw = dict(dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first, dtype=torch.float64)
    cross = getattr(layer, "cross_attn", None) is not None
    ref = (nn.TransformerDecoderLayer if cross else nn.TransformerEncoderLayer)(d_model, n_head, d_ff, **kw)
    with torch.no_grad():
        copy_into_torch_mha(layer.self_attn, ref.self_attn)
        if cross:
            copy_into_torch_mha(layer.cross_attn, ref.multihead_attn)
        for name in ["linear1", "linear2"]:
            getattr(ref, name).weight.copy_(getattr(layer.ff, name).weight)
            getattr(ref, name).bias.copy_(getattr(layer.ff, name).bias)
        for name in ["norm1", "norm2"] + (["norm3"] if cross else []):
            st = _norm_state(getattr(layer, name), name)
            getattr(ref, name).weight.copy_(st["weight"])
            getattr(ref, name).bias.copy_(st["bias"])
    return ref


def _attend(attn: nn.Module, xq: Tensor, xkv: Tensor, allowed: Tensor | None, n_head: int) -> Tensor:
    B, L, D = xq.shape
    S = xkv.size(1)
    q = F.linear(xq, attn.q.weight, attn.q.bias).view(B, L, n_head, -1).transpose(1, 2)
    k = F.linear(xkv, attn.k.weight, attn.k.bias).view(B, S, n_head, -1).transpose(1, 2)
    v = F.linear(xkv, attn.v.weight, attn.v.bias).view(B, S, n_head, -1).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if allowed is not None:
        allowed = allowed.expand_as(scores)
        scores = scores.masked_fill(~allowed, float("-inf"))
        has = allowed.any(-1, keepdim=True)
        w = torch.softmax(scores.masked_fill(~has, 0.0), -1).masked_fill(~has, 0.0)
    else:
        w = torch.softmax(scores, -1)
    out = (w @ v).transpose(1, 2).reshape(B, L, -1)
    return F.linear(out, attn.o.weight, attn.o.bias)


def _ln(norm: nn.Module, x: Tensor) -> Tensor:
    st = _norm_state(norm, "norm")
    return F.layer_norm(x, x.shape[-1:], st["weight"], st["bias"], 1e-5)


def _layer_variant(layer: nn.Module, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None, n_head: int,
                   norm_first: bool, activation: str, *, attn_mask: Tensor | None = None, amask: str = "use",
                   causal: str = "causal", mem: str = "memory",
                   mmask: str = "use", swap23: bool = False, order: str = "sca", act: str | None = None) -> Tensor:
    L = x.size(1)
    tril = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    self_allowed = {"causal": tril, "none": None, "inverted": ~tril, "strict": tril.tril(-1)}[causal]
    if attn_mask is not None and amask == "use":
        self_allowed = attn_mask if self_allowed is None else attn_mask & self_allowed
    elif attn_mask is not None and amask == "or":
        self_allowed = attn_mask | self_allowed
    cross = getattr(layer, "cross_attn", None) is not None
    n2, n3 = (layer.norm2, getattr(layer, "norm3", None))
    if cross and swap23:
        n2, n3 = n3, n2
    ff_norm = n3 if cross else n2
    phi = {"relu": F.relu, "gelu": F.gelu}[act or activation]

    def sub(h, f, norm):
        return h + f(_ln(norm, h)) if norm_first else _ln(norm, h + f(h))

    def self_f(h):
        return _attend(layer.self_attn, h, h, self_allowed, n_head)

    def cross_f(h):
        m = {"memory": memory, "x": h, "normed": None}[mem]
        if mem == "normed":
            m = _ln(n2, memory)
        mm = {"use": memory_mask, "ignored": None,
              "inverted": None if memory_mask is None else ~memory_mask}[mmask]
        return _attend(layer.cross_attn, h, m, mm, n_head)

    def ff_f(h):
        return F.linear(phi(F.linear(h, layer.ff.linear1.weight, layer.ff.linear1.bias)),
                        layer.ff.linear2.weight, layer.ff.linear2.bias)

    if not cross:
        return sub(sub(x, self_f, layer.norm1), ff_f, ff_norm)
    if order == "csa":
        h = sub(x, cross_f, layer.norm1)
        h = sub(h, self_f, n2)
        return sub(h, ff_f, ff_norm)
    h = sub(x, self_f, layer.norm1)
    h = sub(h, cross_f, n2)
    return sub(h, ff_f, ff_norm)


_BOOK = "the book's boolean masks mean True = may attend (PyTorch's nn.Transformer* layers mean True = ignore)"


def _diagnose_layer(layer, x, memory, memory_mask, n_head, norm_first, activation, got, attn_mask=None) -> str:
    cross = memory is not None
    other = "gelu" if activation == "relu" else "relu"
    candidates = [
        (dict(causal="none"), "the self-attention is not causal: query i may see later keys -- apply the causal "
                              "mask (True on and below the diagonal) in every call"),
        (dict(causal="inverted"), f"the causal mask is inverted: {_BOOK}, so pass the lower triangle as allowed"),
        (dict(causal="strict"), "the causal mask hides the diagonal: a query may attend its own position "
                                "(tril(), not tril(-1))"),
        (dict(norm_first=not norm_first), "the norm placement is swapped: norm_first=True is pre-LN "
                                          "x + f(norm(x)), norm_first=False is post-LN norm(x + f(x))"),
        (dict(act=other), f"the feed-forward uses {other} although activation={activation!r} was asked"),
    ]
    if attn_mask is not None:
        candidates.insert(0, (dict(amask="ignored"), "attn_mask is ignored: combine it with the causal mask "
                                                    "(attn_mask & causal) in the self-attention"))
        candidates.insert(1, (dict(amask="or"), "attn_mask is combined with the causal mask by OR: a key must be "
                                                "allowed by both (attn_mask & causal)"))
    if cross:
        candidates += [
            (dict(mmask="ignored"), "memory_mask is ignored: the cross-attention must hide the memory positions "
                                    "where memory_mask is False"),
            (dict(mmask="inverted"), f"memory_mask is inverted: {_BOOK}"),
            (dict(mem="x"), "the cross-attention's keys and values come from x instead of memory (the encoder's "
                            "output): call it with the memory as its context"),
            (dict(mem="normed"), "the memory is normalised by the decoder's norm2: only the queries (x) are "
                                 "normalised, the encoder's final output is used as it is"),
            (dict(swap23=True), "norm2 and norm3 are swapped: norm2 goes with the cross-attention and norm3 with "
                                "the feed-forward, as in nn.TransformerDecoderLayer"),
            (dict(order="csa"), "the sublayers are in the wrong order: self-attention first, then cross-attention, "
                                "then the feed-forward"),
        ]
    for kw, why in candidates:
        args = dict(norm_first=norm_first)
        args.update({k: v for k, v in kw.items() if k == "norm_first"})
        rest = {k: v for k, v in kw.items() if k != "norm_first"}
        try:
            with torch.no_grad():
                alt = _layer_variant(layer, x, memory, memory_mask, n_head, args["norm_first"], activation,
                                     attn_mask=attn_mask, **rest)
        except Exception:  # noqa: BLE001 - a variant that cannot run is simply not the cause
            continue
        if alt.shape == got.shape and torch.allclose(got.detach(), alt, **_TOL):
            return why
    return ""


def check_decoder_layer(layer: nn.Module, x: Tensor, memory: Tensor | None = None,
                        memory_mask: Tensor | None = None, *, n_head: int, norm_first: bool,
                        activation: str, attn_mask: Tensor | None = None, grads: bool = True) -> Tensor:
    """layer(x, memory, memory_mask=...) equals PyTorch's layer with the same weights, outputs and gradients.

    Cross-attention layers are compared with nn.TransformerDecoderLayer (tgt_mask = ~causal,
    memory_key_padding_mask = ~memory_mask for a (B, 1, 1, S) mask, else memory_mask = ~memory_mask),
    decoder-only blocks with nn.TransformerEncoderLayer and the negated causal mask. attn_mask (the
    target's padding, (B, 1, 1, L), True = real token) goes to PyTorch as ~ key padding mask.
    """
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():            # distinct norms, so that swapping two of them shows
        for name in ["norm1", "norm2", "norm3"]:
            norm = getattr(layer, name, None)
            if norm is not None:
                st = _norm_state(norm, name)
                st["weight"].copy_(1 + 0.3 * torch.randn(st["weight"].shape, generator=g, dtype=st["weight"].dtype))
                st["bias"].copy_(0.3 * torch.randn(st["bias"].shape, generator=g, dtype=st["bias"].dtype))
    ref = torch_decoder_layer_like(layer, n_head, norm_first, activation)
    L = x.size(1)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    layer.zero_grad(set_to_none=True)
    given = {} if attn_mask is None else {"attn_mask": attn_mask}
    pad = None if attn_mask is None else ~attn_mask[:, 0, 0]
    if memory is None:
        got = _call_learner(layer, x, **given)
        want = ref(x, src_mask=~causal, src_key_padding_mask=pad)
    else:
        if memory_mask is not None:
            given["memory_mask"] = memory_mask
        got = _call_learner(layer, x, memory, **given)
        kw: dict[str, Any] = {"tgt_mask": ~causal, "tgt_key_padding_mask": pad}
        if memory_mask is not None:
            if memory_mask.dim() == 4 and memory_mask.shape[1:3] == (1, 1):
                kw["memory_key_padding_mask"] = ~memory_mask[:, 0, 0]
            else:                       # PyTorch takes (L, S) or (B * n_head, L, S)
                B, S = memory.size(0), memory.size(1)
                kw["memory_mask"] = (~memory_mask).expand(B, n_head, L, S).reshape(B * n_head, L, S)
        want = ref(x, memory, **kw)
    check_shape(got, tuple(x.shape), "DecoderLayer's output", hint="a layer maps (B, L, d_model) to (B, L, d_model)")
    if got.dtype != x.dtype:
        raise AssertionError(f"DecoderLayer's output is {got.dtype} for a {x.dtype} input: build masks and "
                             "constants on x's device and dtype, and never cast.")
    if not torch.allclose(got.detach(), want.detach(), **_TOL):
        why = _diagnose_layer(layer, x, memory, memory_mask, n_head, norm_first, activation, got, attn_mask)
        diff = float((got.detach() - want.detach()).abs().max())
        what = "nn.TransformerDecoderLayer" if memory is not None else "a causal nn.TransformerEncoderLayer"
        raise AssertionError(f"DecoderLayer(norm_first={norm_first}, activation={activation!r}) differs from "
                             f"{what} with the same weights by up to {diff:.3g}: "
                             + (why if why else "check the order self-attention -> cross-attention -> "
                                "feed-forward, the residuals, the norms and the masks") + ".")
    if not grads:
        return got
    if not got.requires_grad:
        raise AssertionError("DecoderLayer's output does not require grad: the computation was detached "
                             "(torch.no_grad, .detach() or .data inside forward).")
    seed = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(3))
    (got * seed).sum().backward()
    (want * seed).sum().backward()
    d = x.size(-1)
    pairs = [("self_attn.o.weight", layer.self_attn.o.weight, ref.self_attn.out_proj.weight.grad),
             ("ff.linear1.weight", layer.ff.linear1.weight, ref.linear1.weight.grad),
             ("ff.linear2.bias", layer.ff.linear2.bias, ref.linear2.bias.grad),
             ("norm1.weight", layer.norm1.weight, ref.norm1.weight.grad),
             ("norm2.bias", layer.norm2.bias, ref.norm2.bias.grad)]
    for i, n in enumerate("qkv"):
        pairs.append((f"self_attn.{n}.weight", getattr(layer.self_attn, n).weight,
                      ref.self_attn.in_proj_weight.grad[i * d:(i + 1) * d]))
    if memory is not None:
        for i, n in enumerate("qkv"):
            pairs.append((f"cross_attn.{n}.weight", getattr(layer.cross_attn, n).weight,
                          ref.multihead_attn.in_proj_weight.grad[i * d:(i + 1) * d]))
        pairs.append(("norm3.weight", layer.norm3.weight, ref.norm3.weight.grad))
    for name, mine, theirs in pairs:
        if mine.grad is None:
            raise AssertionError(f"{name} received no gradient: the parameter is not used in forward, or the "
                                 "computation was detached.")
        if not torch.allclose(mine.grad, theirs, **_TOL):
            raise AssertionError(f"the gradient of {name} differs from PyTorch's by up to "
                                 f"{float((mine.grad - theirs).abs().max()):.3g} although the output matches: "
                                 "part of the computation is detached (.data, .detach()) or written in place.")
    return got


# ---------------------------------------------------------------- the GPT

def gpt_params_reference(vocab_size: int, max_len: int, d_model: int, n_layers: int, d_ff: int,
                         tie_weights: bool = True, n_head: int | None = None, n_kv_head: int | None = None) -> int:
    """The parameter count of the release's GPT (biases everywhere but the head), grouped K/V optional."""
    d = d_model
    kv = d if n_kv_head is None else n_kv_head * (d // n_head)
    attn = 2 * d * d + 2 * d + 2 * (d * kv + kv)
    block = attn + 2 * d * d_ff + d_ff + d + 4 * d
    return vocab_size * d + max_len * d + n_layers * block + 2 * d + (0 if tie_weights else vocab_size * d)


def check_gpt_structure(model: nn.Module, vocab_size: int, max_len: int, d_model: int, n_layers: int,
                        d_ff: int, tie_weights: bool, layer_cls: type | None = None) -> None:
    """Embeddings, blocks (independent pre-LN DecoderLayers without cross-attention), norm, head, tying."""
    for name in ["tok_emb", "pos_emb", "blocks", "norm", "lm_head"]:
        if getattr(model, name, None) is None:
            raise AssertionError(f"GPT has no submodule {name!r}: the release names them tok_emb, pos_emb, blocks, "
                                 "norm, lm_head.")
    for name, (n, d) in [("tok_emb", (vocab_size, d_model)), ("pos_emb", (max_len, d_model))]:
        w = getattr(getattr(model, name), "weight", None)
        if not isinstance(getattr(model, name), nn.Embedding) or tuple(w.shape) != (n, d):
            raise AssertionError(f"{name} should be nn.Embedding({n}, {d}), not {getattr(model, name)!r}.")
    if getattr(model, "max_len", None) != max_len:
        raise AssertionError(f"model.max_len should be {max_len}: generate() reads it to crop the context.")
    head = model.lm_head
    if not isinstance(head, nn.Linear) or (head.in_features, head.out_features) != (d_model, vocab_size):
        raise AssertionError(f"lm_head should be nn.Linear({d_model}, {vocab_size}, bias=False).")
    if head.bias is not None:
        raise AssertionError("lm_head has a bias: GPT-2's language-model head is Linear(d_model, vocab_size, "
                             "bias=False) (its weight is the embedding; a bias is not part of the model).")
    same = head.weight is model.tok_emb.weight
    if tie_weights and not same:
        if torch.equal(head.weight.detach(), model.tok_emb.weight.detach()):
            raise AssertionError("lm_head.weight holds a copy of tok_emb.weight but is another tensor: tying means "
                                 "one Parameter used twice (self.lm_head.weight = self.tok_emb.weight), not a copy "
                                 "of its values, which training would make drift apart.")
        raise AssertionError("tie_weights=True but lm_head.weight is not tok_emb.weight: assign the embedding's "
                             "Parameter to the head (self.lm_head.weight = self.tok_emb.weight).")
    if not tie_weights and (same or head.weight.data_ptr() == model.tok_emb.weight.data_ptr()):
        raise AssertionError("tie_weights=False but lm_head.weight is still tok_emb.weight: tie only when asked.")
    if not isinstance(model.blocks, nn.ModuleList) or len(model.blocks) != n_layers:
        raise AssertionError(f"blocks should be an nn.ModuleList of {n_layers} DecoderLayers.")
    ids = {id(b) for b in model.blocks}
    if len(ids) != n_layers:
        raise AssertionError("the blocks are one module repeated ([layer] * n_layers): each block needs its own "
                             "parameters -- build a new DecoderLayer for every position in the stack.")
    for i, b in enumerate(model.blocks):
        if layer_cls is not None and not isinstance(b, layer_cls):
            raise AssertionError(f"blocks[{i}] is a {type(b).__name__}, not your DecoderLayer.")
        if getattr(b, "cross_attn", None) is not None:
            raise AssertionError(f"blocks[{i}] has a cross-attention: a GPT block has none (cross_attention=False).")
        if getattr(b, "norm_first", True) is not True:
            raise AssertionError(f"blocks[{i}] is post-LN: the GPT-2 blocks are pre-LN (norm_first=True).")
    w = getattr(model.norm, "weight", None)
    if not isinstance(w, Tensor) or tuple(w.shape) != (d_model,):
        raise AssertionError(f"norm should be the final LayerNorm({d_model}) applied before the head.")


def _gpt_variants(model: nn.Module, idx: Tensor) -> list[tuple[str, Callable[[], Tensor]]]:
    L = idx.size(1)
    pos = torch.arange(L, device=idx.device)

    def run(emb, final=True):
        h = emb
        for b in model.blocks:
            h = b(h)
        return model.lm_head(model.norm(h) if final else h)

    tok = model.tok_emb(idx)
    out = [("the final LayerNorm (model.norm) is missing: with pre-LN blocks the last block's output is not "
            "normalised, so apply self.norm before the head", lambda: run(tok + model.pos_emb(pos), final=False)),
           ("the position embedding is not added to the token embedding",
            lambda: run(tok)),
           ("the tokens are scaled by sqrt(d_model) before the positions are added: GPT-2 adds them as they are",
            lambda: run(tok * math.sqrt(tok.size(-1)) + model.pos_emb(pos)))]
    if L < model.pos_emb.num_embeddings:
        out.append(("the positions are off by one: the first token is at position 0 (torch.arange(L))",
                    lambda: run(tok + model.pos_emb(pos + 1))))
    return out


def check_gpt_forward(model: nn.Module, idx: Tensor, name: str = "GPT(idx)") -> Tensor:
    """model(idx) = lm_head(norm(blocks(tok_emb(idx) + pos_emb(arange(L))))) with the model's own modules."""
    got = _call_learner(model, idx)
    B, L = idx.shape
    V = model.tok_emb.num_embeddings
    check_shape(got, (B, L, V), name, hint="the logits are (B, L, vocab_size): one distribution per position")
    with torch.no_grad():
        h = model.tok_emb(idx) + model.pos_emb(torch.arange(L, device=idx.device))
        for b in model.blocks:
            h = b(h)
        want = model.lm_head(model.norm(h))
    if got.device.type == "meta":
        return got
    if not torch.allclose(got.detach(), want, **_TOL):
        for why, alt in _gpt_variants(model, idx):
            try:
                with torch.no_grad():
                    a = alt()
            except Exception:  # noqa: BLE001
                continue
            if torch.allclose(got.detach(), a, **_TOL):
                raise AssertionError(f"{name} differs from lm_head(norm(blocks(tok_emb + pos_emb))): {why}.")
        raise AssertionError(f"{name} differs from lm_head(norm(blocks(tok_emb(idx) + pos_emb(arange(L))))) "
                             f"computed with the model's own modules by up to "
                             f"{float((got.detach() - want).abs().max()):.3g}: check the order embeddings -> "
                             "blocks -> final norm -> head.")
    return got


def check_no_token_leakage(model: nn.Module, idx: Tensor, positions=None) -> None:
    """Changing the token at position t changes no logit at a position before t (and does change t's).

    positions: the t to try (default: the first, one in the middle, the last).
    """
    L = idx.size(1)
    positions = sorted({0, L // 2, L - 1}) if positions is None else positions
    with torch.no_grad():
        base = _call_learner(model, idx)
        V = base.size(-1)
        for t in positions:
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = _call_learner(model, changed)
            if t and not torch.allclose(out[:, :t], base[:, :t], **_TOL):
                first = int(((out[:, :t] - base[:, :t]).abs().amax(dim=(0, 2)) > 1e-10).nonzero()[0])
                raise AssertionError(f"changing the token at position {t} changed the logits at position {first}: "
                                     "the future leaks into the past -- every self-attention must be causal "
                                     "(and nothing else may mix positions).")
            if torch.allclose(out[:, t], base[:, t], atol=0, rtol=0):
                raise AssertionError(f"changing the token at position {t} left its own logits unchanged: the "
                                     "model does not read its input token (or the mask hides the diagonal).")


def check_param_count(model: nn.Module, expected: int, what: str = "the model") -> None:
    n = sum(p.numel() for p in model.parameters())
    if n != expected:
        raise AssertionError(f"{what} has {n:,} parameters but the release's layout has {expected:,} "
                             f"({n - expected:+,}): a missing or extra bias, norm, head or embedding?")


# ---------------------------------------------------------------- stand-in models for generation

class BigramLM(nn.Module):
    """A language model whose logits at each position are table[token]: sampling tests without training."""

    def __init__(self, table: Tensor, max_len: int):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.max_len = max_len
        self.lengths: list[int] = []

    def forward(self, idx):
        if idx.size(1) > self.max_len:
            raise ValueError(f"{idx.size(1)} tokens exceed max_len={self.max_len}")
        self.lengths.append(idx.size(1))
        return self.table[idx]


class ContextSumLM(BigramLM):
    """Logits at position i are table[(sum of the tokens 0..i of its input) % V]: the crop shows."""

    def forward(self, idx):
        if idx.size(1) > self.max_len:
            raise ValueError(f"{idx.size(1)} tokens exceed max_len={self.max_len}")
        self.lengths.append(idx.size(1))
        return self.table[idx.cumsum(1) % self.table.size(0)]


def _filter(logits: Tensor, temperature: float, top_k, top_p, v: dict) -> Tensor:
    if v.get("temp") == "ignored":
        pass
    elif v.get("temp") == "multiplied":
        logits = logits * temperature
    else:
        logits = logits / temperature
    if top_k is not None:
        k = min(top_k + v.get("k_off", 0), logits.size(-1))
        kth = torch.topk(logits, max(k, 1), dim=-1).values[..., -1:]
        if v.get("k_drop"):
            logits = logits.masked_fill(logits <= kth, float("-inf"))
        else:
            logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=v.get("dim", -1))
    if top_p is not None and top_p < 1.0:
        sp, si = torch.sort(probs, dim=-1, descending=True)
        before = sp.cumsum(-1) - sp
        if v.get("p") == "strict":          # drops the token that crosses top_p
            keep_sorted = sp.cumsum(-1) <= top_p
        elif v.get("p") == "inverted":
            keep_sorted = before >= top_p
        else:
            keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, si, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
        if v.get("p") == "before_temperature":
            raise RuntimeError
    return probs


def reference_generate(model, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                       generator=None, top_p=None, eos_id=None, **variant) -> Tensor:
    """The release's generate; ``variant`` reproduces a mistake (for the diagnoses)."""
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    crop = variant.get("crop", "last")
    for _ in range(max_new_tokens):
        ctx = {"last": idx[:, -model.max_len:], "first": idx[:, :model.max_len],
               "short": idx[:, -(model.max_len - 1):]}[crop]
        with torch.no_grad():
            logits = model(ctx)[:, variant.get("pos", -1), :]
        if temperature == 0 and not variant.get("t0_divide"):
            nxt = logits.argmax(-1, keepdim=True)
        else:
            if variant.get("p") == "before_temperature" and top_p is not None:
                probs = _filter(logits, 1.0, top_k, top_p, {})
                logits = torch.log(probs) / temperature
                probs = torch.softmax(logits, -1)
            else:
                probs = _filter(logits, temperature, top_k, top_p, variant)
            nxt = torch.multinomial(probs, 1, generator=generator)
        if eos_id is not None:
            if variant.get("eos") != "no_fill":
                nxt = nxt.masked_fill(finished[:, None], eos_id)
            finished = finished | (nxt[:, 0] == eos_id)
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and finished.all() and variant.get("eos") != "no_stop":
            break
    return idx


_ERROR_VARIANTS = [
    (dict(t0_divide=True), "temperature 0 was used as a divisor (inf and NaN logits): temperature 0 is greedy "
                           "decoding, take the argmax and never divide by it"),
    (dict(dim=0), "the softmax ran over the wrong dimension (the batch): normalise over the vocabulary, dim=-1"),
    (dict(k_drop=True), "top_k keeps k - 1 tokens (top_k=1 keeps none): it drops the k-th largest logit (<= "
                        "instead of <); keep the k largest, the k-th included"),
    (dict(p="strict"), "top_p drops the token that crosses the threshold (a row whose most probable token alone "
                       "exceeds top_p keeps nothing): keep every token whose preceding mass is < top_p"),
]

_GEN_VARIANTS = [
    (dict(p="before_temperature"), "top_p was applied before the temperature: divide by the temperature, then "
                                   "filter top-k, then top-p on the resulting probabilities"),
    (dict(crop="first"), "the context was cropped to its first max_len tokens: keep the last ones, "
                         "idx[:, -model.max_len:]"),
    (dict(crop="short"), "the context was cropped to max_len - 1 tokens: the model can read max_len"),
    (dict(pos=0), "the next token was taken from the logits of the first position: use the last, logits[:, -1, :]"),
    (dict(temp="ignored"), "the temperature has no effect: divide the logits by it before the softmax (dividing "
                           "the probabilities after the softmax is undone by torch.multinomial's normalisation)"),
    (dict(temp="multiplied"), "the logits were multiplied by the temperature: divide them by it"),
    (dict(dim=0), "the softmax ran over the wrong dimension (the batch): normalise over the vocabulary, dim=-1"),
    (dict(k_off=1), "top_k keeps k + 1 tokens: keep exactly the k largest logits"),
    (dict(k_off=-1), "top_k keeps k - 1 tokens: keep exactly the k largest logits (the k-th included)"),
    (dict(k_drop=True), "top_k keeps k - 1 tokens: it drops the k-th largest logit (<= instead of <): keep the k "
                        "largest, the k-th included"),
    (dict(p="strict"), "top_p drops the token that crosses the threshold: the nucleus is the smallest set whose "
                       "probability reaches top_p, so the token that crosses it is kept"),
    (dict(eos="no_fill"), "a finished row kept generating: once a row has produced eos_id, every later token of "
                          "that row is eos_id"),
    (dict(eos="no_stop"), "generation did not stop when every row had produced eos_id: stop after that step"),
]


def check_generate(generate: Callable[..., Tensor], model: nn.Module, idx: Tensor, max_new_tokens: int,
                   seed: int | None = 0, name: str = "generate", **kwargs: Any) -> Tensor:
    """generate(model, idx, max_new_tokens, generator=..., **kwargs) gives the reference tokens exactly.

    Also: the input is not modified, the global random state is untouched, the generator advanced as
    the reference's (not at all for temperature 0), and the result is int64 on idx's device.
    """
    call = f"{name}(model, idx, {max_new_tokens}" + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"
    before_idx = idx.clone()
    g_mine = torch.Generator().manual_seed(seed) if seed is not None else None
    g_ref = torch.Generator().manual_seed(seed) if seed is not None else None
    rng = torch.get_rng_state()
    torch.manual_seed(1234)
    marker = torch.get_rng_state()
    try:
        got = _call_learner(generate, model, idx, max_new_tokens, generator=g_mine, **kwargs)
    except RuntimeError as e:
        if "probability tensor" in str(e) or "invalid multinomial" in str(e):
            torch.set_rng_state(rng)
            for kw, why in _ERROR_VARIANTS:
                try:
                    with torch.random.fork_rng():
                        reference_generate(model, idx, max_new_tokens, generator=torch.Generator().manual_seed(0),
                                           **kwargs, **kw)
                except RuntimeError as e2:
                    if "probability tensor" in str(e2) or "invalid multinomial" in str(e2):
                        raise AssertionError(f"{call}: torch.multinomial got probabilities with NaN, inf or no "
                                             f"positive entry: {why}.") from None
            raise AssertionError(f"{call}: torch.multinomial got probabilities with NaN, inf or no positive entry "
                                 "-- temperature 0 must be greedy (never divide by it), and the filters must keep "
                                 "at least one token (top_k the k largest, the k-th included; top_p at least the "
                                 "most probable).") from None
        raise
    except ValueError as e:
        if "exceed" in str(e) and "max_len" in str(e):
            raise AssertionError(f"{call} passed more than model.max_len tokens to the model: crop the context "
                                 "to the last max_len tokens, idx[:, -model.max_len:], at every step.") from None
        raise
    used_global = not torch.equal(torch.get_rng_state(), marker)
    torch.set_rng_state(rng)
    if not torch.equal(idx, before_idx):
        raise AssertionError(f"{call} modified idx in place: build the result with torch.cat.")
    if not isinstance(got, Tensor):
        raise AssertionError(f"{call} returned a {type(got).__name__}, not a tensor of token ids.")
    if got.dtype != torch.int64 or got.device != idx.device:
        raise AssertionError(f"{call} returned {got.dtype} on {got.device}: token ids are int64 on idx's device.")
    with torch.random.fork_rng():
        want = reference_generate(model, idx, max_new_tokens, generator=g_ref, **kwargs)
    if used_global:
        raise AssertionError(f"{call} drew from the global random generator: pass generator=generator to "
                             "torch.multinomial (the only random call), so that a seeded generator reproduces "
                             "the tokens." if kwargs.get("temperature", 1.0) != 0 else
                             f"{call} drew random numbers although temperature 0 is greedy: take the argmax.")
    if got.shape != want.shape or not torch.equal(got, want):
        for kw, why in _GEN_VARIANTS:
            g_alt = torch.Generator().manual_seed(seed) if seed is not None else None
            try:
                with torch.random.fork_rng():
                    alt = reference_generate(model, idx, max_new_tokens, generator=g_alt, **kwargs, **kw)
            except Exception:  # noqa: BLE001
                continue
            if alt.shape == got.shape and torch.equal(alt, got):
                raise AssertionError(f"{call} differs from the reference: {why}.")
        if got.shape != want.shape:
            raise AssertionError(f"{call} returned shape {tuple(got.shape)}, the reference {tuple(want.shape)}: "
                                 "append one token per step to every row (and stop early only when every row "
                                 "has produced eos_id).")
        if kwargs.get("temperature", 1.0) == 0:
            raise AssertionError(f"{call} is not greedy decoding: temperature 0 takes the argmax of the last "
                                 "position's logits at every step, without sampling.")
        raise AssertionError(f"{call} gives other tokens than the reference with the same seeded generator: draw "
                             "exactly one torch.multinomial(probs, 1, generator=generator) per step, probs "
                             "(B, vocab_size) = softmax(logits / temperature) after the top-k (and top-p) "
                             "filters, from the logits of the last position.")
    if seed is not None and not torch.equal(g_mine.get_state(), g_ref.get_state()):
        if kwargs.get("temperature", 1.0) == 0:
            raise AssertionError(f"{call} drew random numbers although temperature 0 is greedy: take the argmax "
                                 "(greedy must not sample).")
        raise AssertionError(f"{call} gives the right tokens but drew more (or fewer) random numbers than one "
                             "torch.multinomial(probs, 1, generator=generator) per step.")
    return got


# ---------------------------------------------------------------- the formula and the loss

def check_no_tensor_work(fn: Callable[..., Any], *args: Any, what: str = "the function", **kwargs: Any) -> Any:
    """Call fn and fail if it runs any tensor operation (it must be arithmetic on Python integers)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _TensorWork(Exception):
        pass

    class Refuse(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            raise _TensorWork(str(func))

    try:
        with Refuse():
            result = _call_learner(fn, *args, **kwargs)
    except _TensorWork as e:
        raise AssertionError(f"{what} ran tensor operations ({e} first): compute the count from the sizes "
                             "with integer arithmetic, without building a model or any tensor.") from None
    return result


def check_next_token_loss(fn: Callable[..., Tensor], model: nn.Module, idx: Tensor) -> Tensor:
    """fn(model, idx) is the mean cross-entropy of predicting idx[:, 1:] from the logits of idx[:, :-1]."""
    got = _call_learner(fn, model, idx)
    if not isinstance(got, Tensor) or got.dim() != 0:
        raise AssertionError("next_token_loss should return a scalar tensor (the mean over all predicted tokens).")
    with torch.no_grad():
        logits = model(idx)
        V = logits.size(-1)
        want = F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
        variants = [
            ("the targets are not shifted: position i predicts token i + 1, so the targets are idx[:, 1:] for the "
             "logits of idx[:, :-1]", lambda: F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, :-1].reshape(-1))),
            ("the shift goes the wrong way: the logits at position i predict token i + 1 (logits[:, :-1] against "
             "idx[:, 1:]), not token i - 1", lambda: F.cross_entropy(logits[:, 1:].reshape(-1, V),
                                                                      idx[:, :-1].reshape(-1))),
            ("the loss is summed: take the mean over all B * (L - 1) predicted tokens",
             lambda: F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1), reduction="sum")),
            ("the loss includes the last position, which has no next token: use the first L - 1 positions",
             lambda: F.cross_entropy(logits.reshape(-1, V), torch.cat([idx[:, 1:], idx[:, :1]], 1).reshape(-1))),
        ]
    if not torch.allclose(got.detach().to(want.dtype), want, **_TOL):
        for why, alt in variants:
            if torch.allclose(got.detach().to(want.dtype), alt(), **_TOL):
                raise AssertionError(f"next_token_loss differs from the reference: {why}.")
        check_close(got, want, "next_token_loss(model, idx)",
                    hint="the mean F.cross_entropy of the logits of positions 0 .. L-2 against tokens 1 .. L-1")
    return got
