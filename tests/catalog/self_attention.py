"""Plausible mistakes in the self-attention exercise, each one a small edit of the solution; correct
answers in other styles (controls); and the chapter's own code pasted as the answer."""

from support import bug, control, chapter_code

SDPA, MOD = "sdpa", "self_attention"

SCORES = "scores = (q @ k.transpose(-2, -1)) * scale"
DEFAULT_SCALE = "scale = 1.0 / math.sqrt(q.size(-1))"
SOFTMAX = "weights = torch.softmax(scores, dim=-1)"
BOOL_FILL = 'scores = scores.masked_fill(~attn_mask, float("-inf"))'
FLOAT_ADD = "scores = scores + attn_mask"
FINITE_BEFORE = "scores = scores.masked_fill(~has_key, 0.0)"
ZERO_AFTER = "weights = weights.masked_fill(~has_key, 0.0)"
BOOL_HAS_KEY = "has_key = attn_mask.any(-1, keepdim=True)"
FAST_PATH = "return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale), None"
TYPE_CHECK = ("if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():\n"
              "        raise TypeError(")
RETURN = "return weights @ v, weights"
CALL = "scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), attn_mask)"

BUGS = [
    # shapes and the order of the results
    bug("softmax_over_queries", SDPA, (SOFTMAX, "weights = torch.softmax(scores, dim=-2)"),
        "normalises over the queries instead of the keys", ["test_sdpa_shapes", "test_sdpa_reference"],
        diagnosis="softmax was probably taken over the wrong dimension"),
    bug("returns_swapped", SDPA, (RETURN, "return weights, weights @ v"),
        "returns (weights, out) instead of (out, weights)", ["test_sdpa_shapes"],
        diagnosis="(out, weights), in that order"),
    bug("only_3d", SDPA, ("k.transpose(-2, -1)", "k.transpose(1, 2)"),
        "transposes fixed dims: right for 3-D inputs only", ["test_sdpa_shapes", "test_sdpa_reference"],
        diagnosis="fixed number of dimensions"),
    # the scale
    bug("no_scaling", SDPA, (SCORES, "scores = q @ k.transpose(-2, -1)"),
        "forgets to scale the scores", ["test_sdpa_reference"], diagnosis="check the scale 1/sqrt(d_k)"),
    bug("scale_by_d", SDPA, (DEFAULT_SCALE, "scale = 1.0 / q.size(-1)"),
        "divides by d instead of sqrt(d)", ["test_sdpa_reference"], diagnosis="check the scale 1/sqrt(d_k)"),
    bug("scale_by_value_dim", SDPA, (DEFAULT_SCALE, "scale = 1.0 / math.sqrt(v.size(-1))"),
        "takes the default scale from the values' dimension", ["test_sdpa_reference"],
        diagnosis="check the scale 1/sqrt(d_k)"),
    bug("scale_argument_ignored", SDPA, ("if scale is None:\n        " + DEFAULT_SCALE, DEFAULT_SCALE),
        "accepts scale= but always uses 1/sqrt(d)", ["test_sdpa_reference"], diagnosis="scale= argument ignored"),
    bug("scale_as_divisor", SDPA, [(DEFAULT_SCALE, "scale = math.sqrt(q.size(-1))"),
                                   (SCORES, "scores = (q @ k.transpose(-2, -1)) / scale"),
                                   ("attn_mask=attn_mask, scale=scale)", "attn_mask=attn_mask, scale=1.0 / scale)")],
        "reads scale as the divisor sqrt(d) (a temperature): right only for scale=None",
        ["test_sdpa_reference"], diagnosis="used as a divisor"),
    # autograd and in-place operations
    bug("mutates_query", SDPA, (SCORES, "q.mul_(scale)\n    scores = q @ k.transpose(-2, -1)"),
        "scales the caller's q in place", ["test_sdpa_reference", "test_sdpa_hygiene"],
        diagnosis="modified in place"),
    bug("detached_scores", SDPA, (SCORES, "scores = (q @ k.transpose(-2, -1)).detach() * scale"),
        "detaches the scores: q and k get no gradient", ["test_sdpa_reference"], diagnosis=".detach()"),
    bug("float32_softmax", SDPA, (SOFTMAX, "weights = torch.softmax(scores.float(), dim=-1)"),
        "computes the softmax in float32: float64 inputs now mix dtypes", ["test_sdpa_reference"],
        diagnosis="float32 and float64 tensors were mixed"),
    # boolean masks
    bug("inverted_mask", SDPA, ("scores.masked_fill(~attn_mask,", "scores.masked_fill(attn_mask,"),
        "uses nn.MultiheadAttention's convention (True = blocked)", ["test_sdpa_masking"],
        diagnosis="the mask is inverted"),
    bug("mask_ignored", SDPA, (BOOL_FILL, "pass"),
        "accepts a boolean mask but never applies it", ["test_sdpa_masking"], diagnosis="the mask was ignored"),
    bug("mask_multiplied", SDPA, (BOOL_FILL, "scores = scores * attn_mask"),
        "multiplies the scores by the mask: a blocked score becomes 0, not -inf, and keeps its weight",
        ["test_sdpa_masking"], diagnosis="multiplied into the scores"),
    bug("data_renormalisation", SDPA,
        (SOFTMAX, "weights = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)\n"
                  "    if attn_mask is not None and attn_mask.dtype == torch.bool:\n"
                  "        weights = weights.masked_fill(~attn_mask, 0.0)\n"
                  "        weights.data = weights.data / weights.data.sum(-1, keepdim=True)"),
        "masks after the softmax and renormalises through .data: right forward, wrong gradients",
        ["test_sdpa_masking"], diagnosis="writes through .data"),
    bug("inplace_zero_softmax_output", SDPA, (ZERO_AFTER, "weights.masked_fill_(~has_key, 0.0)"),
        "zeroes the empty rows of the softmax output in place: backward raises",
        ["test_sdpa_masking", "test_sdpa_float_mask"], diagnosis="saved for the gradient was modified in place"),
    bug("mask_inverted_in_place", SDPA,
        [(BOOL_HAS_KEY, "blocked = attn_mask.logical_not_()\n            has_key = ~blocked.all(-1, keepdim=True)"),
         (BOOL_FILL, 'scores = scores.masked_fill(blocked, float("-inf"))')],
        "turns the caller's mask into 'blocked' in place: right once, but the mask is destroyed",
        ["test_sdpa_masking", "test_sdpa_hygiene"], diagnosis="modified in place by the call"),
    # queries with no allowed key
    bug("nan_for_fully_masked_rows", SDPA, [(FINITE_BEFORE, "pass"), (ZERO_AFTER, "pass")],
        "leaves NaN in the rows of queries that may attend no key (the chapter's version)",
        ["test_sdpa_masking", "test_sdpa_float_mask"], diagnosis="its weights or output hold nan"),
    bug("finite_fill_no_zero_rows", SDPA,
        [(BOOL_FILL, "scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)"),
         (FINITE_BEFORE, "pass"), (ZERO_AFTER, "pass")],
        "fills with finfo.min and never zeroes the empty rows: they become uniform averages",
        ["test_sdpa_masking"], diagnosis="uniform average"),
    bug("zero_only_after_softmax", SDPA, (FINITE_BEFORE, "pass"),
        "zeroes the NaN rows after the softmax only: right forward, NaN inside the backward pass",
        ["test_sdpa_masking", "test_sdpa_float_mask"], diagnosis="leaves that nan in the graph"),
    bug("nan_to_num_after_softmax", SDPA,
        [(FINITE_BEFORE, "pass"), (SOFTMAX, "weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)"),
         (ZERO_AFTER, "pass")],
        "cleans the NaN rows with nan_to_num after the softmax: the NaN stays in the graph",
        ["test_sdpa_masking", "test_sdpa_float_mask"], diagnosis="leaves that nan in the graph"),
    # float masks and other dtypes
    bug("float_mask_inverted_like_bool", SDPA,
        ("if attn_mask.dtype == torch.bool:", "if True:"),
        "treats every mask as boolean: ~ fails on a float mask (the chapter's version)",
        ["test_sdpa_float_mask"], diagnosis="~ was applied to a float mask"),
    bug("float_mask_before_scaling", SDPA,
        [(SCORES, "scores = q @ k.transpose(-2, -1)"), (FLOAT_ADD, "scores = scores + attn_mask"),
         (FINITE_BEFORE, FINITE_BEFORE + "\n    scores = scores * scale")],
        "adds the float mask before scaling: -inf still blocks but the biases are scaled too",
        ["test_sdpa_float_mask"], diagnosis="added to the scaled scores"),
    bug("float_mask_as_bool", SDPA,
        (FLOAT_ADD, 'scores = scores.masked_fill(attn_mask == float("-inf"), float("-inf"))'),
        "uses a float mask only for its -inf entries: the finite biases are dropped",
        ["test_sdpa_float_mask"], diagnosis="added to the scaled scores"),
    bug("int_mask_accepted", SDPA, (TYPE_CHECK, "if False:\n        raise TypeError("),
        "accepts any mask dtype: an integer mask silently takes the float path", ["test_sdpa_mask_dtype"],
        diagnosis="should raise TypeError"),
    bug("value_error_for_mask_dtype", SDPA, ("raise TypeError(", "raise ValueError("),
        "refuses other mask dtypes with ValueError instead of TypeError", ["test_sdpa_mask_dtype"],
        diagnosis="should raise TypeError"),
    # need_weights=False
    bug("need_weights_ignored", SDPA, ("if not need_weights:\n        ", "if False:\n        "),
        "ignores need_weights: returns the weights anyway", ["test_sdpa_need_weights"],
        diagnosis="must return the pair (out, None)"),
    bug("need_weights_materialises", SDPA,
        [("if not need_weights:\n        ", "if False:\n        "), (RETURN, "return weights @ v, weights if need_weights else None")],
        "computes the weights anyway and only drops them from the result", ["test_sdpa_need_weights"],
        diagnosis="was materialised"),
    bug("need_weights_default_scale", SDPA, ("attn_mask=attn_mask, scale=scale)", "attn_mask=attn_mask)"),
        "calls SDPA without scale=: need_weights=False silently uses 1/sqrt(d)", ["test_sdpa_need_weights"],
        diagnosis="pass the same attn_mask and scale"),
    bug("need_weights_drops_mask", SDPA, ("attn_mask=attn_mask, scale=scale)", "scale=scale)"),
        "calls SDPA without the mask", ["test_sdpa_need_weights"], diagnosis="pass the same attn_mask and scale"),
    # devices
    bug("cpu_fill_tensor", SDPA,
        (BOOL_FILL, 'scores = torch.where(attn_mask, scores, torch.full(scores.shape, float("-inf"), dtype=scores.dtype))'),
        "builds the fill tensor on the CPU: fails for inputs on another device", ["test_sdpa_hygiene"],
        diagnosis="device=x.device"),
    bug("default_mask_on_cpu", SDPA,
        ("    has_key = None\n", "    has_key = None\n    if attn_mask is None:\n"
                               "        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool)\n"),
        "builds an all-True mask on the CPU when none is given: only the path without a mask breaks on meta",
        ["test_sdpa_hygiene"], diagnosis="device=x.device"),
    # delegation
    bug("delegates_to_library", SDPA,
        ("    if scale is None:\n", "    from handson.nn import attention\n"
                                 "    return attention(q, k, v, attn_mask, scale=scale, need_weights=need_weights)\n"
                                 "    if scale is None:\n"),
        "hands the whole job to the library's attention core", ["test_sdpa_shapes", "test_sdpa_reference"],
        diagnosis="asks you to write yourself"),
    # the module
    bug("module_bias_flag_ignored", MOD,
        [(f"self.{n} = nn.Linear(d_model, d_model, bias=bias)", f"self.{n} = nn.Linear(d_model, d_model)")
         for n in "qkvo"],
        "accepts bias= but always builds biases", ["test_module_shapes", "test_module_reference"],
        diagnosis="with bias=False the module must have none"),
    bug("module_output_bias_always", MOD,
        ("self.o = nn.Linear(d_model, d_model, bias=bias)", "self.o = nn.Linear(d_model, d_model)"),
        "forgets the flag on the output projection", ["test_module_shapes"],
        diagnosis="o has a bias, but with bias=False"),
    bug("module_without_output_projection", MOD, ("return self.o(out), weights", "return out, weights"),
        "never applies the output projection o", ["test_module_reference"], diagnosis="the output projection o"),
    bug("module_keys_as_queries", MOD, (CALL, "scaled_dot_product_attention(self.k(x), self.q(x), self.v(x), attn_mask)"),
        "swaps the query and key projections", ["test_module_reference"], diagnosis="q makes the queries and k the keys"),
    bug("module_drops_mask", MOD, (CALL, "scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))"),
        "the module ignores its attn_mask", ["test_module_reference"], diagnosis="the mask reaches the attention"),
    bug("module_default_mask_on_cpu", MOD,
        (f"out, weights = {CALL}",
         "if attn_mask is None:\n            attn_mask = torch.ones(x.size(1), x.size(1), dtype=torch.bool)\n"
         f"        out, weights = {CALL}"),
        "builds an all-True mask on the CPU when none is given", ["test_module_hygiene"], diagnosis="device=x.device"),
    bug("module_caches_first_mask", MOD,
        (f"out, weights = {CALL}",
         "if attn_mask is not None and not hasattr(self, '_mask'):\n            self._mask = attn_mask\n"
         "        if attn_mask is not None:\n            attn_mask = self._mask\n"
         f"        out, weights = {CALL}"),
        "keeps the first mask it saw and reuses it at later calls", ["test_module_reference"],
        diagnosis="keeps state across calls"),
    bug("module_delegates_to_torch", MOD,
        (f"out, weights = {CALL}",
         "mha = nn.MultiheadAttention(self.q.in_features, 1, batch_first=True, dtype=x.dtype, device=x.device)\n"
         "        if attn_mask is not None and attn_mask.dtype == torch.bool:\n            attn_mask = ~attn_mask\n"
         "        return mha(x, x, x, attn_mask=attn_mask)\n"
         f"        out, weights = {CALL}"),
        "hands the module to nn.MultiheadAttention", ["test_module_shapes"], diagnosis="asks you to write yourself"),
]

CONTROLS = [
    control("einsum", SDPA, [(SCORES, 'scores = torch.einsum("...ld,...sd->...ls", q, k) * scale'),
                             (RETURN, 'return torch.einsum("...ls,...sd->...ld", weights, v), weights')],
            "einsum for both products"),
    control("torch_where_mask", SDPA, (BOOL_FILL, 'scores = torch.where(attn_mask, scores, float("-inf"))'),
            "torch.where with a scalar fill instead of masked_fill"),
    control("additive_finfo_min_bias", SDPA,
            [(BOOL_FILL, "scores = scores + (~attn_mask).to(scores.dtype) * torch.finfo(scores.dtype).min"),
             (FINITE_BEFORE, "if attn_mask.dtype != torch.bool:        # finfo.min rows are finite already\n"
                             "            " + FINITE_BEFORE)],
            "a bool mask as an additive finfo.min bias: blocked weights are still exactly 0 (exp underflows) "
            "and an empty row is finite (uniform) before the explicit zeroing"),
    control("sdpa_out_separate_weights", SDPA,
            (RETURN, "return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale), weights"),
            "SDPA for the output, the weights computed separately"),
    control("keyword_only_options", SDPA,
            ("attn_mask=None, scale=None, need_weights=True):", "attn_mask=None, *, scale=None, need_weights=True):"),
            "scale and need_weights keyword-only"),
    control("manual_softmax", SDPA,
            (SOFTMAX, "e = torch.exp(scores - scores.amax(-1, keepdim=True))\n"
                      "    weights = e / e.sum(-1, keepdim=True)"),
            "the softmax written out (max subtracted)"),
    control("empty_rows_from_scores", SDPA,
            [(FINITE_BEFORE, 'has_key = (scores > float("-inf")).any(-1, keepdim=True)\n        ' + FINITE_BEFORE)],
            "finds the queries with no key from the masked scores, not from the mask"),
    control("power_scale", SDPA, (DEFAULT_SCALE, "scale = q.shape[-1] ** -0.5"), "d ** -0.5 for the scale"),
    control("module_positional_bias_inline_attention", MOD,
            [(f"self.{n} = nn.Linear(d_model, d_model, bias=bias)", f"self.{n} = nn.Linear(d_model, d_model, bias)")
             for n in "qkvo"] + [(CALL, "scaled_dot_product_attention(q=self.q(x), k=self.k(x), v=self.v(x), "
                                        "attn_mask=attn_mask, scale=None)")],
            "bias passed positionally; the function called with keywords"),
    control("module_sdpa_output", MOD,
            (f"out, weights = {CALL}\n",
             f"_, weights = {CALL}\n"
             "        out = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), attn_mask=attn_mask)\n"),
            "the module takes its output from SDPA and its weights from the function"),
]

# The chapter's own code (book/self_attention.ipynb), adapted only to the exercise's signatures.
CHAPTER_AS_ANSWER = {
    SDPA: chapter_code("self_attention", "scaled_dot_product_attention", edits=[(
        "def scaled_dot_product_attention(q, k, v, attn_mask=None):",
        "def scaled_dot_product_attention(q, k, v, attn_mask=None, scale=None, need_weights=True):")]),
    MOD: chapter_code("self_attention", "SelfAttention", edits=[
        ("def __init__(self, d_model):", "def __init__(self, d_model, bias=True):")]),
}
