"""Plausible mistakes in the cross-attention exercise, each one a small edit of the solution."""

from support import bug

CA = "cross_attention"
MASK_FILL = 'scores = scores.masked_fill(~attn_mask, float("-inf"))'
ZERO_ROWS = "weights = weights.masked_fill(no_key, 0.0)"

BUGS = [
    # Who asks and who answers
    bug("keys_values_from_x", CA,
        [("k = split(self.k(context))", "k = split(self.k(x))"), ("v = split(self.v(context))", "v = split(self.v(x))")],
        "takes keys and values from x: self-attention, weights (B, H, L, L)", ["test_shapes", "test_reference"]),
    bug("queries_from_context", CA, ("q = split(self.q(x))", "q = split(self.q(context))"),
        "takes the queries from the context: one output row per source token", ["test_shapes", "test_reference"]),
    bug("values_from_x", CA, ("v = split(self.v(context))", "v = split(self.v(x))"),
        "takes the values from x: weights (L x S) cannot multiply L values", ["test_shapes", "test_reference"]),
    bug("keys_values_swapped", CA,
        [("k = split(self.k(context))", "k = split(self.v(context))"), ("v = split(self.v(context))", "v = split(self.k(context))")],
        "uses the value projection for the keys and the key projection for the values", ["test_reference"]),
    # Masks
    bug("mask_on_query_axis", CA, (MASK_FILL, 'scores = scores.masked_fill(~attn_mask.transpose(-2, -1), float("-inf"))'),
        "applies the key padding mask over the queries (wrong axis)", ["test_padding", "test_all_padding"]),
    bug("inverted_mask", CA, (MASK_FILL, 'scores = scores.masked_fill(attn_mask, float("-inf"))'),
        "uses nn.MultiheadAttention's convention (True = ignore)", ["test_padding", "test_reference"]),
    bug("mask_ignored", CA, (MASK_FILL, "pass"),
        "accepts a mask but never applies it", ["test_padding", "test_reference"]),
    bug("mask_multiplies_scores", CA, (MASK_FILL, "scores = scores * attn_mask"),
        "multiplies the scores by the mask: masked keys get score 0, not -inf", ["test_padding"]),
    bug("nan_for_all_padding_source", CA, (ZERO_ROWS, "pass"),
        "leaves NaN for the queries of a source that is all padding", ["test_all_padding"]),
    bug("finite_fill_uniform_rows", CA, [('float("-inf")', "-1e9"), (ZERO_ROWS, "pass")],
        "fills with -1e9: an all-padding source gets uniform weights instead of zeros", ["test_all_padding"]),
    bug("empty_rows_on_wrong_axis", CA, ("attn_mask.any(dim=-1, keepdim=True)", "attn_mask.any(dim=-2, keepdim=True)"),
        "looks for queries without keys along the query axis: a fully masked query row stays NaN",
        ["test_all_padding"]),
    bug("inplace_fill_softmax_output", CA, (ZERO_ROWS, "weights.masked_fill_(no_key, 0.0)"),
        "fills the softmax output in place: backward raises", ["test_all_padding"]),
    bug("mutates_mask", CA,
        [(MASK_FILL, 'blocked = attn_mask.logical_not_()\n            scores = scores.masked_fill(blocked, float("-inf"))'),
         ("no_key = ~attn_mask.any(dim=-1, keepdim=True)", "no_key = blocked.all(dim=-1, keepdim=True)")],
        "inverts the caller's mask in place to get 'True = blocked'", ["test_hygiene"]),
    # Scale, softmax and heads
    bug("scale_by_source_length", CA, ("/ math.sqrt(d_head)", "/ math.sqrt(k.shape[-2])"),
        "divides by sqrt(S), the number of keys, instead of sqrt(d_head)", ["test_reference"]),
    bug("scale_by_d_model", CA, ("/ math.sqrt(d_head)", "/ math.sqrt(self.d_model)"),
        "divides by sqrt(d_model) instead of sqrt(d_head)", ["test_reference"]),
    bug("softmax_over_queries", CA, ("torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=-2)"),
        "normalises over the target tokens instead of the source tokens", ["test_shapes", "test_reference"]),
    bug("heads_not_transposed", CA, ("t.view(t.shape[0], t.shape[1], H, d_head).transpose(1, 2)",
                                     "t.view(t.shape[0], H, t.shape[1], d_head)"),
        "splits heads with a view to (B, H, N, d_head) without the transpose: heads mix positions",
        ["test_reference"]),
    bug("heads_merged_without_transpose", CA, ("(weights @ v).transpose(1, 2).reshape(", "(weights @ v).reshape("),
        "merges the heads back without transposing: features of different positions get mixed",
        ["test_reference"]),
    bug("averaged_weights", CA, ("return self.o(out), weights", "return self.o(out), weights.mean(1)"),
        "returns the weights averaged over heads, (B, L, S), as nn.MultiheadAttention does by default",
        ["test_shapes"]),
    bug("output_projection_skipped", CA, ("return self.o(out), weights", "return out, weights"),
        "never applies the output projection o", ["test_reference"]),
    # Construction
    bug("assert_instead_of_value_error", CA,
        ("if d_model % n_head != 0:\n            raise ValueError(f\"n_head={n_head} does not divide d_model={d_model}\")",
         "assert d_model % n_head == 0, \"n_head must divide d_model\""),
        "checks divisibility with assert, which raises AssertionError, not ValueError", ["test_construction"]),
    bug("no_divisibility_check", CA,
        ("if d_model % n_head != 0:\n            raise ValueError(f\"n_head={n_head} does not divide d_model={d_model}\")", "pass"),
        "accepts any n_head and silently drops features", ["test_construction"]),
    # Autograd, dtype, device
    bug("detached_context", CA, ("B, L, _ = x.shape", "B, L, _ = x.shape\n        context = context.detach()"),
        "detaches the context: context.grad is None, the encoder would never learn", ["test_reference"]),
    bug("float32_softmax", CA, ("torch.softmax(scores, dim=-1)", "torch.softmax(scores.float(), dim=-1)"),
        "computes the softmax in float32: float64 in no longer gives float64 out",
        ["test_reference", "test_hygiene"]),
    bug("cpu_constant", CA, (MASK_FILL, 'scores = torch.where(attn_mask, scores, '
                                        'torch.full(scores.shape, float("-inf"), dtype=scores.dtype))'),
        "builds the fill tensor on the CPU: fails for inputs on another device", ["test_hygiene"]),
]
