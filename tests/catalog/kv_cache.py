"""Plausible mistakes in the KV-cache exercise, each one a small edit of the solution; correct
answers in other styles (controls); and the chapter's own code as the answer."""

from support import bug, chapter_code, control, solution_cells

KV, GEN, RING, BATCH = "kv_cache", "generate_cached", "sliding_window_cache", "generate_batch"
_SOL = solution_cells("kv_cache")
WRITE_K = "self.k[layer, :, :, self.pos:end] = k"
WRITE_V = "self.v[layer, :, :, self.pos:end] = v"
RETURN_KV = "return self.k[layer, :, :, :end], self.v[layer, :, :, :end]"
CHECK_ROOM = ('        if self.pos + T > self.max_len:\n'
              '            raise ValueError(f"the cache holds max_len={self.max_len} tokens: {self.pos} cached + {T} '
              'new do not fit")\n')
RESET = "    def reset(self):\n        self.pos = 0"
DECODE_CALL = "logits = model(out[-1], cache)[:, -1, :]"
SAMPLE = "out.append(sample_next(logits, temperature, top_k, generator))"
RING_SLOTS = "slots = torch.arange(self.pos, self.pos + T, device=self.k.device) % self.window"
RING_RETURN = "        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]\n"
RING_CHECK = ('        if T > 1 and self.pos + T > self.window:\n'
              '            raise ValueError(f"a chunk of {T} tokens after {self.pos} must fit in the window of '
              '{self.window}")\n')
B_PREFILL = "logits = model(idx, cache, attn_mask=keys[:, None, None, :], positions=positions)[:, -1]"
B_DECODE = "logits = model(new[-1], cache, attn_mask=keys[:, None, None, :], positions=positions)[:, -1]"

_CONCAT_KV = '''class KVCache:
    """A cache that concatenates: right values, but nothing pre-allocated."""

    def __init__(self, n_layers, batch_size, n_kv_head, max_len, head_dim, *, dtype=None, device=None):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.max_len, self.pos = max_len, 0

    def update(self, layer, k, v):
        if self.pos + k.size(-2) > self.max_len:
            raise ValueError(f"max_len={self.max_len} exceeded")
        if self.pos > 0:
            k = torch.cat([self.k[layer][:, :, :self.pos], k], dim=DIM)
            v = torch.cat([self.v[layer][:, :, :self.pos], v], dim=DIM)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, n):
        self.pos += n

    def __len__(self):
        return self.pos

    def reset(self):
        self.pos = 0

    def crop(self, n):
        if not 0 <= n <= self.pos:
            raise ValueError(n)
        self.pos = n
'''

BUGS = [
    # --- KVCache: the position ---------------------------------------------------------------------
    bug("advance_does_nothing", KV, ("self.pos += n", "pass"),
        "advance never moves the position: every step writes over slot 0 and the model numbers every token 0",
        ["test_cache_update", "test_cache_matches_full", "test_crop"], diagnosis="did not move the position"),
    bug("offset_advanced_twice", KV, ("self.pos += n", "self.pos += 2 * n"),
        "the position moves by 2n per call (tiny-llm PR #46 added the prompt length twice)",
        ["test_cache_update", "test_cache_matches_full"], diagnosis="advanced twice"),
    bug("advanced_per_layer_in_update", KV, (RETURN_KV, "self.pos += T\n        " + RETURN_KV),
        "moves the position inside update, once per layer, besides advance",
        ["test_cache_update", "test_cache_matches_full"], diagnosis="once per layer"),
    bug("reset_keeps_position", KV, (RESET, "    def reset(self):\n        pass"),
        "reset() does nothing: the next sequence continues at the old position",
        ["test_cache_update", "test_cache_matches_full"], diagnosis="reset() must set the position back to 0"),
    bug("reset_zeroes_buffers_only", KV,
        (RESET, "    def reset(self):\n        self.k.zero_()\n        self.v.zero_()"),
        "reset() clears the buffers but not the position", ["test_cache_update"],
        diagnosis="reset() must set the position back to 0"),
    # --- KVCache: what update writes and returns -----------------------------------------------------
    bug("returns_only_new_keys", KV,
        (RETURN_KV, "return self.k[layer, :, :, self.pos:end], self.v[layer, :, :, self.pos:end]"),
        "update returns the new keys and values only: the model attends the new tokens alone",
        ["test_cache_update", "test_cache_matches_full"], diagnosis="only the"),
    bug("writes_at_slot_zero", KV, [(WRITE_K, "self.k[layer, :, :, :T] = k"), (WRITE_V, "self.v[layer, :, :, :T] = v")],
        "writes every chunk at slot 0 instead of at the current position",
        ["test_cache_update", "test_cache_matches_full"], diagnosis="wrong slot"),
    bug("writes_one_slot_late", KV,
        [(WRITE_K, "self.k[layer, :, :, self.pos + 1:end + 1] = k"),
         (WRITE_V, "self.v[layer, :, :, self.pos + 1:end + 1] = v")],
        "writes at len(cache) + 1: slot 0 stays empty and the last token is lost",
        ["test_cache_update", "test_cache_matches_full"], diagnosis="wrong slot"),
    bug("returns_one_token_less", KV,
        (RETURN_KV, "return self.k[layer, :, :, :end - 1], self.v[layer, :, :, :end - 1]"),
        "returns the slots up to len(cache) + T - 2: the new token does not see itself",
        ["test_cache_update", "test_cache_matches_full"], diagnosis="after 3 tokens were written"),
    bug("keys_values_swapped", KV,
        (RETURN_KV, "return self.v[layer, :, :, :end], self.k[layer, :, :, :end]"),
        "returns (values, keys)", ["test_cache_update", "test_cache_matches_full"], diagnosis="values as keys"),
    bug("one_layer_for_all", KV,
        [(WRITE_K, "self.k[0, :, :, self.pos:end] = k"), (WRITE_V, "self.v[0, :, :, self.pos:end] = v"),
         (RETURN_KV, "return self.k[0, :, :, :end], self.v[0, :, :, :end]")],
        "ignores `layer`: every layer writes into and reads from layer 0's slice",
        ["test_cache_update", "test_cache_matches_full"], diagnosis="another layer"),
    bug("concat_wrong_dim", KV, (_SOL[KV], _CONCAT_KV.replace("DIM", "1")),
        "concatenates the cache along the heads (dim 1) instead of the tokens (dim 2)",
        ["test_cache_update", "test_cache_limits", "test_cache_matches_full"], diagnosis="token dimension"),
    bug("concat_not_preallocated", KV, (_SOL[KV], _CONCAT_KV.replace("DIM", "2")),
        "a correct concatenating cache: nothing is pre-allocated and every step copies the whole cache",
        ["test_cache_limits"], diagnosis="pre-allocate"),
    # --- KVCache: dtype, device, limits --------------------------------------------------------------
    bug("float32_regardless_of_dtype", KV,
        ("dtype = torch.get_default_dtype() if dtype is None else dtype", "dtype = torch.float32"),
        "allocates the buffers in float32 whatever dtype asks: float64 keys are rounded",
        ["test_cache_update", "test_cache_limits", "test_cache_matches_full"], diagnosis="regardless of dtype"),
    bug("ignores_device", KV,
        [("self.k = torch.zeros(shape, dtype=dtype, device=device)", "self.k = torch.zeros(shape, dtype=dtype)"),
         ("self.v = torch.zeros(shape, dtype=dtype, device=device)", "self.v = torch.zeros(shape, dtype=dtype)")],
        "allocates the buffers on the CPU whatever the device", ["test_cache_limits"], diagnosis="device=device"),
    bug("buffers_one_token_short", KV,
        ("shape = (n_layers, batch_size, n_kv_head, max_len, head_dim)",
         "shape = (n_layers, batch_size, n_kv_head, max_len - 1, head_dim)"),
        "allocates max_len - 1 slots: the memory is off and the last token does not fit",
        ["test_cache_update", "test_cache_limits"], diagnosis="no fewer"),
    bug("no_max_len_check", KV, (CHECK_ROOM, ""),
        "never checks max_len: the slice write fails with a shape error instead of a clear ValueError",
        ["test_cache_limits"], diagnosis="should raise ValueError"),
    bug("max_len_off_by_one", KV, ("if self.pos + T > self.max_len:", "if self.pos + T >= self.max_len:"),
        "refuses the token that fills the cache", ["test_cache_limits"], diagnosis="must fit"),
    bug("vague_error_message", KV,
        ('raise ValueError(f"the cache holds max_len={self.max_len} tokens: {self.pos} cached + {T} new do not fit")',
         'raise ValueError("the cache is full")'),
        "raises a ValueError that does not say which limit", ["test_cache_limits"], diagnosis="names the limit"),
    # --- crop ----------------------------------------------------------------------------------------
    bug("crop_removes_n_tokens", KV, ("        self.pos = n\n", "        self.pos -= n\n"),
        "crop(n) removes n tokens instead of keeping the first n", ["test_crop"],
        diagnosis="removed n tokens instead of keeping"),
    bug("crop_does_nothing", KV, ("        self.pos = n\n", "        pass\n"),
        "crop(n) validates n but never moves the position", ["test_crop"], diagnosis="did not move the position"),
    bug("crop_without_checks", KV,
        ('        if not 0 <= n <= self.pos:\n'
         '            raise ValueError(f"crop(n) keeps the first n tokens: 0 <= n <= {self.pos}, not {n}")\n', ""),
        "crop(n) accepts any n, even more tokens than are cached", ["test_crop"], diagnosis="keep more tokens"),
    bug("crop_accepts_negative", KV, ("if not 0 <= n <= self.pos:", "if n > self.pos:"),
        "crop(-1) sets the position to -1", ["test_crop"], diagnosis="crop(-1)"),
    # --- generate_cached -----------------------------------------------------------------------------
    bug("argmax_always", GEN, (SAMPLE, "out.append(logits.argmax(dim=-1, keepdim=True))"),
        "always greedy: sampling with a temperature gives generate's greedy tokens, not its samples",
        ["test_generate_cached"], diagnosis="multinomial"),
    bug("generator_not_passed", GEN, (SAMPLE, "out.append(sample_next(logits, temperature, top_k))"),
        "samples from the global generator: another sequence than generate's with the caller's generator",
        ["test_generate_cached"], diagnosis="pass the generator"),
    bug("temperature_applied_twice", GEN, (SAMPLE, "out.append(sample_next(logits / temperature, temperature, top_k, "
                                                   "generator))"),
        "divides by the temperature before sample_next, which divides again",
        ["test_generate_cached"], diagnosis="with temperature=0"),
    bug("top_k_ignored", GEN, (SAMPLE, "out.append(sample_next(logits, temperature, None, generator))"),
        "drops top_k: the hidden test with top_k samples other tokens", ["test_generate_cached"], diagnosis="top_k"),
    bug("recomputes_without_cache", GEN, (DECODE_CALL, "logits = model(torch.cat(out, dim=1))[:, -1, :]"),
        "feeds the whole sequence without the cache at every step: right tokens, no saving",
        ["test_generate_cached_projections"], diagnosis="re-feeds the whole sequence"),
    bug("prefill_token_by_token", GEN,
        ("logits = model(idx, cache)[:, -1, :]", "for t in range(L):\n        logits = model(idx[:, t:t + 1], cache)[:, -1, :]"),
        "fills the cache one prompt token at a time: right tokens, L calls instead of one",
        ["test_generate_cached_projections"], diagnosis="token by token"),
    bug("feeds_the_last_token", GEN,
        ("        if step < max_new_tokens - 1:\n            " + DECODE_CALL, "        " + DECODE_CALL),
        "feeds the last new token too: the cache, sized for the tokens that are fed back, overflows",
        ["test_generate_cached", "test_generate_cached_projections"], diagnosis="do not fit"),
    bug("wrong_cache_shape_n_head", GEN, ("attn.n_kv_head, L + max_new_tokens - 1", "attn.n_head, L + max_new_tokens - 1"),
        "sizes the cache with the query heads: the grouped keys do not fit its buffers",
        ["test_generate_cached"], diagnosis="n_kv_head"),
    # --- the ring buffer -----------------------------------------------------------------------------
    bug("ring_position_order_copy", RING,
        (RING_RETURN, "        if self.pos + T <= self.window:\n    " + RING_RETURN
         + "        order = torch.arange(self.pos + T - self.window, self.pos + T, device=self.k.device) % self.window\n"
         "        return self.k[layer, :, :, order], self.v[layer, :, :, order]\n"),
        "returns the window in position order: right logits, but a copy of the window at every step",
        ["test_ring_update"], diagnosis="position order"),
    bug("ring_len_capped", RING, ("        return self.pos\n", "        return min(self.pos, self.window)\n"),
        "len() counts only the tokens in the window: the model's positions stop at window",
        ["test_ring_update", "test_ring_logits"], diagnosis="every token seen"),
    bug("ring_slot_off_by_one", RING, (RING_SLOTS, RING_SLOTS.replace("arange(self.pos, self.pos + T", "arange(self.pos + 1, self.pos + T + 1")),
        "writes token p at slot (p + 1) % window", ["test_ring_update", "test_ring_logits"], diagnosis="p % window"),
    bug("ring_accepts_long_chunks", RING, (RING_CHECK, ""),
        "accepts a chunk that wraps around the window, overwriting keys its own queries need",
        ["test_ring_update"], diagnosis="exceed the window"),
    bug("ring_whole_buffer_early", RING, (RING_RETURN, "        return self.k[layer], self.v[layer]\n"),
        "returns all `window` slots before they are written: the queries attend zero keys",
        ["test_ring_update", "test_ring_logits"], diagnosis="before the window is full"),
    bug("ring_float32", RING, ("        dtype = torch.get_default_dtype() if dtype is None else dtype\n"
                               "        shape = (n_layers, batch_size, n_kv_head, window, head_dim)",
                               "        dtype = torch.float32\n"
                               "        shape = (n_layers, batch_size, n_kv_head, window, head_dim)"),
        "allocates the ring in float32 whatever dtype asks", ["test_ring_update", "test_ring_memory"],
        diagnosis="dtype asked"),
    bug("ring_ignores_device", RING,
        [("self.k = torch.zeros(shape, dtype=dtype, device=device)", "self.k = torch.zeros(shape, dtype=dtype)"),
         ("self.v = torch.zeros(shape, dtype=dtype, device=device)", "self.v = torch.zeros(shape, dtype=dtype)")],
        "allocates the ring on the CPU whatever the device", ["test_ring_memory"], diagnosis="device=device"),
    # --- generate_batch ------------------------------------------------------------------------------
    bug("batch_no_key_mask", BATCH,
        [(B_PREFILL, "logits = model(idx, cache, positions=positions)[:, -1]"),
         (B_DECODE, "logits = model(new[-1], cache, positions=positions)[:, -1]")],
        "no attn_mask: the padding tokens are attended", ["test_generate_batch"], diagnosis="padded keys are attended"),
    bug("batch_mask_prefill_only", BATCH, (B_DECODE, "logits = model(new[-1], cache, positions=positions)[:, -1]"),
        "masks the padding in the prefill call only", ["test_generate_batch"], diagnosis="prefill call only"),
    bug("batch_no_positions", BATCH,
        [(B_PREFILL, "logits = model(idx, cache, attn_mask=keys[:, None, None, :])[:, -1]"),
         (B_DECODE, "logits = model(new[-1], cache, attn_mask=keys[:, None, None, :])[:, -1]")],
        "positions of the padded row: invisible with RoPE, wrong with learned positions",
        ["test_generate_batch"], diagnosis="start at 0 at its first real token"),
    bug("batch_positions_prefill_only", BATCH,
        (B_DECODE, "logits = model(new[-1], cache, attn_mask=keys[:, None, None, :])[:, -1]"),
        "explicit positions in the prefill only: decoding continues from len(cache), padding included",
        ["test_generate_batch"], diagnosis="also while decoding"),
    bug("batch_right_padding", BATCH,
        [("idx[b, P - len(p):] = p", "idx[b, :len(p)] = p"),
         ("keys = torch.arange(P, device=device)[None, :] >= pad[:, None]",
          "keys = torch.arange(P, device=device)[None, :] < (P - pad)[:, None]"),
         ("positions = (torch.arange(P, device=device)[None, :] - pad[:, None]).clamp(min=0)",
          "positions = torch.arange(P, device=device)[None, :].expand(B, P)")],
        "pads on the right: the last column is padding for the shorter rows, whose next token is predicted "
        "from a padding position", ["test_generate_batch"], diagnosis="differs from generating it alone"),
    bug("batch_returns_padded_rows", BATCH, ("return [torch.cat([p, new[b]]) for b, p in enumerate(prompts)]",
                                             "return list(torch.cat([idx, new], dim=1))"),
        "returns the padded rows", ["test_generate_batch"], diagnosis="without its padding"),
]

# --- correct answers in other styles: each must keep full marks -----------------------------------
_LIST_KV = '''class KVCache:
    """One pre-allocated (B, H, max_len, d) pair of buffers per layer, in lists."""

    def __init__(self, n_layers, batch_size, n_kv_head, max_len, head_dim, *, dtype=None, device=None):
        kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
        self.keys = [torch.empty(batch_size, n_kv_head, max_len, head_dim, **kw) for _ in range(n_layers)]
        self.values = [torch.empty(batch_size, n_kv_head, max_len, head_dim, **kw) for _ in range(n_layers)]
        self.size, self.n = max_len, 0

    def update(self, layer, k, v):
        new = self.n + k.shape[2]
        if new > self.size:
            raise ValueError(f"{new} tokens > max_len {self.size}")
        self.keys[layer][:, :, self.n:new].copy_(k)
        self.values[layer][:, :, self.n:new].copy_(v)
        return self.keys[layer].narrow(2, 0, new), self.values[layer].narrow(2, 0, new)

    def advance(self, n):
        if self.n + n > self.size:
            raise ValueError(f"max_len={self.size}")
        self.n += n

    def __len__(self):
        return self.n

    def reset(self):
        self.crop(0)

    def crop(self, n):
        if n < 0 or n > self.n:
            raise ValueError(f"cannot keep {n} of {self.n} tokens")
        self.n = n
'''
_INLINE_SAMPLING = '''@torch.no_grad()
def generate_cached(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    a = model.blocks[0].self_attn
    cache = KVCache(len(model.blocks), idx.shape[0], a.n_kv_head, model.max_len, a.head_dim,
                    dtype=model.tok_emb.weight.dtype, device=idx.device)
    x, seq = idx, idx
    for _ in range(max_new_tokens):
        logits = model(x, cache)[:, -1, :]
        if temperature == 0:
            x = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            x = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        seq = torch.cat([seq, x], dim=1)
        if seq.shape[1] == idx.shape[1] + max_new_tokens:
            break
    return seq
'''
_LOOP_RING = '''class SlidingWindowCache:
    def __init__(self, n_layers, batch_size, n_kv_head, window, head_dim, *, dtype=None, device=None):
        self.buf = torch.zeros(2, n_layers, batch_size, n_kv_head, window, head_dim,
                               dtype=dtype or torch.get_default_dtype(), device=device)
        self.w, self.seen = window, 0

    def update(self, layer, k, v):
        T = k.shape[-2]
        if T > 1 and self.seen + T > self.w:
            raise ValueError("only a chunk that fits in the window, then one token at a time")
        for t in range(T):
            slot = (self.seen + t) % self.w
            self.buf[0, layer, :, :, slot] = k[:, :, t]
            self.buf[1, layer, :, :, slot] = v[:, :, t]
        filled = min(self.seen + T, self.w)
        return self.buf[0, layer, :, :, :filled], self.buf[1, layer, :, :, :filled]

    def advance(self, n):
        self.seen += n

    def __len__(self):
        return self.seen

    def reset(self):
        self.seen = 0
'''
_PER_STEP_BATCH = '''@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, pad_id=0):
    B, P = len(prompts), max(p.numel() for p in prompts)
    pads = [P - p.numel() for p in prompts]
    rows = [torch.cat([p.new_full((n,), pad_id), p]) for p, n in zip(prompts, pads)]
    a = model.blocks[0].self_attn
    cache = KVCache(len(model.blocks), B, a.n_kv_head, P + max_new_tokens, a.head_dim,
                    dtype=model.tok_emb.weight.dtype)
    pad = torch.tensor(pads)
    x, out = torch.stack(rows), [[] for _ in prompts]
    for step in range(max_new_tokens):
        S = len(cache) + x.shape[1]
        cols = torch.arange(len(cache), S)
        real = torch.arange(S)[None, :] >= pad[:, None]                  # (B, S)
        pos = (cols[None, :] - pad[:, None]).clamp(min=0)
        x = model(x, cache, attn_mask=real.view(B, 1, 1, S), positions=pos)[:, -1].argmax(-1).view(B, 1)
        for b in range(B):
            out[b].append(int(x[b]))
        if step + 2 > max_new_tokens:
            break
    return [torch.cat([p, torch.tensor(o, dtype=torch.long)]) for p, o in zip(prompts, out)]
'''

CONTROLS = [
    control("list_of_layer_buffers", KV, (_SOL[KV], _LIST_KV),
            "one pre-allocated pair of buffers per layer in lists, copy_ and narrow, reset through crop(0)"),
    control("inline_sampling_max_len_cache", GEN, (_SOL[GEN], _INLINE_SAMPLING),
            "samples inline as sample_next does, with a cache of model.max_len and a loop that stops early"),
    control("ring_token_loop", RING, (_SOL[RING], _LOOP_RING),
            "one stacked (2, ...) buffer written token by token with a Python loop"),
    control("batch_masks_rebuilt_each_step", BATCH, (_SOL[BATCH], _PER_STEP_BATCH),
            "rebuilds the key mask and the positions from the padding counts at every call"),
    control("kv_index_copy", KV,
            [("        self.k[layer, :, :, self.pos:end] = k\n        self.v[layer, :, :, self.pos:end] = v\n",
              "        idx = torch.arange(self.pos, end, device=self.k.device)\n"
              "        self.k[layer].index_copy_(2, idx, k)\n        self.v[layer].index_copy_(2, idx, v)\n")],
            "writes with index_copy_ along the token dimension"),
]

# --- the chapter's own code as the answer (the library's KVCache and generate_cached) --------------
CHAPTER_AS_ANSWER = {
    KV: chapter_code("kv_cache", "KVCache"),
    GEN: chapter_code("kv_cache", "generate_cached"),
}
