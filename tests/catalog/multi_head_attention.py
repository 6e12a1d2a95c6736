"""Plausible mistakes in the multi-head attention exercise, each one a small edit of the solution;
correct answers in other styles (controls); and the chapter's code pasted as the answer."""

from support import bug, control, chapter_code

HEADS, MHA = "heads", "mha"

SPLIT = "x.view(B, L, n_head, D // n_head).transpose(1, 2)"
MERGE = "x.transpose(1, 2).reshape(B, L, H * d_head)"
SCALE = "(1.0 / math.sqrt(self.head_dim))"
FILL = 'scores = scores.masked_fill(~attn_mask, float("-inf"))'
NO_KEY = "no_key = ~attn_mask.any(dim=-1, keepdim=True)"
ZERO_ROWS = "weights = weights.masked_fill(no_key, 0.0)"
SOFTMAX = "weights = torch.softmax(scores, dim=-1)"
MERGED = "out = merge_heads(weights @ v)"
RETURN = "return self.o(out), weights"
CHECK = ('        if head_dim is None:\n'
         '            if d_model % n_head != 0:\n'
         '                raise ValueError(f"n_head={n_head} must divide d_model={d_model} (or give head_dim)")\n'
         '            head_dim = d_model // n_head\n')
LAYERS = ("        self.q = nn.Linear(d_model, inner, bias=bias)\n"
          "        self.k = nn.Linear(d_model, inner, bias=bias)\n"
          "        self.v = nn.Linear(d_model, inner, bias=bias)\n"
          "        self.o = nn.Linear(inner, d_model, bias=bias)\n")
BUILD = "layer = cls(mha.embed_dim, mha.num_heads, bias=bias).to(device=w_in.device, dtype=w_in.dtype)"
QKV_COPY = ("            for lin, w in zip((layer.q, layer.k, layer.v), w_in.chunk(3)):\n"
            "                lin.weight.copy_(w)\n")
O_COPY = "layer.o.weight.copy_(mha.out_proj.weight)"
BIAS_COPY = ("            if bias:\n"
             "                for lin, b in zip((layer.q, layer.k, layer.v), mha.in_proj_bias.chunk(3)):\n"
             "                    lin.bias.copy_(b)\n"
             "                layer.o.bias.copy_(mha.out_proj.bias)\n")
FROM_BODY = ("        with torch.no_grad():\n" + QKV_COPY + "            " + O_COPY + "\n" + BIAS_COPY)
TO_RAISE = 'raise ValueError(f"nn.MultiheadAttention needs'
TO_BUILD = ("mha = nn.MultiheadAttention(self.d_model, self.n_head, bias=bias, batch_first=batch_first,\n"
            "                                    device=w.device, dtype=w.dtype)")
TO_CAT = "torch.cat([self.q.weight, self.k.weight, self.v.weight])"

BUGS = [
    # splitting and merging heads
    bug("split_without_transpose", HEADS, (SPLIT, "x.view(B, L, n_head, D // n_head)"),
        "splits into (B, L, H, d_head) and never brings the heads forward: attention runs over the heads "
        "of one token", ["test_heads", "test_mha_shapes", "test_mha_reference"], diagnosis="transpose(1, 2)"),
    bug("split_wrong_axis", HEADS, (SPLIT, "x.view(B, n_head, L, D // n_head)"),
        "views the projection straight as (B, H, L, d_head): right shape, but positions mix tokens",
        ["test_heads", "test_mha_reference", "test_mha_masking", "test_mha_heads"], diagnosis="mixes tokens"),
    bug("split_interleaved", HEADS, (SPLIT, "x.view(B, L, D // n_head, n_head).permute(0, 3, 1, 2)"),
        "gives head h the strided columns h, h + H, ... instead of a contiguous block",
        ["test_heads", "test_mha_reference", "test_mha_heads"], diagnosis="head h's columns"),
    bug("merge_view_not_contiguous", HEADS, (MERGE, "x.transpose(1, 2).view(B, L, H * d_head)"),
        "calls view on the transposed (non-contiguous) heads: raises",
        ["test_heads", "test_mha_reference"], diagnosis="contiguous"),
    bug("merge_without_transpose", HEADS, (MERGE, "x.reshape(B, L, H * d_head)"),
        "reshapes (B, H, L, d_head) straight to (B, L, D): a token's row gets other tokens' results",
        ["test_heads", "test_mha_reference", "test_mha_masking", "test_mha_heads"], diagnosis="transpose(1, 2) back"),
    # the layers
    bug("no_value_error", MHA, ("raise ValueError(f\"n_head={n_head}", "print(f\"n_head={n_head}"),
        "does not reject an n_head that does not divide d_model", ["test_mha_value_error"],
        diagnosis="should raise ValueError"),
    bug("assert_instead_of_value_error", MHA,
        ('            if d_model % n_head != 0:\n'
         '                raise ValueError(f"n_head={n_head} must divide d_model={d_model} (or give head_dim)")\n',
         '            assert d_model % n_head == 0, "n_head must divide d_model"\n'),
        "uses assert (AssertionError, and skipped under python -O) instead of raising ValueError",
        ["test_mha_value_error"], diagnosis="an assert is no argument check"),
    bug("value_error_despite_head_dim", MHA,
        (CHECK, '        if d_model % n_head != 0:\n'
                '            raise ValueError(f"n_head={n_head} must divide d_model={d_model}")\n'
                '        if head_dim is None:\n'
                '            head_dim = d_model // n_head\n'),
        "checks divisibility even when head_dim is given, so MultiHeadAttention(12, 5, head_dim=2) raises",
        ["test_mha_value_error"], diagnosis="with head_dim given"),
    bug("no_query_bias", MHA, ("self.q = nn.Linear(d_model, inner, bias=bias)",
                               "self.q = nn.Linear(d_model, inner, bias=False)"),
        "drops the query bias (nn.MultiheadAttention has one)", ["test_mha_shapes"], diagnosis="has no bias"),
    bug("bias_flag_ignored", MHA, (LAYERS, LAYERS.replace(", bias=bias)", ")")),
        "accepts bias= but always builds layers with biases", ["test_mha_shapes"],
        diagnosis="bias=False"),
    bug("o_square", MHA, ("self.o = nn.Linear(inner, d_model, bias=bias)",
                          "self.o = nn.Linear(d_model, d_model, bias=bias)"),
        "keeps o square (d_model -> d_model): breaks as soon as n_head * head_dim != d_model",
        ["test_mha_shapes", "test_mha_head_dim"], diagnosis="o should be nn.Linear(15, 12)"),
    bug("projections_to_d_model", MHA, (LAYERS, LAYERS.replace("nn.Linear(d_model, inner", "nn.Linear(d_model, d_model")
                                        .replace("nn.Linear(inner, d_model", "nn.Linear(d_model, d_model")),
        "ignores head_dim in the layers: q, k, v, o all d_model -> d_model", ["test_mha_shapes", "test_mha_head_dim"],
        diagnosis="q should be nn.Linear(12, 15)"),
    # scores and softmax
    bug("scale_by_d_model", MHA, (SCALE, "(1.0 / math.sqrt(self.d_model))"),
        "divides the scores by sqrt(d_model) instead of sqrt(head_dim)", ["test_mha_reference", "test_mha_head_dim"],
        diagnosis="scaled by 1/sqrt(d_model)"),
    bug("scale_from_d_model_over_heads", MHA, (SCALE, "(1.0 / math.sqrt(self.d_model // self.n_head))"),
        "scales by 1/sqrt(d_model // n_head), which is head_dim only in the common case",
        ["test_mha_head_dim"], diagnosis="scaled by 1/sqrt(d_model // n_head)"),
    bug("softmax_over_heads", MHA, (SOFTMAX, "weights = torch.softmax(scores, dim=1)"),
        "normalises over the heads instead of the keys", ["test_mha_shapes", "test_mha_reference"],
        diagnosis="wrong dimension"),
    bug("softmax_over_queries", MHA, (SOFTMAX, "weights = torch.softmax(scores, dim=-2)"),
        "normalises over the queries instead of the keys", ["test_mha_shapes", "test_mha_reference"],
        diagnosis="wrong dimension"),
    bug("detached_weights", MHA, (SOFTMAX, "weights = torch.softmax(scores, dim=-1).detach()"),
        "detaches the weights: q and k get no gradient", ["test_mha_reference"], diagnosis="detached"),
    bug("float32_softmax", MHA, (SOFTMAX, "weights = torch.softmax(scores.float(), dim=-1)"),
        "computes the softmax in float32: float64 inputs now fail", ["test_mha_reference", "test_mha_hygiene"],
        diagnosis="float32 and float64"),
    # masks
    bug("inverted_mask", MHA, ("scores.masked_fill(~attn_mask,", "scores.masked_fill(attn_mask,"),
        "uses nn.MultiheadAttention's convention (True = may not attend)",
        ["test_mha_reference", "test_mha_masking"], diagnosis="mask inverted"),
    bug("mask_only_square", MHA,
        (FILL, 'scores = scores.masked_fill(~attn_mask.view(-1, 1, x.shape[1], x.shape[1]), float("-inf"))'),
        "reshapes the mask to (B, 1, L, L): works for (L, L) masks, fails for a head axis or key padding",
        ["test_mha_reference", "test_mha_masking"], diagnosis="no view, expand or reshape"),
    bug("mask_expanded_without_heads", MHA,
        (FILL, "attn_mask = attn_mask.expand(x.shape[0], 1, x.shape[1], x.shape[1])\n"
               "            " + FILL),
        "expands every mask to (B, 1, L, L): a mask with a head axis, (1, H, L, L) or (B, H, L, L), raises",
        ["test_mha_masking"], diagnosis="no view, expand or reshape"),
    bug("nan_for_fully_masked_rows", MHA, (ZERO_ROWS, "pass"),
        "leaves NaN in the rows of queries whose keys are all masked", ["test_mha_masking"],
        diagnosis="keys are all masked"),
    bug("finite_fill_no_zero_rows", MHA, [('float("-inf"))', "-1e9)"), (ZERO_ROWS, "pass")],
        "fills with -1e9: fully masked rows become uniform averages instead of zero", ["test_mha_masking"],
        diagnosis="finite fill"),
    bug("empty_rows_without_keepdim", MHA, (NO_KEY, "no_key = ~attn_mask.any(dim=-1)"),
        "drops keepdim when finding the queries with no key: the flag broadcasts onto the wrong axes",
        ["test_mha_masking"], diagnosis="keepdim"),
    bug("inplace_fill_softmax_output", MHA, (ZERO_ROWS, "weights.masked_fill_(no_key, 0.0)"),
        "zeroes the empty rows of the softmax output in place: backward raises",
        ["test_mha_reference", "test_mha_masking"], diagnosis="in place"),
    bug("mask_inverted_in_place", MHA,
        [(FILL, "blocked = attn_mask.logical_not_()\n"
                '            scores = scores.masked_fill(blocked, float("-inf"))'),
         (NO_KEY, "no_key = blocked.all(dim=-1, keepdim=True)")],
        "converts the caller's mask to 'blocked' in place: right result once, but the mask is destroyed",
        ["test_mha_reference", "test_mha_hygiene"], diagnosis="modified in place"),
    bug("cpu_zeros_for_empty_rows", MHA,
        (ZERO_ROWS, "weights = torch.where(no_key, torch.zeros(weights.shape, dtype=weights.dtype), weights)"),
        "builds the zeros on the CPU: fails for inputs on another device", ["test_mha_hygiene"],
        diagnosis="device=x.device"),
    # the module's output and state
    bug("weights_averaged_over_heads", MHA, (RETURN, "return self.o(out), weights.mean(dim=1)"),
        "returns the head-averaged weights (nn.MultiheadAttention's default) instead of one matrix per head",
        ["test_mha_shapes", "test_mha_heads"], diagnosis="do not average"),
    bug("no_output_projection", MHA, (RETURN, "return out, weights"),
        "never applies the output projection o", ["test_mha_shapes", "test_mha_reference"],
        diagnosis="o maps the merged heads"),
    bug("shape_cached_at_first_call", MHA,
        (MERGED, 'if not hasattr(self, "_shape"):\n'
                 "            self._shape = x.shape                      # (B, L, d_model) of the first call\n"
                 "        B, L, _ = self._shape\n"
                 "        out = (weights @ v).transpose(1, 2).reshape(B, L, -1)"),
        "caches the input's size at the first call: the same instance breaks at another batch size or length",
        ["test_mha_reference"], diagnosis="keeps state across calls"),
    # from_torch
    bug("from_torch_blocks_in_wrong_order", MHA,
        ("zip((layer.q, layer.k, layer.v), w_in.chunk(3))", "zip((layer.k, layer.q, layer.v), w_in.chunk(3))"),
        "unpacks in_proj_weight as [W_k, W_q, W_v]", ["test_from_torch"], diagnosis="order of the blocks"),
    bug("from_torch_out_proj_transposed", MHA, (O_COPY, "layer.o.weight.copy_(mha.out_proj.weight.T)"),
        "transposes out_proj.weight, thinking nn.Linear stores (in, out)", ["test_from_torch"],
        diagnosis="transpose"),
    bug("from_torch_in_proj_transposed", MHA, ("lin.weight.copy_(w)", "lin.weight.copy_(w.T)"),
        "transposes each block of in_proj_weight", ["test_from_torch"], diagnosis="transpose"),
    bug("from_torch_without_no_grad", MHA,
        (FROM_BODY, "\n".join(line[4:] if line.startswith("            ") else line
                              for line in FROM_BODY.splitlines()[1:]) + "\n"),
        "copies into the parameters without torch.no_grad(): autograd refuses the in-place write into a leaf",
        ["test_from_torch"], diagnosis="torch.no_grad()"),
    bug("from_torch_biases_not_copied", MHA, (BIAS_COPY, ""),
        "copies the weights but leaves the new layer's own random biases", ["test_from_torch"],
        diagnosis="q.bias differs"),
    bug("from_torch_always_with_bias", MHA,
        [(BUILD, BUILD.replace(", bias=bias)", ")"))],
        "always builds a layer with biases: a bias-free nn.MultiheadAttention gets random ones",
        ["test_from_torch"], diagnosis="bias=False"),
    bug("from_torch_head_dim_as_heads", MHA, ("cls(mha.embed_dim, mha.num_heads,", "cls(mha.embed_dim, mha.head_dim,"),
        "passes mha.head_dim where the number of heads goes", ["test_from_torch"], diagnosis="num_heads"),
    bug("from_torch_default_dtype", MHA, (".to(device=w_in.device, dtype=w_in.dtype)", ""),
        "builds the layer in float32 on the CPU: copy_ silently rounds float64 weights",
        ["test_from_torch"], diagnosis="dtype and device"),
    bug("from_torch_cpu_only", MHA, (".to(device=w_in.device, dtype=w_in.dtype)", ".to(dtype=w_in.dtype)"),
        "follows mha's dtype but not its device", ["test_from_torch"], diagnosis="device"),
    bug("from_torch_not_cls", MHA, ("layer = cls(", "layer = MultiHeadAttention("),
        "hard-codes the class in a classmethod: a subclass gets a MultiHeadAttention", ["test_from_torch"],
        diagnosis="cls(...)"),
    bug("from_torch_parameter_of_a_view", MHA, ("lin.weight.copy_(w)", "lin.weight = nn.Parameter(w)"),
        "wraps a slice of in_proj_weight in nn.Parameter: the new layer shares mha's memory",
        ["test_from_torch_copies"], diagnosis="shares memory"),
    bug("from_torch_data_assignment", MHA, (O_COPY, "layer.o.weight.data = mha.out_proj.weight.data"),
        "assigns .data: o shares out_proj's memory", ["test_from_torch_copies"], diagnosis="shares memory"),
    # to_torch
    bug("to_torch_no_value_error", MHA, (TO_RAISE, 'print(f"nn.MultiheadAttention needs'),
        "does not refuse n_head * head_dim != d_model: nn.MultiheadAttention then fails with its own assert",
        ["test_to_torch"], diagnosis="should raise ValueError itself"),
    bug("to_torch_ignores_batch_first", MHA, (TO_BUILD, TO_BUILD.replace("batch_first=batch_first", "batch_first=True")),
        "always builds a batch-first nn.MultiheadAttention", ["test_to_torch"], diagnosis="batch_first"),
    bug("to_torch_blocks_in_wrong_order", MHA, (TO_CAT, "torch.cat([self.q.weight, self.v.weight, self.k.weight])"),
        "packs in_proj_weight as [W_q, W_v, W_k]", ["test_to_torch"], diagnosis="order of the blocks"),
    bug("to_torch_default_dtype", MHA, (TO_BUILD, TO_BUILD.replace(", dtype=w.dtype", "")),
        "builds nn.MultiheadAttention in float32: a float64 layer's weights are rounded", ["test_to_torch"],
        diagnosis="dtype and device"),
]

CONTROLS = [
    control("split_merge_reshape_permute", HEADS,
            [(SPLIT, "x.reshape(B, L, n_head, -1).permute(0, 2, 1, 3)"),
             (MERGE, "x.permute(0, 2, 1, 3).contiguous().view(B, L, H * d_head)")],
            "reshape + permute to split, contiguous().view to merge"),
    control("split_merge_unflatten_flatten", HEADS,
            [(SPLIT, "x.unflatten(-1, (n_head, -1)).transpose(-3, -2)"),
             (MERGE, "x.transpose(-3, -2).flatten(-2)")],
            "the chapter's style for any number of leading dimensions, written out"),
    control("library_split_merge_in_module", MHA,
            [("q = split_heads(self.q(x), self.n_head)", "from handson.nn import merge_heads as _merge, split_heads as _split\n"
              "        q = _split(self.q(x), self.n_head)"),
             ("k = split_heads(self.k(x), self.n_head)", "k = _split(self.k(x), self.n_head)"),
             ("v = split_heads(self.v(x), self.n_head)", "v = _split(self.v(x), self.n_head)"),
             (MERGED, "out = _merge(weights @ v)")],
            "the module uses the library's split_heads/merge_heads, which the release allows"),
    control("einsum", MHA,
            [("scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))",
              'scores = torch.einsum("bhld,bhsd->bhls", q, k) / math.sqrt(self.head_dim)'),
             (MERGED, 'out = merge_heads(torch.einsum("bhls,bhsd->bhld", weights, v))')],
            "einsum for the scores and the weighted values"),
    control("loop_over_heads", MHA,
            [("        q = split_heads(self.q(x), self.n_head)                       # (B, H, L, head_dim)\n"
              "        k = split_heads(self.k(x), self.n_head)\n"
              "        v = split_heads(self.v(x), self.n_head)\n"
              "        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))   # (B, H, L, L)\n",
              "        d = self.head_dim\n"
              "        qx, kx, vx = self.q(x), self.k(x), self.v(x)\n"
              "        per_head = [qx[..., h * d:(h + 1) * d] @ kx[..., h * d:(h + 1) * d].transpose(-2, -1)\n"
              "                    for h in range(self.n_head)]\n"
              "        scores = torch.stack(per_head, dim=1) / math.sqrt(d)                  # (B, H, L, L)\n"),
             (MERGED, "out = torch.cat([weights[:, h] @ vx[..., h * d:(h + 1) * d]\n"
                      "                         for h in range(self.n_head)], dim=-1)")],
            "an explicit loop over heads, slicing each head's columns"),
    control("where_finfo_min", MHA,
            [(FILL, "scores = torch.where(attn_mask, scores, torch.finfo(scores.dtype).min)")],
            "torch.where with finfo.min: masked keys still get exactly zero weight, empty rows are zeroed after"),
    control("additive_finfo_min_bias", MHA,
            [(FILL, "bias = torch.zeros_like(scores).masked_fill(~attn_mask, torch.finfo(scores.dtype).min)\n"
                    "            scores = scores + bias")],
            "an additive finfo.min bias (exact: exp(finfo.min - max) is 0), empty rows zeroed after"),
    control("sdpa_for_the_output", MHA,
            [(MERGED, "out = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, "
                      "scale=1.0 / math.sqrt(self.head_dim)))")],
            "F.scaled_dot_product_attention for the result, the weights computed separately (allowed)"),
    control("positional_head_dim_and_bias", MHA,
            [("def __init__(self, d_model, n_head, *, head_dim=None, bias=True):",
              "def __init__(self, d_model, n_head, head_dim=None, bias=True):")],
            "head_dim and bias positional-or-keyword: the tests pass them by keyword"),
    control("from_torch_load_state_dict", MHA,
            [(FROM_BODY, "        state = {'q.weight': w_in[:mha.embed_dim], 'k.weight': w_in[mha.embed_dim:2 * mha.embed_dim],\n"
                         "                 'v.weight': w_in[2 * mha.embed_dim:], 'o.weight': mha.out_proj.weight}\n"
                         "        if bias:\n"
                         "            b_in = mha.in_proj_bias\n"
                         "            state.update({'q.bias': b_in[:mha.embed_dim], 'k.bias': b_in[mha.embed_dim:2 * mha.embed_dim],\n"
                         "                          'v.bias': b_in[2 * mha.embed_dim:], 'o.bias': mha.out_proj.bias})\n"
                         "        layer.load_state_dict(state)\n")],
            "load_state_dict with slices (it copies)"),
    control("from_torch_fresh_parameters", MHA,
            [(FROM_BODY, "        names = ('q', 'k', 'v')\n"
                         "        for name, w in zip(names, torch.split(w_in, mha.embed_dim)):\n"
                         "            getattr(layer, name).weight = nn.Parameter(w.detach().clone())\n"
                         "        layer.o.weight = nn.Parameter(mha.out_proj.weight.detach().clone())\n"
                         "        if bias:\n"
                         "            for name, b in zip(names, torch.split(mha.in_proj_bias, mha.embed_dim)):\n"
                         "                getattr(layer, name).bias = nn.Parameter(b.detach().clone())\n"
                         "            layer.o.bias = nn.Parameter(mha.out_proj.bias.detach().clone())\n")],
            "new nn.Parameters from detached clones, torch.split instead of chunk"),
    control("to_torch_load_state_dict", MHA,
            [("        with torch.no_grad():\n"
              "            mha.in_proj_weight.copy_(" + TO_CAT + ")\n",
              "        state = {'in_proj_weight': " + TO_CAT + ", 'out_proj.weight': self.o.weight}\n"
              "        if bias:\n"
              "            state['in_proj_bias'] = torch.cat([self.q.bias, self.k.bias, self.v.bias])\n"
              "            state['out_proj.bias'] = self.o.bias\n"
              "        mha.load_state_dict(state)\n"
              "        with torch.no_grad():\n"
              "            mha.in_proj_weight.copy_(" + TO_CAT + ")\n")],
            "to_torch through load_state_dict"),
]

# The chapter's code, pasted into the answer cells: its split_heads / merge_heads (book cell 20), its
# attention and MultiHeadAttention(d_model, n_head) (book cells 23 and 22), which takes no head_dim or
# bias, raises no ValueError, leaves NaN in empty rows and has no from_torch / to_torch.
CHAPTER_HEADS = chapter_code("multi_head_attention", "split_heads", "merge_heads")
CHAPTER_MODULE = "\n\n" + chapter_code("multi_head_attention", "MultiHeadAttention")

CHAPTER_AS_ANSWER = {
    HEADS: CHAPTER_HEADS,
    MHA: chapter_code("multi_head_attention", "attention") + CHAPTER_MODULE,
}

# Exercise 1's solution (solutions/self_attention: scaled_dot_product_attention, which zeroes the rows
# of queries with no allowed key) in place of the chapter's attention, inside the chapter's module.
PREVIOUS_AS_ANSWER = {
    HEADS: CHAPTER_HEADS,
    MHA: '''
def scaled_dot_product_attention(q, k, v, attn_mask=None):
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if attn_mask is not None:
        no_key = ~attn_mask.any(dim=-1, keepdim=True)
        weights = weights.masked_fill(no_key, 0.0)
    return weights @ v, weights


attention = scaled_dot_product_attention
''' + CHAPTER_MODULE,
}
