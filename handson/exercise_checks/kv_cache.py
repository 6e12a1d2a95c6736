"""Checks with diagnoses for the KV-cache exercise.

A cache is duck-typed as the decoder's GPT uses it: ``update(layer, k, v) -> (k_all, v_all)``,
``advance(n)``, ``__len__`` (and ``reset()``, ``crop(n)`` where asked). The checks feed known keys
and values and look at what comes back, compare a model's logits with and without a cache in
float64, count the tokens every ``nn.Linear`` projects (forward hooks), and measure the bytes a
cache holds (every tensor it keeps, each storage counted once). Every failure raises
:class:`AssertionError` with one sentence naming the likely mistake.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from handson.checks import _call_learner, check_raises

__all__ = ["cache_bytes", "expected_bytes", "window_mask", "check_cache_update", "check_cache_limits",
           "check_cached_logits", "check_generate_cached", "check_projects_only_new", "check_crop",
           "check_ring_update", "check_ring_memory", "check_ring_logits", "check_generate_batch"]

ATOL = 1e-10


# --- helpers ------------------------------------------------------------------------------------
def _tensors(obj: Any, depth: int = 0) -> list[Tensor]:
    """Every tensor an object holds in its attributes (lists, tuples and dicts of them included)."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth > 3:
        return []
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x, depth + 1)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x, depth + 1)]
    if depth == 0 and hasattr(obj, "__dict__"):
        return [t for x in vars(obj).values() for t in _tensors(x, depth + 1)]
    return []


def _storages(obj: Any) -> dict[int, int]:
    """{storage data pointer: its bytes} of every tensor the cache holds (meta tensors included)."""
    out = {}
    for t in _tensors(obj):
        s = t.untyped_storage()
        key = s.data_ptr() if t.device.type != "meta" else id(s)
        out[key] = s.nbytes()
    return out


def cache_bytes(cache: Any) -> int:
    """The bytes of every tensor a cache object holds, each storage counted once."""
    return sum(_storages(cache).values())


def expected_bytes(n_layers: int, batch_size: int, n_kv_head: int, n_tokens: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """2 (keys and values) * layers * batch * kv heads * tokens * head_dim * bytes per element."""
    return 2 * n_layers * batch_size * n_kv_head * n_tokens * head_dim * torch.empty(0, dtype=dtype).element_size()


def window_mask(L: int, window: int, device: Any = None) -> Tensor:
    """(L, L) bool, True = may attend: query i sees keys i - window < j <= i."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    return (j <= i) & (j > i - window)


def _build(cls: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    name = getattr(cls, "__name__", "the cache")
    try:
        return _call_learner(cls, *args, **kwargs)
    except (TypeError, NotImplementedError) as exc:
        raise AssertionError(f"{name}{args} with {kwargs} could not be built ({type(exc).__name__}: {exc}): "
                             "the signature is (n_layers, batch_size, n_kv_head, max_len, head_dim, *, "
                             "dtype=None, device=None).") from None


def _pair(res: Any, where: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(res, tuple) and len(res) == 2 and all(isinstance(t, Tensor) for t in res)):
        got = f"a tuple of length {len(res)}" if isinstance(res, tuple) else type(res).__name__
        raise AssertionError(f"{where} must return a pair (k_all, v_all) of tensors, but it returned {got}.")
    return res


def _len(cache: Any, where: str) -> int:
    try:
        n = len(cache)
    except TypeError as exc:
        raise AssertionError(f"len(cache) failed {where} ({exc}): define __len__, the number of tokens "
                             "cached so far.") from None
    if not isinstance(n, int):
        raise AssertionError(f"len(cache) must be an int, not {type(n).__name__}.")
    return n


def _kv(n_layers: int, B: int, H: int, n: int, d: int, dtype: torch.dtype, device: Any = None,
        seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_layers, B, H, n, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(n_layers, B, H, n, d, generator=g, dtype=torch.float64).to(dtype)
    return (k.to(device), v.to(device)) if device is not None else (k, v)


def _diagnose_values(got: Tensor, want: Tensor, new: Tensor, other: Tensor, a: int, b: int, what: str,
                     where: str, layer_vals: Sequence[Tensor] = ()) -> None:
    """Name the mistake when update's keys (or values) are not the ones written so far."""
    if got.shape == want.shape and torch.equal(got, want):
        return
    T = b - a
    if got.shape == want.shape and torch.equal(got, other):
        raise AssertionError(f"{where} returned the values as keys (or the keys as values): keep k and v in "
                             "their own buffers and return (k_all, v_all) in that order.")
    if got.dim() == 4 and got.shape[2] == T and b != T and torch.equal(got, new):
        raise AssertionError(f"{where} returned only the {T} new {what}: update must return ALL {what} cached "
                             f"so far, the {a} earlier ones followed by the new ones, (B, n_kv_head, {b}, "
                             "head_dim).")
    if got.dim() == 4 and got.shape[:2] == want.shape[:2] and got.shape[3] == want.shape[3] \
            and got.shape[2] != b:
        raise AssertionError(f"{where} returned {got.shape[2]} {what} after {b} tokens were written: return the "
                             f"slots 0 .. len(cache) + T - 1 = {b - 1} (the buffers hold max_len slots, no fewer; the "
                             "position must be len(cache) before the update and move only in advance()).")
    if got.shape != want.shape:
        raise AssertionError(f"{where} returned {what} of shape {tuple(got.shape)}, expected "
                             f"{tuple(want.shape)} = (B, n_kv_head, tokens so far, head_dim): the tokens are "
                             "dimension 2 (concatenate or write along dim 2, the token dimension).")
    for other_layer in layer_vals:
        if torch.equal(got[:, :, :a], other_layer[:, :, :a]) and a > 0:
            raise AssertionError(f"{where} returned the {what} of another layer: every layer needs its own "
                                 "slice of the buffers (index them by `layer`).")
    if torch.equal(got[:, :, a:b], new):
        raise AssertionError(f"{where}: the new {what} are right but the earlier ones changed: an update "
                             "overwrote cached slots (write at positions len(cache) .. len(cache) + T - 1 "
                             "only).")
    if a > 0 and torch.equal(got[:, :, :a], want[:, :, :a]):
        raise AssertionError(f"{where}: the cached {what} are right but the new ones are not at positions "
                             f"{a} .. {b - 1}: the update wrote them at the wrong slot (the slot of a new "
                             "token is len(cache) + t).")
    raise AssertionError(f"{where} did not return the {what} that were written: they are at the wrong slot or "
                         f"were overwritten; slot p must hold the {what} of token p, unchanged, and the T new "
                         "tokens go to slots len(cache) .. len(cache) + T - 1.")



def _explain_runtime(exc: RuntimeError) -> str | None:
    text = str(exc)
    if "Sizes of tensors must match except in dimension" in text:
        return ("torch.cat joined the keys along another dimension than the tokens: the cache's tensors are "
                "(B, n_kv_head, tokens, head_dim), so concatenate (or write) along dim 2, the token dimension")
    if "Index put requires the source and destination dtypes match" in text:
        return ("the buffers are in another dtype than the keys written into them: allocate them in the dtype "
                "asked (dtype=None means torch.get_default_dtype())")
    if "expanded size of the tensor" in text or "must match the existing size" in text:
        return ("the new keys do not fit the slice of the buffer they are written to: the buffers are (n_layers, "
                "batch_size, n_kv_head, max_len, head_dim), with the model's n_kv_head "
                "(model.blocks[0].self_attn.n_kv_head) and head_dim, and the slice is len(cache) .. len(cache) + T")
    return None


def _learner(fn: Callable[..., Any], *args: Any, what: str = "", **kwargs: Any) -> Any:
    """_call_learner, with the cache's usual RuntimeErrors and refusals turned into diagnoses."""
    try:
        return _call_learner(fn, *args, **kwargs)
    except RuntimeError as exc:
        why = _explain_runtime(exc)
        if why is None:
            raise
        first = str(exc).strip().splitlines()[0][:160]
        raise AssertionError(f"{what or 'the call'} failed: {why} (PyTorch said: {first})") from None


def _update(cache: Any, layer: int, k: Tensor, v: Tensor, where: str, max_len: int | None = None) -> Any:
    try:
        return _learner(cache.update, layer, k, v, what=where)
    except ValueError as exc:
        limit = f" (max_len={max_len})" if max_len is not None else ""
        raise AssertionError(f"{where} raised ValueError ({exc}), but the tokens fit{limit}: up to max_len tokens "
                             "must fit (refuse only when len(cache) + T > max_len).") from None


# --- KVCache ------------------------------------------------------------------------------------
def check_cache_update(cls: Callable[..., Any], *, n_layers: int = 2, B: int = 2, H: int = 2,
                       max_len: int = 9, d: int = 3, chunks: Sequence[int] = (3, 1, 2),
                       dtype: torch.dtype = torch.float64) -> None:
    """Write known keys and values chunk by chunk; check what update returns, len, advance, reset."""
    cache = _build(cls, n_layers, B, H, max_len, d, dtype=dtype)
    if _len(cache, "on a new cache") != 0:
        raise AssertionError(f"a new cache must be empty, but len(cache) is {len(cache)}.")
    ks, vs = _kv(n_layers, B, H, max_len, d, dtype)
    for rnd in range(2):
        a = 0
        for T in chunks:
            b = a + T
            got = []
            for layer in range(n_layers):
                where = (f"update(layer={layer}, k, v) with {T} new token(s) after {a} cached"
                         + (" (after reset())" if rnd else ""))
                k_all, v_all = _pair(_update(cache, layer, ks[layer, :, :, a:b], vs[layer, :, :, a:b], where,
                                             max_len), where)
                n = _len(cache, "inside a step")
                if n != a:
                    raise AssertionError(
                        f"len(cache) changed from {a} to {n} inside update(layer={layer}): the position must "
                        "move only in advance(n), called once after ALL layers were updated (advancing in "
                        "update moves it once per layer).")
                if k_all.dtype != dtype or v_all.dtype != dtype:
                    raise AssertionError(f"{where} returned {k_all.dtype}, not {dtype}: allocate the buffers in the "
                                         "dtype asked (dtype=None means torch.get_default_dtype()), not float32 "
                                         "regardless of dtype.")
                _diagnose_values(k_all, ks[layer, :, :, :b], ks[layer, :, :, a:b], vs[layer, :, :, :b], a, b,
                                 "keys", where, [ks[other, :, :, :b] for other in range(n_layers) if other != layer])
                _diagnose_values(v_all, vs[layer, :, :, :b], vs[layer, :, :, a:b], ks[layer, :, :, :b], a, b,
                                 "values", where, [vs[other, :, :, :b] for other in range(n_layers) if other != layer])
                got.append(k_all)
            _call_learner(cache.advance, T)
            n = _len(cache, "after advance")
            if n != b:
                why = ("advance(n) did not move the position" if n == a else
                       "the position was advanced twice (in update or in advance and again)" if n == a + 2 * T
                       else "advance(n) must add n to the position")
                raise AssertionError(f"after caching {b} tokens (advance({T})) len(cache) is {n}, expected {b}: "
                                     f"{why}.")
            a = b
        _call_learner(cache.reset)
        n = _len(cache, "after reset")
        if n != 0:
            raise AssertionError(f"reset() must set the position back to 0 (len(cache) is {n} after reset()).")
        ks, vs = _kv(n_layers, B, H, max_len, d, dtype, seed=1)


def check_cache_limits(cls: Callable[..., Any], *, n_layers: int = 2, B: int = 2, H: int = 3,
                       max_len: int = 5, d: int = 4) -> None:
    """max_len enforced with a clear ValueError; dtype, device (meta) and the memory formula."""
    for dtype in (torch.float64, torch.float16, None):
        cache = _build(cls, n_layers, B, H, max_len, d, dtype=dtype)
        want_dtype = torch.get_default_dtype() if dtype is None else dtype
        want = expected_bytes(n_layers, B, H, max_len, d, want_dtype)
        dtypes = {t.dtype for t in _tensors(cache) if t.is_floating_point()}
        if dtypes and dtypes != {want_dtype}:
            raise AssertionError(f"KVCache(..., dtype={dtype}) holds {sorted(map(str, dtypes))} buffers: allocate "
                                 f"them in the dtype asked ({want_dtype}), not float32 regardless of dtype.")
        got = cache_bytes(cache)
        if got != want:
            hint = ("nothing is allocated in __init__: pre-allocate both buffers (n_layers, batch_size, "
                    "n_kv_head, max_len, head_dim) when the cache is built" if got == 0 else
                    "the buffers are not (n_layers, batch_size, n_kv_head, max_len, head_dim) for k and for v")
            raise AssertionError(f"a new cache holds {got} bytes, but the formula 2 * n_layers * batch * n_kv_head "
                                 f"* max_len * head_dim * element size gives {want} for ({n_layers}, {B}, {H}, "
                                 f"{max_len}, {d}) in {want_dtype}: {hint}.")
    ks, vs = _kv(n_layers, B, H, max_len + 2, d, torch.float64)
    cache = _build(cls, n_layers, B, H, max_len, d, dtype=torch.float64)
    m = max_len - 1
    try:
        for layer in range(n_layers):
            _call_learner(cache.update, layer, ks[layer, :, :, :m], vs[layer, :, :, :m])
        _call_learner(cache.advance, m)
    except ValueError as exc:
        raise AssertionError(f"a cache of max_len={max_len} refused {m} tokens ({exc}): up to max_len tokens must "
                             "fit (refuse only when len(cache) + T > max_len).") from None
    exc = check_raises(ValueError, cache.update, 0, ks[0, :, :, m:m + 2], vs[0, :, :, m:m + 2],
                       why=f"{m} tokens cached + 2 new do not fit in max_len={max_len}: raise ValueError before "
                           "writing anything")
    if str(max_len) not in str(exc):
        raise AssertionError(f"the ValueError past max_len says {str(exc)!r}: a clear message names the limit "
                             f"(max_len={max_len}) and how many tokens were asked for.")
    if _len(cache, "after the refused update") != m:
        raise AssertionError("a refused update must leave the cache unchanged (len(cache) moved).")
    for layer in range(n_layers):
        try:
            res = _call_learner(cache.update, layer, ks[layer, :, :, m:m + 1], vs[layer, :, :, m:m + 1])
        except ValueError as exc:
            raise AssertionError(f"with {m} tokens cached, update refused the last one of max_len={max_len} ({exc}): "
                                 "max_len tokens must fit (refuse only when len(cache) + T > max_len).") from None
        k_all, _ = _pair(res, "the update that fills the cache")
        if not torch.equal(k_all, ks[layer, :, :, :max_len]):
            raise AssertionError("after a refused update, the update that fills the cache returned other keys: a "
                                 "refused update must write nothing (check the room before writing).")
    _call_learner(cache.advance, 1)
    check_raises(ValueError, cache.update, 0, ks[0, :, :, max_len:max_len + 1], ks[0, :, :, max_len:max_len + 1],
                 why=f"the cache is full ({max_len} tokens): one more must raise ValueError")
    # the meta device: nothing is computed, but every tensor must be made on the device asked
    cache = _build(cls, n_layers, B, H, max_len, d, dtype=torch.float32, device="meta")
    devices = {t.device.type for t in _tensors(cache)}
    if devices != {"meta"}:
        raise AssertionError(f"KVCache(..., device='meta') holds tensors on {sorted(devices)}: create the buffers "
                             "with device=device.")
    k = torch.empty(B, H, 2, d, device="meta")
    res = _pair(_call_learner(cache.update, 0, k, k), "update on the meta device")
    if res[0].device.type != "meta" or tuple(res[0].shape) != (B, H, 2, d):
        raise AssertionError("update on the meta device must return meta tensors (B, n_kv_head, 2, head_dim).")


def _logit_step_hint(cache: Any, before: int, T: int, n_layers: int) -> str:
    n = len(cache)
    if n == before:
        return "len(cache) did not move: advance(n) must add n (the model calls it after all layers)"
    if n == before + 2 * T:
        return "len(cache) moved twice: the position is advanced in update and again in advance"
    if n == before + n_layers * T or n == before + (n_layers + 1) * T:
        return "len(cache) moved once per layer: advance only in advance(n), not in update"
    return ""


def check_cached_logits(make_cache: Callable[[int], Any], model: torch.nn.Module, idx: Tensor,
                        chunks: Sequence[int], *, reset_and_repeat: bool = True, label: str = "") -> None:
    """Feed idx chunk by chunk through model(chunk, cache): every chunk's logits equal the full forward's.

    ``make_cache(batch_size)`` builds an empty cache for the model. The first chunk is the prompt.
    """
    L = idx.size(1)
    if sum(chunks) != L:
        raise ValueError("check_cached_logits: the chunks must add up to idx.size(1)")
    n_layers = len(model.blocks)
    with torch.no_grad():
        full = model(idx)
        cache = make_cache(idx.size(0))
        for rnd in range(2 if reset_and_repeat else 1):
            a = 0
            for c in chunks:
                b = a + c
                where = (f"{label}chunk of {c} token(s) at positions {a}..{b - 1} after {a} cached"
                         + (" (after reset())" if rnd else ""))
                try:
                    got = _learner(model, idx[:, a:b], cache, what=f"the model with your cache, {where}")
                except ValueError as exc:
                    raise AssertionError(f"the model raised ValueError for the {where} ({exc}): the cache "
                                         "refused tokens that fit in max_len, or len(cache) is too large.") from None
                hint = _logit_step_hint(cache, a, c, n_layers)
                diff = (got - full[:, a:b]).abs().max().item() if got.shape == full[:, a:b].shape else float("inf")
                if not diff <= ATOL:
                    if hint:
                        raise AssertionError(f"the logits of the {where} differ from the full forward (max diff "
                                             f"{diff:.2e}): {hint}.")
                    raise AssertionError(f"the logits of the {where} differ from the full forward (max diff "
                                         f"{diff:.2e}): the keys and values returned by update must be exactly "
                                         "those of positions 0 .. len(cache) + T - 1.")
                if len(cache) != b:
                    raise AssertionError(f"after the {where}, len(cache) is {len(cache)}, expected {b}: "
                                         f"{hint or 'advance(n) must add n'}.")
                a = b
            if reset_and_repeat and rnd == 0:
                _call_learner(cache.reset)
                if len(cache) != 0:
                    raise AssertionError(f"reset() must set the position back to 0 (len(cache) is {len(cache)}).")


# --- generate_cached ----------------------------------------------------------------------------
def check_generate_cached(fn: Callable[..., Any], reference: Callable[..., Any], model: torch.nn.Module,
                          idx: Tensor, max_new_tokens: int, **kwargs: Any) -> None:
    """fn(model, idx, n, **kwargs) returns the tokens of reference (the decoder's generate), same generator."""
    seed = 1234
    g_ref = torch.Generator().manual_seed(seed) if kwargs.get("temperature", 1.0) != 0 else None
    g_got = torch.Generator().manual_seed(seed) if g_ref is not None else None
    want = reference(model, idx.clone(), max_new_tokens, generator=g_ref, **kwargs)
    call = f"generate_cached(model, idx {tuple(idx.shape)}, {max_new_tokens}, {kwargs})"
    got = _learner(fn, model, idx.clone(), max_new_tokens, what=call, generator=g_got, **kwargs)
    if not isinstance(got, Tensor):
        raise AssertionError(f"{call} must return a tensor (B, L + max_new_tokens), not {type(got).__name__}.")
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{call} returned shape {tuple(got.shape)}, expected {tuple(want.shape)}: the prompt "
                             "followed by max_new_tokens new tokens.")
    if not torch.equal(got[:, :idx.size(1)], idx):
        raise AssertionError(f"{call} must start with the prompt unchanged.")
    if torch.equal(got, want):
        if g_ref is not None and g_ref.get_state().ne(g_got.get_state()).any():
            raise AssertionError(f"{call} gives the right tokens but leaves the generator in another state: draw "
                                 "exactly once per step with torch.multinomial(probs, 1, generator=generator).")
        return
    first = int((got != want).any(0).nonzero()[0]) - idx.size(1)
    if kwargs.get("temperature", 1.0) == 0:
        raise AssertionError(f"{call} differs from generate at new token {first} with temperature=0: greedy "
                             "decoding takes the argmax of the last position's logits; check the logits of "
                             "each decode step (only the new token, positions continuing from len(cache)).")
    raise AssertionError(f"{call} samples tokens different from generate (first at new token {first}) with the "
                         "same seed: scale the last position's logits by 1/temperature, keep the top_k, softmax, "
                         "then torch.multinomial(probs, 1, generator=generator) once per step, as generate does "
                         "(pass the generator, argmax only for temperature 0).")


def check_projects_only_new(fn: Callable[..., Any], model: torch.nn.Module, idx: Tensor,
                            max_new_tokens: int, **kwargs: Any) -> None:
    """Forward hooks on every nn.Linear: the prompt is projected once, then one token per decode step."""
    seen: dict[str, list[int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: Any, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            seen.setdefault(name, []).append(int(x.shape[-2]) if x.dim() >= 3 else 1)
        return record

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_hook(hook(n)) for n, m in linears]
    try:
        _call_learner(fn, model, idx, max_new_tokens, **kwargs)
    finally:
        for h in handles:
            h.remove()
    P = idx.size(1)
    want = [P] + [1] * (max_new_tokens - 1)
    name = linears[0][0]
    got = seen.get(name, [])
    if got == want:
        return
    if not got:
        raise AssertionError("generate_cached never ran the model (no nn.Linear was called).")
    if len(got) >= 2 and got[1] > 1 and got[1] == P + 1:
        raise AssertionError(f"the layer {name!r} projected {got[:4]}... tokens per call: every step re-feeds the "
                             "whole sequence (no cache, or a cache that is not used); with a cache, feed only the "
                             "new token, and its position continues from len(cache).")
    if got[0] == 1 and P > 1:
        raise AssertionError(f"the layer {name!r} projected {got[:4]}... tokens per call: the prompt was fed "
                             "token by token; prefill it in ONE call (all prompt positions at once), then one "
                             "token per step.")
    if len(got) == len(want) + 1:
        raise AssertionError(f"the model was called {len(got)} times for {max_new_tokens} new tokens: the last "
                             "token needs no forward pass (prefill, then max_new_tokens - 1 decode steps).")
    raise AssertionError(f"the layer {name!r} projected {got} tokens per call; expected {want}: the prompt once, "
                         "then only the new token at each step.")


# --- crop ---------------------------------------------------------------------------------------
def check_crop(make_cache: Callable[[int], Any], model: torch.nn.Module, idx: Tensor, prefix: int,
               keep: int) -> None:
    """Cache idx[:, :prefix], crop(keep), then feed idx[:, keep:]: logits equal the full forward's."""
    if not 0 <= keep <= prefix <= idx.size(1):
        raise ValueError("check_crop: need 0 <= keep <= prefix <= L")
    with torch.no_grad():
        full = model(idx)
        cache = make_cache(idx.size(0))
        _call_learner(model, idx[:, :prefix], cache)
        crop = getattr(cache, "crop", None)
        if crop is None:
            raise AssertionError("the cache has no method crop(n).")
        check_raises(ValueError, crop, prefix + 1,
                     why=f"crop({prefix + 1}) asks to keep more tokens than the {prefix} cached")
        check_raises(ValueError, crop, -1, why="crop(-1): n must be 0 <= n <= len(cache)")
        if len(cache) != prefix:
            raise AssertionError(f"a refused crop must leave the cache unchanged (len(cache) is {len(cache)}, "
                                 f"expected {prefix}).")
        _call_learner(crop, keep)
        n = len(cache)
        if n != keep:
            why = (f"crop(n) removed n tokens instead of keeping the first n" if n == prefix - keep else
                   "crop(n) did not move the position" if n == prefix else "crop(n) must set len(cache) to n")
            raise AssertionError(f"after {prefix} cached tokens, crop({keep}) left len(cache) = {n}, expected {keep}: "
                                 f"{why} (the first n tokens are kept).")
        got = _call_learner(model, idx[:, keep:], cache)
        diff = (got - full[:, keep:]).abs().max().item() if got.shape == full[:, keep:].shape else float("inf")
        if not diff <= ATOL:
            raise AssertionError(f"after crop({keep}) of {prefix} cached tokens, the logits of the tokens fed next "
                                 f"differ from the full forward (max diff {diff:.2e}): the next update must write "
                                 f"from slot {keep} and return only slots 0 .. {keep} + T - 1, not the discarded ones.")
        if len(cache) != idx.size(1):
            raise AssertionError(f"after crop({keep}) and {idx.size(1) - keep} more tokens, len(cache) is "
                                 f"{len(cache)}, expected {idx.size(1)}.")


# --- the ring-buffer (sliding-window) cache -----------------------------------------------------
def _build_ring(cls: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return _call_learner(cls, *args, **kwargs)
    except (TypeError, NotImplementedError) as exc:
        raise AssertionError(f"SlidingWindowCache{args} could not be built ({type(exc).__name__}: {exc}): the "
                             "signature is (n_layers, batch_size, n_kv_head, window, head_dim, *, dtype=None, "
                             "device=None).") from None


def check_ring_update(cls: Callable[..., Any], *, n_layers: int = 2, B: int = 1, H: int = 2, window: int = 4,
                      d: int = 3, prompt: int = 3, steps: int = 7) -> None:
    """Slots, views, len and the ValueError of a ring buffer, with known keys and values."""
    cache = _build_ring(cls, n_layers, B, H, window, d, dtype=torch.float64)
    n_tok = prompt + steps
    ks, vs = _kv(n_layers, B, H, n_tok, d, torch.float64, seed=3)
    held = _storages(cache)
    pos = 0
    for T in [prompt] + [1] * steps:
        end = pos + T
        for layer in range(n_layers):
            where = f"update(layer={layer}) of {T} token(s) after {pos} seen (window {window})"
            k_all, v_all = _pair(_learner(cache.update, layer, ks[layer, :, :, pos:end], vs[layer, :, :, pos:end],
                                          what=where), where)
            S = min(end, window)
            if k_all.dtype != torch.float64 or v_all.dtype != torch.float64:
                raise AssertionError(f"{where} returned {k_all.dtype} for a float64 cache: allocate the buffers in the "
                                     "dtype asked (dtype=None means torch.get_default_dtype()).")
            if tuple(k_all.shape) != (B, H, S, d):
                hint = ("after the window is full, update returns all `window` slots" if end > window else
                        "before the window is full, update returns the slots 0 .. len + T - 1")
                raise AssertionError(f"{where} returned keys of shape {tuple(k_all.shape)}, expected {(B, H, S, d)}: "
                                     f"{hint}.")
            for p in range(max(0, end - window), end):
                if not torch.equal(k_all[:, :, p % window], ks[layer, :, :, p]) or \
                        not torch.equal(v_all[:, :, p % window], vs[layer, :, :, p]):
                    chrono = end > window and torch.equal(k_all, ks[layer, :, :, end - window:end])
                    if chrono:
                        raise AssertionError(f"{where} returned the window in position order: that needs a copy "
                                             "every step; return the buffer's slots as they are (token p lives in "
                                             "slot p % window), views of the buffer.")
                    raise AssertionError(f"{where}: token {p} is not in slot {p} % {window} = {p % window}: a ring "
                                         "buffer writes token p at slot p % window, overwriting the token window "
                                         "positions before it.")
            mine = _storages(cache)
            for name, t in (("keys", k_all), ("values", v_all)):
                s = t.untyped_storage().data_ptr()
                if s not in mine:
                    raise AssertionError(f"{where} returned {name} that are not a view of the cache's buffers "
                                         "(a copy or a concatenation): slice the pre-allocated buffer.")
            if _len(cache, "inside a step") != pos:
                raise AssertionError(f"len(cache) changed inside update(layer={layer}): move the position only in "
                                     "advance(n).")
        _call_learner(cache.advance, T)
        if _len(cache, "after advance") != end:
            raise AssertionError(f"after {end} tokens, len(cache) is {len(cache)}: len counts every token seen "
                                 "(the next position of the model), not only the ones still in the window.")
        pos = end
    if _storages(cache) != held:
        raise AssertionError("the ring buffer's tensors were reallocated during decoding: allocate them once in "
                             "__init__ and write into them.")
    k1 = ks[0, :, :, :2]
    exc_cache = _build_ring(cls, n_layers, B, H, window, d, dtype=torch.float64)
    for layer in range(n_layers):
        _call_learner(exc_cache.update, layer, ks[layer, :, :, :window - 1], vs[layer, :, :, :window - 1])
    _call_learner(exc_cache.advance, window - 1)
    check_raises(ValueError, exc_cache.update, 0, k1, k1,
                 why=f"{window - 1} tokens seen + a chunk of 2 exceed the window of {window}: a chunk of T > 1 "
                     "tokens must fit in the window (one token at a time after that)")
    _call_learner(exc_cache.reset)
    if len(exc_cache) != 0:
        raise AssertionError("reset() must set the position back to 0.")


def check_ring_memory(cls: Callable[..., Any], *, n_layers: int = 3, B: int = 2, H: int = 2, window: int = 4,
                      d: int = 5) -> None:
    """The bytes of a ring cache follow the formula with `window` tokens, whatever the tokens seen."""
    for dtype in (torch.float64, torch.float16):
        cache = _build_ring(cls, n_layers, B, H, window, d, dtype=dtype)
        want = expected_bytes(n_layers, B, H, window, d, dtype)
        got = cache_bytes(cache)
        if got != want:
            raise AssertionError(f"a new SlidingWindowCache holds {got} bytes; the formula 2 * n_layers * batch * "
                                 f"n_kv_head * window * head_dim * element size gives {want} in {dtype}: "
                                 "pre-allocate (n_layers, batch_size, n_kv_head, window, head_dim) for k and v, "
                                 "in the dtype asked.")
        k = torch.zeros(B, H, 1, d, dtype=dtype)
        for _ in range(3 * window):
            for layer in range(n_layers):
                _call_learner(cache.update, layer, k, k)
            _call_learner(cache.advance, 1)
        if cache_bytes(cache) != want:
            raise AssertionError(f"after {3 * window} tokens the cache holds {cache_bytes(cache)} bytes instead of "
                                 f"{want}: a sliding window never grows beyond `window` tokens.")
    cache = _build_ring(cls, n_layers, B, H, window, d, dtype=torch.float32, device="meta")
    devices = {t.device.type for t in _tensors(cache)}
    if devices != {"meta"}:
        raise AssertionError(f"SlidingWindowCache(..., device='meta') holds tensors on {sorted(devices)}: create "
                             "the buffers with device=device.")


def check_ring_logits(make_cache: Callable[[int], Any], model: torch.nn.Module, idx: Tensor, window: int,
                      prompt: int) -> None:
    """Prompt, then one token at a time: logits equal the full forward with a sliding-window mask."""
    L = idx.size(1)
    with torch.no_grad():
        full = model(idx, attn_mask=window_mask(L, window, idx.device))
        cache = make_cache(idx.size(0))
        a = 0
        for c in [prompt] + [1] * (L - prompt):
            b = a + c
            got = _call_learner(model, idx[:, a:b], cache)
            diff = (got - full[:, a:b]).abs().max().item() if got.shape == full[:, a:b].shape else float("inf")
            if not diff <= ATOL:
                raise AssertionError(f"with a window of {window}, the logits of position(s) {a}..{b - 1} differ from "
                                     f"the full forward with a sliding-window mask (max diff {diff:.2e}): each query "
                                     f"must see exactly the last {window} keys, itself included, and len(cache) must "
                                     "count every token seen (the positions continue).")
            a = b


# --- batched generation with left padding --------------------------------------------------------
class _ListCache:
    """A minimal concatenating cache for the checks' own reference runs."""

    def __init__(self, n_layers: int) -> None:
        self.k: list[Any] = [None] * n_layers
        self.v: list[Any] = [None] * n_layers
        self.pos = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, n: int) -> None:
        self.pos += n

    def __len__(self) -> int:
        return self.pos


@torch.no_grad()
def _batch_variant(model: torch.nn.Module, prompts: Sequence[Tensor], n: int, pad_id: int, *, mask: str,
                   positions: str) -> list[Tensor]:
    """Left-padded greedy batch decoding; mask in {"always", "never", "prefill"}, positions in
    {"always", "never", "prefill"}: the correct run and the usual mistakes."""
    lens = [len(p) for p in prompts]
    B, P = len(prompts), max(lens)
    pad = torch.tensor([P - m for m in lens])
    idx = torch.full((B, P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = p
    keys = torch.arange(P)[None, :] >= pad[:, None]
    pos = (torch.arange(P)[None, :] - pad[:, None]).clamp(min=0)
    cache = _ListCache(len(model.blocks))
    logits = model(idx, cache, attn_mask=keys[:, None, None, :] if mask != "never" else None,
                   positions=pos if positions != "never" else None)[:, -1]
    out = []
    for step in range(n):
        out.append(logits.argmax(-1, keepdim=True))
        if step == n - 1:
            break
        keys = torch.cat([keys, torch.ones(B, 1, dtype=torch.bool)], 1)
        pos = pos[:, -1:] + 1
        logits = model(out[-1], cache, attn_mask=keys[:, None, None, :] if mask == "always" else None,
                       positions=pos if positions == "always" else None)[:, -1]
    new = torch.cat(out, 1)
    return [torch.cat([p, new[b]]) for b, p in enumerate(prompts)]


_BATCH_MISTAKES = [  # the more specific mistakes first
    (dict(mask="prefill", positions="always"), "the padded keys are masked in the prefill call only: while decoding "
     "the mask must still cover all S keys, padding included (False there), on every call"),
    (dict(mask="always", positions="prefill"), "the positions are right in the prefill only: while decoding each row "
     "continues from its own length, so pass positions also while decoding (the model's default continues from "
     "len(cache), which counts the padding)"),
    (dict(mask="never", positions="always"), "the padded keys are attended: mask them with attn_mask (True = may "
     "attend, e.g. (B, 1, 1, S) with False at the padding), on every call"),
    (dict(mask="always", positions="never"), "the positions are those of the padded row: each row's positions must "
     "start at 0 at its first real token (pass positions (B, L) to the model)"),
]


def check_generate_batch(fn: Callable[..., Any], reference: Callable[..., Any], model: torch.nn.Module,
                         prompts: Sequence[Tensor], max_new_tokens: int, pad_id: int = 0) -> None:
    """fn(model, prompts, n, pad_id) gives, row for row, generate(model, prompt, n, temperature=0)."""
    want = [reference(model, p[None].clone(), max_new_tokens, temperature=0.0)[0] for p in prompts]
    lens = [len(p) for p in prompts]
    call = f"generate_batch(model, prompts of lengths {lens}, {max_new_tokens}, pad_id={pad_id})"
    got = _call_learner(fn, model, [p.clone() for p in prompts], max_new_tokens, pad_id=pad_id)
    if not isinstance(got, (list, tuple)) or len(got) != len(prompts):
        raise AssertionError(f"{call} must return a list of {len(prompts)} tensors, one per prompt.")
    for b, (g, w) in enumerate(zip(got, want)):
        if not isinstance(g, Tensor) or g.dim() != 1:
            raise AssertionError(f"{call}: row {b} must be a 1-D tensor (its prompt followed by the new tokens).")
        if len(g) != len(w):
            raise AssertionError(f"{call}: row {b} has {len(g)} tokens, expected {len(w)} = its own prompt length "
                                 f"{lens[b]} + {max_new_tokens}: return each row without its padding.")
    if all(torch.equal(g, w) for g, w in zip(got, want)):
        return
    b = next(i for i, (g, w) in enumerate(zip(got, want)) if not torch.equal(g, w))
    where = int((got[b] != want[b]).nonzero()[0])
    pad = max(lens) - lens[b]
    if pad == 0:
        raise AssertionError(f"{call}: row {b}, the longest prompt, already differs from generate at token {where}: "
                             "greedy decoding with a cache, argmax of the last position's logits.")
    matches = [why for kwargs, why in _BATCH_MISTAKES
               if all(torch.equal(g, v) for g, v in zip(got, _batch_variant(model, prompts, max_new_tokens, pad_id,
                                                                             **kwargs)))]
    if matches:
        also = "".join(f" (or: {why})" for why in matches[1:])
        raise AssertionError(f"{call}: row {b} (left-padded by {pad}) differs from generating it alone at token "
                             f"{where}: {matches[0]}{also}.")
    raise AssertionError(f"{call}: row {b} (left-padded by {pad}) differs from generating it alone at token {where}: "
                         "pad on the left, mask the padded keys with attn_mask on every call, and give each row "
                         "positions that start at 0 at its first real token, also while decoding.")
