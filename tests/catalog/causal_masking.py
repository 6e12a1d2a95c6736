"""Plausible mistakes in the causal-masking exercise, each one a small edit of the solution;
correct answers in other styles (controls); and the chapter's own code as the answer."""

from support import bug, control, solution_cells, chapter_code

MASK, WIN, DOC, MOD = "causal_mask", "sliding_window_mask", "document_causal_mask", "causal_self_attention"
CACHE_CAT = ("            k = torch.cat([past_k, k], dim=2)      # the cached keys first: positions 0 .. S_past - 1\n"
             "            v = torch.cat([past_v, v], dim=2)\n")
CAUSAL = "mask = causal_mask(L, S, device=x.device)"

BUGS = [
    # --- causal_mask -------------------------------------------------------------------------
    bug("top_left_alignment", MASK, ("ones.tril(diagonal=n_keys - n_queries)", "ones.tril()"),
        "aligns the diagonal top-left (like is_causal=True): wrong when n_queries != n_keys, e.g. a "
        "single decoding query sees only key 0", ["test_causal_mask", "test_module_cache_shapes",
                                                  "test_module_cache_decode"], diagnosis="top-left"),
    bug("off_by_one_no_diagonal", MASK,
        ("ones.tril(diagonal=n_keys - n_queries)", "ones.tril(diagonal=n_keys - n_queries - 1)"),
        "excludes the diagonal: a query may not attend its own token, the first row is empty",
        ["test_causal_mask", "test_module_shapes", "test_module_reference"], diagnosis="diagonal"),
    bug("inverted_mask_triu", MASK,
        ("ones.tril(diagonal=n_keys - n_queries)", "ones.triu(diagonal=n_keys - n_queries + 1)"),
        "returns the blocked positions (nn.MultiheadAttention's convention): every query sees only "
        "its future", ["test_causal_mask", "test_module_causal", "test_module_reference"],
        diagnosis="inverted"),
    bug("offset_sign_flipped", MASK,
        ("ones.tril(diagonal=n_keys - n_queries)", "ones.tril(diagonal=n_queries - n_keys)"),
        "computes the offset as n_queries - n_keys: right for square masks only",
        ["test_causal_mask", "test_module_cache_decode"], diagnosis="wrong sign"),
    bug("n_keys_default_missing", MASK, ("    if n_keys is None:\n        n_keys = n_queries\n", ""),
        "forgets the default n_keys = n_queries: causal_mask(L) raises a TypeError",
        ["test_causal_mask", "test_causal_mask_device"], diagnosis="defaults to n_queries"),
    bug("mask_ignores_device", MASK, (", device=device)", ")"),
        "accepts a device but creates the mask on the CPU",
        ["test_causal_mask_device", "test_module_hygiene", "test_module_cache_hygiene"],
        diagnosis="device=device"),
    bug("float_mask", MASK, ("dtype=torch.bool, ", ""),
        "returns a float mask of ones and zeros instead of a boolean one",
        ["test_causal_mask", "test_causal_mask_device"], diagnosis="torch.bool"),
    # --- sliding_window_mask -------------------------------------------------------------------
    bug("window_plus_one_mistral_src", WIN, ("~ones.tril(diagonal=offset - window)", "~ones.tril(diagonal=offset - window - 1)"),
        "lets a query see window + 1 keys, as mistral-src's triu(diagonal=-sliding_window) does",
        ["test_sliding_window_mask"], diagnosis="window + 1 keys"),
    bug("window_minus_one", WIN, ("~ones.tril(diagonal=offset - window)", "~ones.tril(diagonal=offset - window + 1)"),
        "does not count the query itself in the window: window - 1 earlier keys... and one too few",
        ["test_sliding_window_mask"], diagnosis="window - 1 keys"),
    bug("window_top_left", WIN, ("offset = n_keys - n_queries", "offset = 0"),
        "aligns the window top-left: new queries over cached keys see the first keys",
        ["test_sliding_window_mask"], diagnosis="top-left"),
    bug("window_both_sides", WIN, ("ones.tril(diagonal=offset) &", "ones.tril(diagonal=offset + window - 1) &"),
        "a band on both sides of the query (local attention of encoders): keys after the query leak",
        ["test_sliding_window_mask"], diagnosis="causal too"),
    bug("window_no_value_error", WIN, ('raise ValueError(f"window must be at least 1, not {window}")', "pass"),
        "accepts window=0 and returns an all-False mask", ["test_sliding_window_mask"], diagnosis="ValueError"),
    bug("window_ignores_device", WIN, ("dtype=torch.bool, device=device)", "dtype=torch.bool)"),
        "creates the window on the CPU whatever the device", ["test_sliding_window_mask_device"],
        diagnosis="device=device"),
    # --- document_causal_mask --------------------------------------------------------------------
    bug("doc_not_causal", DOC,
        ("mask = same & torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()", "mask = same"),
        "only separates the documents: later tokens of the same document are visible",
        ["test_document_causal_mask"], diagnosis="causal too"),
    bug("doc_no_head_axis", DOC, ("        mask = mask[:, None]                                            # (B, 1, L, L)\n", "        pass\n"),
        "returns (B, L, L) for a batch: against (B, H, L, L) scores it broadcasts rows onto heads",
        ["test_document_causal_mask", "test_packed_documents"], diagnosis="head axis"),
    bug("doc_ignores_device", DOC, (", device=doc_ids.device", ""),
        "builds the triangle on the CPU: fails for ids on another device", ["test_document_causal_mask"],
        diagnosis="device=x.device"),
    bug("doc_unbatched_broadcast", DOC,
        ("same = doc_ids[..., :, None] == doc_ids[..., None, :]", "same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(0)"),
        "written for (L,) ids: for (B, L) ids the comparison does not broadcast",
        ["test_document_causal_mask", "test_packed_documents"], diagnosis="do not broadcast"),
    # --- CausalSelfAttention without a cache -----------------------------------------------------
    bug("padding_or_instead_of_and", MOD, ("mask = mask & attn_mask", "mask = mask | attn_mask"),
        "combines the extra mask with OR: every allowed key, past and future, is visible",
        ["test_module_causal", "test_module_reference", "test_module_padding"], diagnosis="AND (not OR)"),
    bug("padding_mask_ignored", MOD, ("mask = mask & attn_mask", "pass"),
        "accepts attn_mask but never applies it: padding keys get weight",
        ["test_module_reference", "test_module_padding"], diagnosis="ignored"),
    bug("inplace_and_mutates_caller_mask", MOD,
        ("mask = mask & attn_mask", "attn_mask &= mask\n            mask = attn_mask"),
        "combines in place with attn_mask &= causal: the caller's mask is modified (and a (B, 1, 1, L) "
        "mask cannot hold the result)", ["test_module_causal", "test_module_hygiene"], diagnosis="in-place"),
    bug("inplace_fill_softmax_output", MOD,
        ("weights = weights.masked_fill(no_key, 0.0)", "weights.masked_fill_(no_key, 0.0)"),
        "zeroes the rows in place on the softmax output, which autograd saved: backward raises",
        ["test_module_causal", "test_module_reference"], diagnosis="modified in place"),
    bug("detached_scores", MOD, ("scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)",
                                 "scores = (q @ k.transpose(-2, -1)).detach() / math.sqrt(self.d_head)"),
        "detaches the scores: q and k get no gradient, silently", ["test_module_reference"],
        diagnosis="detached"),
    bug("data_renormalisation", MOD,
        [("        scores = scores.masked_fill(~mask, float(\"-inf\"))\n", ""),
         ("weights = weights.masked_fill(no_key, 0.0)",
          "weights = weights.masked_fill(~mask, 0.0)\n"
          "        weights.data = weights.data / weights.data.sum(-1, keepdim=True)")],
        "masks after the softmax and renormalises through .data: right forward, wrong q/k gradients",
        ["test_module_causal", "test_module_reference"], diagnosis="after the softmax"),
    bug("nan_rows_left_padding", MOD, ("weights = weights.masked_fill(no_key, 0.0)", "pass"),
        "leaves NaN rows for queries with no allowed key (left padding)",
        ["test_module_causal", "test_module_padding"], diagnosis="NaN"),
    bug("finite_fill_uniform_rows", MOD,
        [("float(\"-inf\"))", "torch.finfo(scores.dtype).min)"), ("weights = weights.masked_fill(no_key, 0.0)", "pass")],
        "fills with finfo.min: no NaN, but a query without keys averages every value, future ones included",
        ["test_module_causal", "test_module_padding"], diagnosis="finite fill"),
    bug("causal_mask_on_cpu", MOD, (CAUSAL, "mask = causal_mask(L, S)"),
        "creates the causal mask on the CPU: fails for inputs on another device",
        ["test_module_hygiene", "test_module_cache_hygiene"], diagnosis="device=x.device"),
    bug("softmax_in_float32", MOD, ("weights = torch.softmax(scores, dim=-1)",
                                    "weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)"),
        "computes the softmax in float32 and casts back: float64 inputs lose precision",
        ["test_module_reference", "test_module_cache_reference"], diagnosis="float32"),
    bug("scale_by_d_model", MOD, ("/ math.sqrt(self.d_head)", "/ math.sqrt(self.d_model)"),
        "scales the scores by 1/sqrt(d_model) instead of 1/sqrt(d_head)",
        ["test_module_reference", "test_module_cache_reference"], diagnosis="scale"),
    bug("heads_split_without_transpose", MOD,
        ("t.view(B, L, self.n_head, self.d_head).transpose(1, 2)", "t.view(B, self.n_head, L, self.d_head)"),
        "splits the heads with a plain view: tokens are mixed across positions and the future leaks",
        ["test_module_causal", "test_module_reference"], diagnosis="split and merged with a transpose"),
    bug("heads_merged_without_transpose", MOD,
        ("(weights @ v).transpose(1, 2).reshape(B, L, self.d_model)", "(weights @ v).reshape(B, L, self.d_model)"),
        "merges the heads without transposing back: outputs of later positions land at earlier ones",
        ["test_module_causal", "test_module_reference"], diagnosis="split and merged with a transpose"),
    bug("no_value_error", MOD, ("raise ValueError(f\"n_head={n_head} must divide d_model={d_model}\")", "pass"),
        "does not reject a number of heads that does not divide d_model", ["test_module_shapes"],
        diagnosis="ValueError"),
    bug("mask_cached_across_calls", MOD,
        (CAUSAL, "if getattr(self, \"_causal\", None) is None:\n"
                 "            self._causal = causal_mask(L, S, device=x.device)\n"
                 "        mask = self._causal"),
        "builds the causal mask at the first call and reuses it: wrong (or failing) at every other length",
        ["test_module_causal", "test_module_reference", "test_module_cache_decode"],
        diagnosis="keeps state across calls"),
    bug("delegates_to_library_attention", MOD,
        [("scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)\n"
          "        scores = scores.masked_fill(~mask, float(\"-inf\"))\n"
          "        weights = torch.softmax(scores, dim=-1)\n"
          "        no_key = ~mask.any(dim=-1, keepdim=True)  # queries that may attend nothing: NaN rows\n"
          "        weights = weights.masked_fill(no_key, 0.0)\n",
          "from handson.nn import attention as lib_attention\n"
          "        heads, weights = lib_attention(q, k, v, mask)\n"),
         ("(weights @ v)", "heads")],
        "hands the attending step to the library's attention core, which the exercise asks to write",
        ["test_module_shapes", "test_module_reference", "test_module_cache_decode"],
        diagnosis="asks you to write yourself"),
    # --- the cache -----------------------------------------------------------------------------
    bug("cache_top_left", MOD, (CAUSAL, "mask = torch.ones(L, S, dtype=torch.bool, device=x.device).tril()"),
        "tril() of the (L, S) rectangle (is_causal=True's alignment): new queries cannot see the cache",
        ["test_module_cache_shapes", "test_module_cache_decode", "test_module_cache_reference"],
        diagnosis="top-left"),
    bug("nanogpt_buffer_sliced", MOD,
        [("        self.o = nn.Linear(d_model, d_model)\n",
          "        self.o = nn.Linear(d_model, d_model)\n"
          "        self.register_buffer(\"bias\", torch.ones(64, 64, dtype=torch.bool).tril())\n"),
         (CAUSAL, "mask = self.bias[:L, :S]")],
        "nanoGPT's tril buffer sliced [:L, :S]: right for training, top-left with a cache",
        ["test_module_cache_shapes", "test_module_cache_decode"], diagnosis="top-left"),
    bug("cache_mask_square", MOD, (CAUSAL, "mask = causal_mask(L, device=x.device)"),
        "builds the causal mask for the new tokens only (L, L): it does not fit the S keys",
        ["test_module_cache_decode"], diagnosis="counting the cached keys"),
    bug("cache_concat_wrong_order", MOD,
        (CACHE_CAT, "            k = torch.cat([k, past_k], dim=2)\n            v = torch.cat([v, past_v], dim=2)\n"),
        "puts the new keys and values before the cached ones", ["test_module_cache_decode",
                                                                "test_module_cache_reference"],
        diagnosis="BEFORE the cached"),
    bug("cache_present_only_new", MOD, ("return out, weights, (k, v)", "return out, weights, (k[:, :, S - L:], v[:, :, S - L:])"),
        "returns only the new tokens' keys and values: the next step loses the past",
        ["test_module_cache_shapes", "test_module_cache_decode"], diagnosis="cached keys followed by the new"),
    bug("cache_detached", MOD,
        (CACHE_CAT, "            k = torch.cat([past_k.detach(), k], dim=2)\n"
                    "            v = torch.cat([past_v.detach(), v], dim=2)\n"),
        "detaches the cache: no gradient reaches past_k and past_v", ["test_module_cache_reference"],
        diagnosis="cut out of the graph"),
    bug("mask_ignored_with_cache", MOD, ("if attn_mask is not None:\n            mask = mask & attn_mask",
                                         "if attn_mask is not None and past_kv is None:\n            mask = mask & attn_mask"),
        "applies attn_mask only without a cache: padding keys get weight while decoding",
        ["test_module_cache_decode", "test_module_cache_reference"], diagnosis="on every path"),
    bug("sdpa_is_causal_output", MOD,
        ("out = self.o((weights @ v).transpose(1, 2).reshape(B, L, self.d_model))",
         "heads = F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_mask is None else mask,\n"
         "                                               is_causal=attn_mask is None)\n"
         "        out = self.o(heads.transpose(1, 2).reshape(B, L, self.d_model))"),
        "computes the output with SDPA's is_causal=True when there is no mask: top-left with a cache, "
        "while the weights are right", ["test_module_cache_decode", "test_module_cache_reference"],
        diagnosis="is_causal=True"),
    bug("use_cache_ignored", MOD, ("        if use_cache:\n            return out, weights, (k, v)\n", ""),
        "never returns present_kv", ["test_module_cache_shapes", "test_module_cache_decode"], diagnosis="triple"),
    bug("cache_keys_prescaled", MOD,
        [("q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))",
          "q, k, v = split(self.q(x)), split(self.k(x)) / math.sqrt(self.d_head), split(self.v(x))"),
         ("scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)", "scores = q @ k.transpose(-2, -1)")],
        "stores the keys pre-scaled by 1/sqrt(d_head): self-consistent, but cached keys from elsewhere "
        "(the k projections) are scaled wrongly", ["test_module_cache_reference"], diagnosis="scale"),
]

# --- correct answers in other styles: each must keep full marks ---------------------------------
_ARANGE_CAUSAL = '''def causal_mask(n_queries, n_keys=None, device=None):
    n_keys = n_queries if n_keys is None else n_keys
    i = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)
    return torch.arange(n_keys, device=device)[None, :] <= i
'''
_LIB_CAUSAL = '''from handson.nn import causal_mask as _library_causal_mask


def causal_mask(n_queries, n_keys=None, device=None):
    return _library_causal_mask(n_queries, n_keys, device=device)
'''
_ARANGE_WINDOW = '''def sliding_window_mask(n_queries, window, n_keys=None, device=None):
    if window < 1:
        raise ValueError("window must be positive")
    n_keys = n_queries if n_keys is None else n_keys
    pos = torch.arange(n_queries, device=device)[:, None] + n_keys - n_queries    # absolute query positions
    key = torch.arange(n_keys, device=device)[None, :]
    return (key <= pos) & (key > pos - window)
'''
_TRIU_WINDOW = '''def sliding_window_mask(n_queries, window, n_keys=None, device=None):
    if window <= 0:
        raise ValueError(window)
    n_keys = n_queries if n_keys is None else n_keys
    m = causal_mask(n_queries, n_keys, device=device)
    return m.triu(diagonal=n_keys - n_queries - window + 1)
'''
_ARANGE_DOC = '''def document_causal_mask(doc_ids):
    L = doc_ids.size(-1)
    pos = torch.arange(L, device=doc_ids.device)
    mask = (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)) & (pos[None, :] <= pos[:, None])
    return mask.unsqueeze(-3) if doc_ids.ndim == 2 else mask
'''
_LOOP_MODULE = '''class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        if d_model % n_head:
            raise ValueError("n_head must divide d_model")
        self.h, self.dh = n_head, d_model // n_head
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x, attn_mask=None, *, past_kv=None, use_cache=False):
        B, L, D = x.shape
        q, k, v = (f(x).reshape(B, L, self.h, self.dh).permute(0, 2, 1, 3) for f in (self.q, self.k, self.v))
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), 2), torch.cat((past_kv[1], v), 2)
        S = k.shape[2]
        allowed = torch.ones(B, self.h, L, S, dtype=torch.bool, device=x.device)
        if attn_mask is not None:
            allowed = allowed & attn_mask
        rows = []
        for i in range(L):                       # one query at a time, over the keys it may see
            n = i + S - L + 1
            ok = allowed[:, :, i:i + 1, :n]
            s = (q[:, :, i:i + 1] @ k[:, :, :n].transpose(-1, -2)) / self.dh ** 0.5
            w = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
            w = w.masked_fill(~ok.any(-1, keepdim=True), 0.0)
            rows.append(F.pad(w, (0, S - n)))
        weights = torch.cat(rows, dim=2)
        out = self.o((weights @ v).permute(0, 2, 1, 3).reshape(B, L, D))
        return (out, weights, (k, v)) if use_cache else (out, weights)
'''
_EINSUM_MODULE = '''from handson.nn import causal_mask as lib_causal_mask, merge_heads, split_heads


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"{n_head} heads do not divide {d_model}")
        self.n_head = n_head
        for name in "qkvo":
            setattr(self, name, nn.Linear(d_model, d_model, bias=False))

    def forward(self, x, attn_mask=None, *, past_kv=None, use_cache=False):
        q, k, v = (split_heads(f(x), self.n_head) for f in (self.q, self.k, self.v))
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=-2)
            v = torch.cat([past_kv[1], v], dim=-2)
        L, S = q.shape[-2], k.shape[-2]
        allowed = lib_causal_mask(L, S, device=x.device)
        if attn_mask is not None:
            allowed = torch.logical_and(allowed, attn_mask)
        scores = torch.einsum("bhld,bhsd->bhls", q, k) * q.shape[-1] ** -0.5
        scores = torch.where(allowed, scores, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = torch.where(allowed.any(-1, keepdim=True), weights, 0.0)
        out = self.o(merge_heads(torch.einsum("bhls,bhsd->bhld", weights, v)))
        if use_cache:
            return out, weights, (k, v)
        return out, weights
'''

_SOLUTION = solution_cells("causal_masking")


def _rewrite(name, cell, source, why):
    """A control that replaces the whole answer cell."""
    return control(name, cell, (_SOLUTION[cell], source), why)


CONTROLS = [
    _rewrite("causal_mask_arange", MASK, _ARANGE_CAUSAL, "the rule j <= i + S - L written with arange comparisons"),
    _rewrite("causal_mask_from_library", MASK, _LIB_CAUSAL, "the library's causal_mask, which the release allows"),
    _rewrite("window_arange", WIN, _ARANGE_WINDOW, "the window written with arange comparisons"),
    _rewrite("window_triu_of_causal", WIN, _TRIU_WINDOW, "the causal mask cut by triu(S - L - window + 1)"),
    _rewrite("doc_arange_unsqueeze", DOC, _ARANGE_DOC, "unsqueeze and an arange comparison for the triangle"),
    _rewrite("module_loop_over_queries", MOD, _LOOP_MODULE,
             "one query at a time over the keys it may see, padded with zeros; permute/reshape for the heads"),
    _rewrite("module_einsum_where_bias_free_library", MOD, _EINSUM_MODULE,
             "einsum, torch.where, bias-free layers, the library's split_heads/merge_heads/causal_mask"),
    control("finfo_min_additive_bias", MOD,
            ("scores = scores.masked_fill(~mask, float(\"-inf\"))",
             "bias = torch.zeros(mask.shape, dtype=scores.dtype, device=x.device)\n"
             "        bias = bias.masked_fill(~mask, torch.finfo(scores.dtype).min)\n"
             "        scores = scores + bias"),
            "an additive finfo.min bias: exactly zero weight on blocked keys, empty rows zeroed afterwards"),
    control("sdpa_for_the_output", MOD,
            ("out = self.o((weights @ v).transpose(1, 2).reshape(B, L, self.d_model))",
             "heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)\n"
             "        out = self.o(heads.transpose(1, 2).reshape(B, L, self.d_model))"),
            "the output from SDPA with the explicit combined mask, the weights computed separately"),
    control("reshape_and_contiguous_view", MOD,
            [("t.view(B, L, self.n_head, self.d_head).transpose(1, 2)",
              "t.reshape(B, L, self.n_head, self.d_head).transpose(1, 2)"),
             ("(weights @ v).transpose(1, 2).reshape(B, L, self.d_model)",
              "(weights @ v).transpose(1, 2).contiguous().view(B, L, self.d_model)")],
            "reshape to split, contiguous().view to merge"),
    control("masked_fill_in_place_on_scores", MOD,
            ("scores = scores.masked_fill(~mask, float(\"-inf\"))", "scores.masked_fill_(~mask, float(\"-inf\"))"),
            "in place on the scores, which no node saved: exact gradients (the chapter shows it)"),
]

# --- transcriptions: the chapter's code, and the previous exercise's solution, as the answer ------
CHAPTER_AS_ANSWER = {
    MASK: chapter_code("causal_masking", "causal_mask", edits=[
        ("def causal_mask(L, S=None, *, device=None):",
         "def causal_mask(n_queries, n_keys=None, device=None):\n    L, S = n_queries, n_keys")]),
    MOD: '''from handson.nn import merge_heads, split_heads


def attention(q, k, v, attn_mask=None, scale=None):
    """The multi-head chapter's attention, which the causal-masking chapter imports (written out here)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


def attention_safe(q, k, v, attn_mask=None):
    """Like attention(), but a query with no allowed key gets zero weights and a zero output."""
    out, weights = attention(q, k, v, attn_mask)
    if attn_mask is not None:
        no_key = ~attn_mask.any(dim=-1, keepdim=True)           # (..., L, 1)
        weights = weights.masked_fill(no_key, 0.0)
        out = weights @ v
    return out, weights


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.d_head = d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x, attn_mask=None, *, past_kv=None, use_cache=False):
        q = split_heads(self.q(x), self.n_head)
        k = split_heads(self.k(x), self.n_head)
        v = split_heads(self.v(x), self.n_head)
        mask = causal_mask(x.size(1), device=x.device)
        if attn_mask is not None:
            mask = mask & attn_mask
        out, weights = attention_safe(q, k, v, mask)
        return self.o(merge_heads(out)), weights
''',
}

# Exercise 3 (cross-attention), as committed, with the context = x and a tril mask ANDed in; the
# previous exercise has no mask function, so causal_mask is left blank.
PREVIOUS_AS_ANSWER = {
    MOD: '''class CausalSelfAttention(nn.Module):
    """Multi-head cross-attention: queries from x, keys and values from a context of width d_context."""

    def __init__(self, d_model, n_head, d_context=None):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"n_head={n_head} does not divide d_model={d_model}")
        d_context = d_model if d_context is None else d_context
        self.d_model, self.n_head, self.d_head = d_model, n_head, d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_context, d_model)
        self.v = nn.Linear(d_context, d_model)
        self.o = nn.Linear(d_model, d_model)

    def project_context(self, context):
        """context: (B, S, d_context) -> (k, v), each (B, n_head, S, d_head), the heads split."""
        B, S, _ = context.shape
        k = self.k(context).view(B, S, self.n_head, self.d_head).transpose(1, 2)
        v = self.v(context).view(B, S, self.n_head, self.d_head).transpose(1, 2)
        return k, v

    def forward(self, x, attn_mask=None, *, past_kv=None, use_cache=False):
        context, kv = x, None
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        attn_mask = causal if attn_mask is None else causal & attn_mask
        k, v = self.project_context(context) if kv is None else kv
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.n_head, self.d_head).transpose(1, 2)     # (B, H, L, d_head)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)          # (B, H, L, S)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if attn_mask is not None:
            # A query with no allowed key (a source that is all padding): zeros, not NaN.
            no_key = ~attn_mask.any(dim=-1, keepdim=True)
            weights = weights.masked_fill(no_key, 0.0)
        out = (weights @ v).transpose(1, 2).reshape(B, L, self.d_model)
        return self.o(out), weights
''',
}
