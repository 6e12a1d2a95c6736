"""Plausible mistakes in the cross-attention exercise, each one a small edit of the solution; correct
answers in other styles (controls); and the chapter's and the previous exercise's code as answers."""

from support import bug, control, solution_cells, chapter_code

CA = "cross_attention"
MASK_FILL = 'scores = scores.masked_fill(~attn_mask, float("-inf"))'
ZERO_ROWS = "weights = weights.masked_fill(no_key, 0.0)"
DIVIDES = ('if d_model % n_head != 0:\n            raise ValueError(f"n_head={n_head} does not divide '
           'd_model={d_model}")')
ONE_OF = ('if (context is None) == (kv is None):\n            raise ValueError("pass exactly one of context and kv")')
PICK_KV = "k, v = self.project_context(context) if kv is None else kv"
K_SPLIT = "k = self.k(context).view(B, S, self.n_head, self.d_head).transpose(1, 2)"
V_SPLIT = "v = self.v(context).view(B, S, self.n_head, self.d_head).transpose(1, 2)"
Q_SPLIT = "q = self.q(x).view(B, L, self.n_head, self.d_head).transpose(1, 2)"
SCALE = "/ math.sqrt(self.d_head)"
MERGE = "out = (weights @ v).transpose(1, 2).reshape(B, L, self.d_model)"
RETURN = "return self.o(out), weights"
SIGNATURE = "def forward(self, x, context=None, attn_mask=None, *, kv=None):"

BUGS = [
    # Who asks and who answers; the context's width
    bug("keys_values_from_x", CA, (PICK_KV, "k, v = self.project_context(x) if kv is None else kv"),
        "projects keys and values from x: self-attention, and x has not the context's width",
        ["test_shapes", "test_reference"], diagnosis="the keys and values from the context"),
    bug("queries_from_context", CA, (Q_SPLIT, "q = self.q(context).view(B, L, self.n_head, self.d_head).transpose(1, 2)"),
        "takes the queries from the context", ["test_shapes", "test_reference"],
        diagnosis="the queries come from x"),
    bug("d_context_ignored", CA,
        [("self.k = nn.Linear(d_context, d_model)", "self.k = nn.Linear(d_model, d_model)"),
         ("self.v = nn.Linear(d_context, d_model)", "self.v = nn.Linear(d_model, d_model)")],
        "keeps k and v at d_model -> d_model, as the chapter's module: a wider encoder does not fit",
        ["test_construction", "test_shapes", "test_reference"], diagnosis="d_context"),
    bug("keys_values_swapped", CA, ("return k, v\n", "return v, k\n"),
        "project_context returns (v, k): keys from the value projection and values from the key projection",
        ["test_reference", "test_project_context"], diagnosis="swapped"),
    bug("kv_unpacked_in_wrong_order", CA,
        (PICK_KV, "if kv is None:\n            k, v = self.project_context(context)\n        else:\n            v, k = kv"),
        "unpacks the precomputed pair as (v, k)", ["test_precomputed_kv"], diagnosis="swapped"),
    bug("kv_cached_on_the_module", CA,
        (PICK_KV, 'if kv is None:\n            if getattr(self, "_kv", None) is None:\n'
                  '                self._kv = self.project_context(context)\n            kv = self._kv\n'
                  '        k, v = kv'),
        "caches K/V on the module at the first call: later contexts reuse the first one's keys and values",
        ["test_shapes", "test_reference"], diagnosis="keeps state across calls"),
    bug("detached_kv", CA, (PICK_KV, "k, v = self.project_context(context) if kv is None else "
                                     "(kv[0].detach(), kv[1].detach())"),
        "detaches the precomputed pair ('computed once, so no gradient'): the encoder never learns through it",
        ["test_precomputed_kv"], diagnosis="cut out of the graph"),
    bug("project_context_under_no_grad", CA,
        (K_SPLIT + "\n        " + V_SPLIT,
         "with torch.no_grad():\n            " + K_SPLIT + "\n            " + V_SPLIT),
        "projects the context under torch.no_grad() since it is 'computed once for inference'",
        ["test_reference", "test_project_context", "test_precomputed_kv"], diagnosis="torch.no_grad()"),
    bug("detached_context", CA, (PICK_KV, "context = None if context is None else context.detach()\n        "
                                 + PICK_KV),
        "detaches the context: context.grad is None, the encoder would never learn",
        ["test_reference"], diagnosis="context.grad is None"),
    # The arguments
    bug("both_given_silently", CA, (ONE_OF, 'if context is None and kv is None:\n            raise ValueError("pass '
                                            'exactly one of context and kv")'),
        "accepts both context and kv and silently prefers one", ["test_arguments"],
        diagnosis="exactly one of context and kv"),
    bug("kv_before_mask", CA, (SIGNATURE, "def forward(self, x, context=None, kv=None, attn_mask=None):"),
        "puts kv third: forward(x, context, mask) passes the mask as kv", ["test_arguments"],
        diagnosis="the third positional argument"),
    bug("assert_instead_of_value_error", CA,
        (DIVIDES, 'assert d_model % n_head == 0, "n_head must divide d_model"'),
        "checks divisibility with assert, which raises AssertionError, not ValueError", ["test_construction"],
        diagnosis="an assert statement"),
    bug("no_divisibility_check", CA, (DIVIDES, "pass"),
        "accepts any n_head and silently drops features", ["test_construction"], diagnosis="cannot split"),
    # Masks
    bug("mask_on_query_axis", CA, (MASK_FILL, 'scores = scores.masked_fill(~attn_mask.transpose(-2, -1), float("-inf"))'),
        "applies the key padding mask over the queries (wrong axis)", ["test_padding", "test_all_padding"],
        diagnosis="the mask broadcast to (B, n_head, L, S)"),
    bug("inverted_mask", CA, (MASK_FILL, 'scores = scores.masked_fill(attn_mask, float("-inf"))'),
        "uses nn.MultiheadAttention's convention (True = ignore)", ["test_padding"], diagnosis="inverted"),
    bug("mask_ignored", CA, (MASK_FILL, "pass"),
        "accepts a mask but never applies it", ["test_padding"], diagnosis="the mask is ignored"),
    bug("mask_multiplies_scores", CA, (MASK_FILL, "scores = scores * attn_mask"),
        "multiplies the scores by the mask: masked keys get score 0, not -inf", ["test_padding"],
        diagnosis="multiplies the scores"),
    bug("nan_for_all_padding_source", CA, (ZERO_ROWS, "pass"),
        "leaves NaN for the queries of a source that is all padding", ["test_all_padding"],
        diagnosis="keys are all masked"),
    bug("finite_fill_uniform_rows", CA, [('float("-inf")', "-1e9"), (ZERO_ROWS, "pass")],
        "fills with -1e9: an all-padding source gets uniform weights instead of zeros", ["test_all_padding"],
        diagnosis="finite fill"),
    bug("empty_rows_on_wrong_axis", CA, ("attn_mask.any(dim=-1, keepdim=True)", "attn_mask.any(dim=-2, keepdim=True)"),
        "looks for queries without keys along the query axis: a fully masked query row stays NaN",
        ["test_all_padding"], diagnosis="keys are all masked"),
    bug("inplace_fill_softmax_output", CA, (ZERO_ROWS, "weights.masked_fill_(no_key, 0.0)"),
        "fills the softmax output in place: backward raises", ["test_padding", "test_all_padding"],
        diagnosis="modified in place"),
    bug("mutates_mask", CA,
        [(MASK_FILL, 'blocked = attn_mask.logical_not_()\n            scores = scores.masked_fill(blocked, float("-inf"))'),
         ("no_key = ~attn_mask.any(dim=-1, keepdim=True)", "no_key = blocked.all(dim=-1, keepdim=True)")],
        "inverts the caller's mask in place to get 'True = blocked'", ["test_padding", "test_hygiene"],
        diagnosis="attn_mask was modified in place"),
    # Scale, softmax and heads
    bug("scale_by_source_length", CA, (SCALE, "/ math.sqrt(k.shape[-2])"),
        "divides by sqrt(S), the number of keys, instead of sqrt(d_head)", ["test_reference"],
        diagnosis="the number of keys"),
    bug("scale_by_d_model", CA, (SCALE, "/ math.sqrt(self.d_model)"),
        "divides by sqrt(d_model) instead of sqrt(d_head)", ["test_reference"], diagnosis="uses d_model"),
    bug("softmax_over_queries", CA, ("torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=-2)"),
        "normalises over the target tokens instead of the source tokens", ["test_shapes", "test_reference"],
        diagnosis="wrong dimension"),
    bug("keys_not_transposed", CA, (K_SPLIT, "k = self.k(context).view(B, self.n_head, S, self.d_head)"),
        "splits the keys with a view to (B, H, S, d_head) without the transpose: heads mix positions",
        ["test_reference", "test_project_context"], diagnosis="keys were split into heads without the transpose"),
    bug("values_not_transposed", CA, (V_SPLIT, "v = self.v(context).view(B, self.n_head, S, self.d_head)"),
        "splits the values without the transpose: the weights are right, the output is not",
        ["test_reference", "test_project_context"], diagnosis="values were split into heads without the transpose"),
    bug("queries_not_transposed", CA, (Q_SPLIT, "q = self.q(x).view(B, self.n_head, L, self.d_head)"),
        "splits the queries without the transpose", ["test_reference"],
        diagnosis="queries were split into heads without the transpose"),
    bug("heads_merged_without_transpose", CA, (MERGE, "out = (weights @ v).reshape(B, L, self.d_model)"),
        "merges the heads back without transposing: features of different positions get mixed",
        ["test_reference"], diagnosis="merged back without the transpose"),
    bug("averaged_weights", CA, (RETURN, "return self.o(out), weights.mean(1)"),
        "returns the weights averaged over heads, (B, L, S), as nn.MultiheadAttention does by default",
        ["test_shapes"], diagnosis="not averaged"),
    bug("output_projection_skipped", CA, (RETURN, "return out, weights"),
        "never applies the output projection o", ["test_reference"], diagnosis="output projection o is not applied"),
    # dtype, device
    bug("float32_softmax", CA, ("torch.softmax(scores, dim=-1)", "torch.softmax(scores.float(), dim=-1)"),
        "computes the softmax in float32: float64 in no longer gives float64 out", ["test_reference", "test_hygiene"],
        diagnosis="float32 and float64"),
    bug("cpu_constant", CA, (MASK_FILL, 'scores = torch.where(attn_mask, scores, '
                                        'torch.full(scores.shape, float("-inf"), dtype=scores.dtype))'),
        "builds the fill tensor on the CPU: fails for inputs on another device", ["test_hygiene"],
        diagnosis="device=x.device"),
]

_LOOP_FORWARD = '''        B, L, _ = x.shape
        outs, ws = [], []
        for h in range(self.n_head):                      # one head at a time
            cols = slice(h * self.d_head, (h + 1) * self.d_head)
            q_h = F.linear(x, self.q.weight[cols], None if self.q.bias is None else self.q.bias[cols])
            s = q_h[:, None] @ k[:, h:h + 1].transpose(-2, -1) / math.sqrt(self.d_head)   # (B, 1, L, S)
            if attn_mask is not None:
                m = torch.broadcast_to(attn_mask, (B, self.n_head) + s.shape[-2:])[:, h:h + 1]
                s = s.masked_fill(~m, float("-inf"))
                w = torch.softmax(s, dim=-1).masked_fill(~m.any(-1, keepdim=True), 0.0)
            else:
                w = torch.softmax(s, dim=-1)
            ws.append(w)
            outs.append((w @ v[:, h:h + 1])[:, 0])
        return self.o(torch.cat(outs, dim=-1)), torch.cat(ws, dim=1)'''

_SOLUTION = solution_cells(CA)[CA]
_BODY = _SOLUTION[_SOLUTION.index("B, L, _ = x.shape"):_SOLUTION.index(RETURN) + len(RETURN)]   # forward after kv

CONTROLS = [
    control("einsum", CA,
            [("scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)",
              'scores = torch.einsum("bhld,bhsd->bhls", q, k) / math.sqrt(self.d_head)'),
             (MERGE, 'out = torch.einsum("bhls,bhsd->blhd", weights, v).reshape(B, L, self.d_model)')],
            "scores and weighted sum with einsum"),
    control("loop_over_heads", CA, (_BODY, _LOOP_FORWARD.lstrip()),
            "one head at a time, slicing q's rows, concatenating the heads' results"),
    control("bias_free", CA,
            [("self.q = nn.Linear(d_model, d_model)", "self.q = nn.Linear(d_model, d_model, bias=False)"),
             ("self.k = nn.Linear(d_context, d_model)", "self.k = nn.Linear(d_context, d_model, bias=False)"),
             ("self.v = nn.Linear(d_context, d_model)", "self.v = nn.Linear(d_context, d_model, bias=False)"),
             ("self.o = nn.Linear(d_model, d_model)", "self.o = nn.Linear(d_model, d_model, bias=False)")],
            "layers without biases, which the release allows"),
    control("sdpa_output_weights_separately", CA,
            (MERGE, "attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)   # zero for empty rows\n"
                    "        out = attn.transpose(1, 2).reshape(B, L, self.d_model)"),
            "the attention result from F.scaled_dot_product_attention, the weights computed separately"),
    control("library_split_merge_reshape", CA,
            [(K_SPLIT, "k = handson.nn.split_heads(self.k(context), self.n_head)"),
             (V_SPLIT, "v = self.v(context).reshape(B, S, self.n_head, self.d_head).transpose(1, 2)"),
             (Q_SPLIT, "q = self.q(x).unflatten(-1, (self.n_head, -1)).permute(0, 2, 1, 3)"),
             (MERGE, "out = handson.nn.merge_heads(weights @ v)")],
            "the library's split_heads/merge_heads, reshape and unflatten/permute instead of view/transpose"),
    control("contiguous_view_merge", CA,
            (MERGE, "out = (weights @ v).transpose(1, 2).contiguous().view(B, L, self.d_model)"),
            "contiguous().view(...) instead of reshape"),
    control("where_finfo_min", CA,
            (MASK_FILL, "scores = torch.where(attn_mask, scores, torch.finfo(scores.dtype).min)"),
            "torch.where with finfo.min: exact zeros for blocked keys, empty rows zeroed after the softmax"),
    control("nan_to_num_rows", CA,
            [("        if attn_mask is not None:\n            # A query with no allowed key (a source that is all "
              "padding): zeros, not NaN.\n            no_key = ~attn_mask.any(dim=-1, keepdim=True)\n            "
              + ZERO_ROWS, "        weights = torch.nan_to_num(weights, nan=0.0)")],
            "NaN rows of the softmax turned into zeros with nan_to_num"),
    control("kv_branch_and_or_default", CA,
            [("d_context = d_model if d_context is None else d_context", "d_context = d_context or d_model"),
             (ONE_OF, 'if context is not None and kv is not None:\n            raise ValueError("context or kv, '
                      'not both")\n        if context is None and kv is None:\n            raise ValueError("context or kv")'),
             (PICK_KV, "if kv is None:\n            kv = self.project_context(context)\n        k, v = kv")],
            "d_context defaulted with `or`, two separate ValueErrors, an explicit branch for kv"),
]

CHAPTER_AS_ANSWER = {CA: "from handson.nn.multi_head_attention import attention\n\n\n" + chapter_code(
    "cross_attention", "CrossAttention", edits=[
        ("    def __init__(self, d_model):\n        super().__init__()\n",
         "    def __init__(self, d_model, n_head, d_context=None):\n        super().__init__()\n"
         "        d_context = d_model if d_context is None else d_context    # the chapter's \"the fix would be\"\n"),
        ("self.k = nn.Linear(d_model, d_model)", "self.k = nn.Linear(d_context, d_model)"),
        ("self.v = nn.Linear(d_model, d_model)", "self.v = nn.Linear(d_context, d_model)"),
        ("    def forward(self, x, context, attn_mask=None):",
         "    def project_context(self, context):  # the chapter's \"K and V once\" cell\n"
         "        return self.k(context).unsqueeze(1), self.v(context).unsqueeze(1)\n\n"
         "    def forward(self, x, context=None, attn_mask=None, *, kv=None):"),
        ("        k = self.k(context).unsqueeze(1)        # (B, 1, S, d_model)\n"
         "        v = self.v(context).unsqueeze(1)        # (B, 1, S, d_model)\n",
         "        k, v = self.project_context(context) if kv is None else kv\n"),
    ])}

# The multi-head attention exercise's solution (HEAD when this catalog was written), taking a context.
PREVIOUS_AS_ANSWER = {CA: '''def split_heads(x, n_head):
    """(B, L, D) -> (B, n_head, L, D // n_head); head h gets columns h*d_head ... (h+1)*d_head - 1."""
    B, L, D = x.shape
    return x.view(B, L, n_head, D // n_head).transpose(1, 2)


def merge_heads(x):
    """(B, n_head, L, d_head) -> (B, L, n_head * d_head): the inverse of split_heads."""
    B, H, L, d_head = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d_head)


class CrossAttention(nn.Module):
    """Multi-head self-attention with nn.Linear layers q, k, v, o (each d_model -> d_model)."""

    def __init__(self, d_model, n_head, d_context=None):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"n_head={n_head} must divide d_model={d_model}")
        self.d_model = d_model
        self.n_head = n_head
        self.d_head = d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x, context=None, attn_mask=None, *, kv=None):
        B, L, _ = x.shape
        q = split_heads(self.q(x), self.n_head)                       # (B, H, L, d_head)
        k = split_heads(self.k(context), self.n_head)
        v = split_heads(self.v(context), self.n_head)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))   # (B, H, L, S)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if attn_mask is not None:
            # A query with no allowed key gets a softmax of all -inf (NaN): it attends to nothing.
            no_key = ~attn_mask.any(dim=-1, keepdim=True)
            weights = weights.masked_fill(no_key, 0.0)
        out = merge_heads(weights @ v)                                 # (B, L, d_model)
        return self.o(out), weights
'''}
