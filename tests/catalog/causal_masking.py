"""Plausible mistakes in the causal-masking exercise, each one a small edit of the solution."""

from support import bug

MASK, MOD = "causal_mask", "causal_self_attention"

BUGS = [
    # --- causal_mask -------------------------------------------------------------------------
    bug("top_left_alignment", MASK, ("ones.tril(diagonal=n_keys - n_queries)", "ones.tril()"),
        "aligns the diagonal top-left (like is_causal=True): wrong when n_queries != n_keys, e.g. a "
        "single decoding query sees only key 0", ["test_causal_mask"]),
    bug("off_by_one_no_diagonal", MASK,
        ("ones.tril(diagonal=n_keys - n_queries)", "ones.tril(diagonal=n_keys - n_queries - 1)"),
        "excludes the diagonal: a query may not attend its own token, the first row is empty",
        ["test_causal_mask", "test_module_shapes", "test_module_reference"]),
    bug("inverted_mask_triu", MASK,
        ("ones.tril(diagonal=n_keys - n_queries)", "ones.triu(diagonal=n_keys - n_queries + 1)"),
        "returns the blocked positions (nn.MultiheadAttention's convention): every query sees only "
        "its future", ["test_causal_mask", "test_module_shapes", "test_module_causal", "test_module_reference"]),
    bug("offset_sign_flipped", MASK,
        ("ones.tril(diagonal=n_keys - n_queries)", "ones.tril(diagonal=n_queries - n_keys)"),
        "computes the offset as n_queries - n_keys: right for square masks only", ["test_causal_mask"]),
    bug("n_keys_default_missing", MASK, ("    if n_keys is None:\n        n_keys = n_queries\n", ""),
        "forgets the default n_keys = n_queries: causal_mask(L) raises a TypeError",
        ["test_causal_mask", "test_causal_mask_device", "test_module_shapes"]),
    bug("mask_ignores_device", MASK, (", device=device)", ")"),
        "accepts a device but creates the mask on the CPU", ["test_causal_mask_device"]),
    bug("float_mask", MASK, ("dtype=torch.bool, ", ""),
        "returns a float mask of ones and zeros instead of a boolean one",
        ["test_causal_mask", "test_causal_mask_device"]),
    # --- CausalSelfAttention -----------------------------------------------------------------
    bug("padding_or_instead_of_and", MOD, ("mask = mask & attn_mask", "mask = mask | attn_mask"),
        "combines the padding mask with OR: every real key, past and future, is allowed",
        ["test_module_causal", "test_module_reference", "test_module_padding"]),
    bug("padding_mask_ignored", MOD, ("mask = mask & attn_mask", "pass"),
        "accepts attn_mask but never applies it: padding keys get weight",
        ["test_module_reference", "test_module_padding"]),
    bug("inplace_and_mutates_caller_mask", MOD,
        ("mask = mask & attn_mask", "attn_mask &= mask\n            mask = attn_mask"),
        "combines in place with attn_mask &= causal: the caller's mask is modified (and a (B, 1, 1, L) "
        "mask cannot hold the result)",
        ["test_module_hygiene", "test_module_causal", "test_module_reference", "test_module_padding"]),
    bug("inplace_fill_softmax_output", MOD,
        ("weights = weights.masked_fill(no_key, 0.0)", "weights.masked_fill_(no_key, 0.0)"),
        "zeroes the rows in place on the softmax output, which autograd saved: backward raises",
        ["test_module_causal", "test_module_reference", "test_module_padding"]),
    bug("detached_scores", MOD, ("scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)",
                                 "scores = (q @ k.transpose(-2, -1)).detach() / math.sqrt(self.d_head)"),
        "detaches the scores: q and k get no gradient, silently", ["test_module_reference", "test_module_padding"]),
    bug("data_renormalisation", MOD,
        [("        scores = scores.masked_fill(~mask, float(\"-inf\"))\n", ""),
         ("weights = weights.masked_fill(no_key, 0.0)",
          "weights = weights.masked_fill(~mask, 0.0)\n"
          "        weights.data = weights.data / weights.data.sum(-1, keepdim=True)")],
        "masks after the softmax and renormalises through .data: right forward, wrong q/k gradients "
        "(and 0/0 for queries without keys)", ["test_module_causal", "test_module_reference", "test_module_padding"]),
    bug("nan_rows_left_padding", MOD, ("weights = weights.masked_fill(no_key, 0.0)", "pass"),
        "leaves NaN rows for queries with no allowed key (left padding)", ["test_module_padding"]),
    bug("finite_fill_uniform_rows", MOD,
        [("float(\"-inf\"))", "torch.finfo(scores.dtype).min)"), ("weights = weights.masked_fill(no_key, 0.0)", "pass")],
        "fills with finfo.min: no NaN, but a query without keys averages the padding values instead "
        "of giving zero", ["test_module_padding"]),
    bug("causal_mask_on_cpu", MOD, ("causal_mask(L, device=x.device)", "causal_mask(L)"),
        "creates the causal mask on the CPU: fails for inputs on another device", ["test_module_hygiene"]),
    bug("softmax_in_float32", MOD, ("weights = torch.softmax(scores, dim=-1)",
                                    "weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)"),
        "computes the softmax in float32 and casts back: float64 inputs lose precision",
        ["test_module_reference", "test_module_padding"]),
    bug("scale_by_d_model", MOD, ("/ math.sqrt(self.d_head)", "/ math.sqrt(self.d_model)"),
        "scales the scores by 1/sqrt(d_model) instead of 1/sqrt(d_head)", ["test_module_reference", "test_module_padding"]),
    bug("heads_split_without_transpose", MOD,
        ("t.view(B, L, self.n_head, self.d_head).transpose(1, 2)", "t.view(B, self.n_head, L, self.d_head)"),
        "splits the heads with a plain view: tokens are mixed across positions and the future leaks",
        ["test_module_causal", "test_module_reference", "test_module_padding"]),
    bug("heads_merged_without_transpose", MOD,
        ("(weights @ v).transpose(1, 2).reshape(B, L, self.d_model)", "(weights @ v).reshape(B, L, self.d_model)"),
        "merges the heads without transposing back: outputs of later positions land at earlier ones",
        ["test_module_causal", "test_module_reference", "test_module_padding"]),
    bug("no_value_error", MOD, ("raise ValueError(f\"n_head={n_head} must divide d_model={d_model}\")", "pass"),
        "does not reject a number of heads that does not divide d_model", ["test_module_shapes"]),
]
