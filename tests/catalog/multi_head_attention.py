"""Plausible mistakes in the multi-head attention exercise, each one a small edit of the solution."""

from support import bug

HEADS, MHA = "heads", "mha"

SPLIT = "x.view(B, L, n_head, D // n_head).transpose(1, 2)"
MERGE = "x.transpose(1, 2).reshape(B, L, H * d_head)"
FILL = 'scores = scores.masked_fill(~attn_mask, float("-inf"))'
ZERO_ROWS = "weights = weights.masked_fill(no_key, 0.0)"
SOFTMAX = "weights = torch.softmax(scores, dim=-1)"
RETURN = "return self.o(out), weights"

BUGS = [
    # splitting and merging heads
    bug("split_without_transpose", HEADS, (SPLIT, "x.view(B, L, n_head, D // n_head)"),
        "splits into (B, L, H, d_head) and never brings the heads forward: attention runs over the heads "
        "of one token", ["test_heads", "test_mha_shapes", "test_mha_reference"]),
    bug("split_wrong_axis", HEADS, (SPLIT, "x.view(B, n_head, L, D // n_head)"),
        "views the projection straight as (B, H, L, d_head): right shape, but positions mix tokens",
        ["test_heads", "test_mha_reference", "test_mha_masking", "test_mha_heads"]),
    bug("split_interleaved", HEADS, (SPLIT, "x.view(B, L, D // n_head, n_head).permute(0, 3, 1, 2)"),
        "gives head h the strided columns h, h + H, ... instead of a contiguous block",
        ["test_heads", "test_mha_reference", "test_mha_heads"]),
    bug("merge_view_not_contiguous", HEADS, (MERGE, "x.transpose(1, 2).view(B, L, H * d_head)"),
        "calls view on the transposed (non-contiguous) heads: raises",
        ["test_heads", "test_mha_shapes", "test_mha_reference"]),
    bug("merge_without_transpose", HEADS, (MERGE, "x.reshape(B, L, H * d_head)"),
        "reshapes (B, H, L, d_head) straight to (B, L, D): a token's row gets other tokens' results",
        ["test_heads", "test_mha_reference", "test_mha_masking", "test_mha_heads"]),
    # scores and softmax
    bug("scale_by_d_model", MHA, ("math.sqrt(self.d_head)", "math.sqrt(self.d_model)"),
        "divides the scores by sqrt(d_model) instead of sqrt(d_head)", ["test_mha_reference"]),
    bug("softmax_over_heads", MHA, (SOFTMAX, "weights = torch.softmax(scores, dim=1)"),
        "normalises over the heads instead of the keys", ["test_mha_shapes", "test_mha_reference"]),
    bug("softmax_over_queries", MHA, (SOFTMAX, "weights = torch.softmax(scores, dim=-2)"),
        "normalises over the queries instead of the keys", ["test_mha_shapes", "test_mha_reference"]),
    bug("detached_weights", MHA, (SOFTMAX, "weights = torch.softmax(scores, dim=-1).detach()"),
        "detaches the weights: q and k get no gradient", ["test_mha_reference"]),
    bug("float32_softmax", MHA, (SOFTMAX, "weights = torch.softmax(scores.float(), dim=-1)"),
        "computes the softmax in float32: float64 inputs now fail", ["test_mha_reference", "test_mha_hygiene"]),
    # masks
    bug("inverted_mask", MHA, ("scores.masked_fill(~attn_mask,", "scores.masked_fill(attn_mask,"),
        "uses nn.MultiheadAttention's convention (True = may not attend)",
        ["test_mha_reference", "test_mha_masking"]),
    bug("mask_only_square", MHA, (FILL, 'scores = scores.masked_fill(~attn_mask.view(-1, 1, L, L), float("-inf"))'),
        "reshapes the mask to (B, 1, L, L): works for (L, L) masks, fails for key padding (B, 1, 1, L)",
        ["test_mha_reference", "test_mha_masking"]),
    bug("nan_for_fully_masked_rows", MHA, (ZERO_ROWS, "pass"),
        "leaves NaN in the rows of queries whose keys are all masked", ["test_mha_masking"]),
    bug("finite_fill_no_zero_rows", MHA, [('float("-inf"))', "-1e9)"), (ZERO_ROWS, "pass")],
        "fills with -1e9: fully masked rows become uniform averages instead of zero", ["test_mha_masking"]),
    bug("empty_rows_without_keepdim", MHA,
        ("no_key = ~attn_mask.any(dim=-1, keepdim=True)", "no_key = ~attn_mask.any(dim=-1)"),
        "drops keepdim when finding the queries with no key: the flag broadcasts onto the wrong axes",
        ["test_mha_reference", "test_mha_masking"]),
    bug("inplace_fill_softmax_output", MHA, (ZERO_ROWS, "weights.masked_fill_(no_key, 0.0)"),
        "zeroes the empty rows of the softmax output in place: backward raises",
        ["test_mha_reference", "test_mha_masking"]),
    bug("mask_inverted_in_place", MHA,
        [(FILL, "blocked = attn_mask.logical_not_()\n"
                '            scores = scores.masked_fill(blocked, float("-inf"))'),
         ("no_key = ~attn_mask.any(dim=-1, keepdim=True)", "no_key = blocked.all(dim=-1, keepdim=True)")],
        "converts the caller's mask to 'blocked' in place: right result once, but the mask is destroyed",
        ["test_mha_hygiene"]),
    bug("cpu_zeros_for_empty_rows", MHA,
        (ZERO_ROWS, "weights = torch.where(no_key, torch.zeros(weights.shape, dtype=weights.dtype), weights)"),
        "builds the zeros on the CPU: fails for inputs on another device", ["test_mha_hygiene"]),
    # the module
    bug("no_value_error", MHA, ("raise ValueError(", "print("),
        "does not reject an n_head that does not divide d_model", ["test_mha_value_error"]),
    bug("assert_instead_of_value_error", MHA,
        ("if d_model % n_head != 0:\n            raise ValueError(f\"n_head={n_head} must divide d_model={d_model}\")",
         "assert d_model % n_head == 0, \"n_head must divide d_model\""),
        "uses assert (AssertionError, and skipped under python -O) instead of raising ValueError",
        ["test_mha_value_error"]),
    bug("weights_averaged_over_heads", MHA, (RETURN, "return self.o(out), weights.mean(dim=1)"),
        "returns the head-averaged weights (nn.MultiheadAttention's default) instead of one matrix per head",
        ["test_mha_shapes", "test_mha_heads"]),
    bug("no_output_projection", MHA, (RETURN, "return out, weights"),
        "never applies the output projection o", ["test_mha_reference"]),
    bug("no_query_bias", MHA, ("self.q = nn.Linear(d_model, d_model)", "self.q = nn.Linear(d_model, d_model, bias=False)"),
        "drops the query bias (nn.MultiheadAttention has one)", ["test_mha_reference"]),
]
