"""Plausible mistakes in the grouped-query / multi-query attention exercise, each a small edit of the solution."""

from support import bug

REP, GQA, MQA = "repeat_kv", "gqa", "mqa"

BUGS = [
    # -- which key/value head each query head uses
    bug("repeat_tiles", REP, ("x.repeat_interleave(n_rep, dim=1)", "x.repeat(1, n_rep, 1, 1)"),
        "uses Tensor.repeat, which tiles the heads: query head h gets key/value head h % n_kv_head",
        ["test_repeat_kv", "test_gqa_reference"]),
    bug("modulo_grouping", REP, ("x.repeat_interleave(n_rep, dim=1)",
                                 "x[:, torch.arange(x.size(1) * n_rep, device=x.device) % x.size(1)]"),
        "indexes the key/value heads with h % n_kv_head instead of h // n_rep",
        ["test_repeat_kv", "test_gqa_reference"]),
    bug("expand_before_head_axis", REP, ("x.repeat_interleave(n_rep, dim=1)",
                                         "x[:, None].expand(x.size(0), n_rep, *x.shape[1:])"
                                         ".reshape(x.size(0), -1, *x.shape[2:])"),
        "expands a new axis *before* the key/value-head axis: the reshape tiles the heads",
        ["test_repeat_kv", "test_gqa_reference"]),
    # -- shapes of the projections
    bug("kv_projected_to_d_model", GQA,
        [("self.k = nn.Linear(d_model, n_kv_head * self.head_dim)", "self.k = nn.Linear(d_model, d_model)"),
         ("self.v = nn.Linear(d_model, n_kv_head * self.head_dim)", "self.v = nn.Linear(d_model, d_model)"),
         ("k = self.k(x).view(B, L, self.n_kv_head, self.head_dim)", "k = self.k(x).view(B, L, self.n_head, self.head_dim)"),
         ("v = self.v(x).view(B, L, self.n_kv_head, self.head_dim)", "v = self.v(x).view(B, L, self.n_head, self.head_dim)"),
         ("k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)", "pass")],
        "projects keys and values to d_model (one head per query head): multi-head attention, no memory saved",
        ["test_gqa_shapes", "test_mqa"]),
    bug("head_dim_from_n_kv_head", GQA, ("self.head_dim = d_model // n_head", "self.head_dim = d_model // n_kv_head"),
        "computes the head size from the number of key/value heads", ["test_gqa_shapes", "test_gqa_reference"]),
    # -- masks
    bug("causal_ignored", GQA, ("        if self.causal:\n            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()\n"
                                "            mask = causal if mask is None else mask & causal\n", ""),
        "never applies the causal mask: future tokens leak", ["test_gqa_masking", "test_gqa_reference"]),
    bug("causal_always_on", GQA, ("if self.causal:", "if True:"),
        "applies the causal mask even with causal=False", ["test_gqa_masking", "test_gqa_reference"]),
    bug("padding_mask_ignored", GQA, ("mask = attn_mask\n", "mask = None\n"),
        "accepts attn_mask but never applies it", ["test_gqa_masking", "test_gqa_reference"]),
    bug("padding_mask_inverted", GQA, ("mask = attn_mask\n", "mask = None if attn_mask is None else ~attn_mask\n"),
        "uses nn.MultiheadAttention's convention for attn_mask (True = blocked)",
        ["test_gqa_masking", "test_gqa_reference"]),
    bug("masks_combined_with_or", GQA, ("mask & causal", "mask | causal"),
        "combines attn_mask and the causal mask with OR: padding or future keys get through",
        ["test_gqa_masking", "test_gqa_reference"]),
    bug("nan_for_fully_masked_rows", GQA,
        ("weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)", "pass"),
        "leaves NaN in the rows of queries that may attend no key", ["test_gqa_masking", "test_gqa_reference"]),
    bug("inplace_fill_softmax_output", GQA,
        ("weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)",
         "weights.masked_fill_(~mask.any(dim=-1, keepdim=True), 0.0)"),
        "zeroes the empty rows of the softmax output in place: backward raises", ["test_gqa_masking"]),
    bug("mask_combined_in_place", GQA, ("mask = causal if mask is None else mask & causal",
                                        "if mask is None:\n                mask = causal\n"
                                        "            else:\n                mask &= causal"),
        "combines the masks with &=, writing into the caller's attn_mask", ["test_gqa_hygiene"]),
    bug("cpu_causal_mask", GQA, ("torch.ones(L, L, dtype=torch.bool, device=x.device)", "torch.ones(L, L, dtype=torch.bool)"),
        "builds the causal mask on the CPU: fails for inputs on another device", ["test_gqa_hygiene"]),
    # -- arithmetic and autograd
    bug("scale_by_d_model", GQA, ("1.0 / math.sqrt(self.head_dim)", "1.0 / math.sqrt(x.size(-1))"),
        "divides the scores by sqrt(d_model) instead of sqrt(head_dim)", ["test_gqa_reference"]),
    bug("heads_merged_without_transpose", GQA,
        ("(weights @ v).transpose(1, 2).reshape(B, L, self.n_head * self.head_dim)",
         "(weights @ v).reshape(B, L, self.n_head * self.head_dim)"),
        "merges the heads without moving the head axis back: heads and positions are scrambled",
        ["test_gqa_reference"]),
    bug("detached_keys", GQA, ("k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)",
                               "k, v = repeat_kv(k, n_rep).detach(), repeat_kv(v, n_rep)"),
        "detaches the repeated keys: k gets no gradient", ["test_gqa_reference"]),
    bug("float32_softmax", GQA, ("torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)"),
        "computes the softmax in float32 and casts back: float64 inputs lose their precision",
        ["test_gqa_reference"]),
    # -- validation and the MQA subclass
    bug("no_validation", GQA, [("raise ValueError(f\"n_head={n_head}", "print(f\"n_head={n_head}"),
                               ("raise ValueError(f\"n_kv_head={n_kv_head}", "print(f\"n_kv_head={n_kv_head}")],
        "never raises ValueError for impossible head counts", ["test_gqa_validation"]),
    bug("no_check_of_n_kv_head_sign", GQA, ("if n_kv_head < 1 or n_head % n_kv_head != 0:", "if n_head % n_kv_head != 0:"),
        "checks divisibility only: a negative n_kv_head such as -2 divides 4 in Python", ["test_gqa_validation"]),
    bug("mqa_with_n_head_kv_heads", MQA, ("n_kv_head=1", "n_kv_head=n_head"),
        "MultiQueryAttention builds as many key/value heads as query heads (plain MHA)", ["test_mqa"]),
    bug("mqa_drops_causal", MQA, ("n_kv_head=1, causal=causal", "n_kv_head=1"),
        "MultiQueryAttention ignores its causal argument", ["test_mqa"]),
]
