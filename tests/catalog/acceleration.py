"""Plausible mistakes in the acceleration exercise (the pitfalls of tiled attention kernels first),
each one a small edit of the solution; correct answers in other styles (controls); and the chapter's
own code as the answer."""

from support import bug, chapter_code, control

OS, TA, MG, TS, SW = "online_softmax", "tiled_attention", "merge_attention", "tile_schedule", "sliding_window_attention"
GUARD = 'm_safe = torch.where(m_new == float("-inf"), 0.0, m_new)'
O_UPDATE = "o = alpha[..., None] * o + p @ v[..., j0:j1, :]"
L_UPDATE = "l = alpha * l + p.sum(dim=-1)"
LSE = 'lses.append(torch.where(has_key, m + torch.log(l_safe), float("-inf")))'
ROWS = "rows = torch.arange(i0, i1, device=q.device)[:, None] + offset"
COLS = "cols = torch.arange(j0, j1, device=q.device)[None, :]"
TA_MASK = 's = s.masked_fill(cols > rows, float("-inf"))'
SW_MASK = 's = s.masked_fill((cols > rows) | (cols <= rows - window), float("-inf"))'
SW_LOOP = "for j0 in range((first_key // block_k) * block_k, last_key + 1, block_k):"
MG_OUT = "out = (w1[..., None] * out1 + w2[..., None] * out2) / total_safe[..., None]"
MG_LSE = 'lse = torch.where(has_key, m_safe + torch.log(total_safe), float("-inf"))'

BUGS = [
    # --- online_softmax ----------------------------------------------------------------------------
    bug("os_no_inf_guard", OS, ('m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)   # a row with only -inf so far',
                                "m_safe = m_new"),
        "no guard for a running maximum that is still -inf: a block of -inf gives exp(-inf - (-inf)) = NaN",
        ["test_online_softmax"], diagnosis="exp(-inf - (-inf))"),
    bug("os_sum_not_rescaled", OS, ("l = l * torch.exp(m - m_safe) + ", "l = l + "),
        "adds each block's exponentials without rescaling the old sum when the maximum grows",
        ["test_online_softmax"], diagnosis="rescaled by exp(m_old - m_new)"),
    bug("os_two_pass_global_max", OS, ("m_new = torch.maximum(m, block.amax(dim=-1))",
                                       "m_new = torch.maximum(m, x.amax(dim=-1))"),
        "takes the maximum of the whole row first: the two-pass safe softmax, not an online one",
        ["test_online_softmax"], diagnosis="reduced a whole row"),
    bug("os_no_max_overflow", OS, ("m_new = torch.maximum(m, block.amax(dim=-1))", "m_new = torch.zeros_like(m)"),
        "never subtracts a maximum: exp overflows for large scores", ["test_online_softmax"], diagnosis="overflows"),
    bug("os_last_block_dropped", OS, ("for j0 in range(0, x.size(-1), block_size):",
                                      "for j0 in range(0, x.size(-1) - block_size + 1, block_size):"),
        "drops the last, partial block from the running sum", ["test_online_softmax"], diagnosis="do not sum to 1"),
    bug("os_torch_softmax", OS, ("    m = torch.full(x.shape[:-1]", "    return torch.softmax(x, dim=-1)\n    m = torch.full(x.shape[:-1]"),
        "delegates to torch.softmax", ["test_online_softmax"], diagnosis="asks you to write yourself"),
    bug("os_tensor_softmax_method", OS, ("    m = torch.full(x.shape[:-1]", "    return x.softmax(-1)\n    m = torch.full(x.shape[:-1]"),
        "delegates to Tensor.softmax (a method: read from the code, or seen as aten._softmax while it runs)",
        ["test_online_softmax"], diagnosis="asks you to write yourself"),
    # --- tiled_attention ----------------------------------------------------------------------------
    bug("ta_output_not_rescaled", TA, (O_UPDATE, "o = o + p @ v[..., j0:j1, :]"),
        "the classic: O is not rescaled by exp(m - m_new) when the running maximum changes",
        ["test_tiled_values", "test_tiled_grads"], diagnosis="output accumulated so far is not rescaled"),
    bug("ta_sum_not_rescaled", TA, (L_UPDATE, "l = l + p.sum(dim=-1)"),
        "the running sum l is not rescaled when the maximum changes", ["test_tiled_values"],
        diagnosis="running sum l is not rescaled"),
    bug("ta_divide_per_block", TA, [(O_UPDATE, "o = alpha[..., None] * o + (p / p.sum(dim=-1, keepdim=True)) @ v[..., j0:j1, :]"),
                                    ("outs.append(o / l_safe[..., None])", "outs.append(o)")],
        "normalises every block on its own instead of dividing by l once at the end", ["test_tiled_values"],
        diagnosis="divided per block"),
    bug("ta_no_inf_guard", TA, (GUARD, "m_safe = m_new"),
        "-inf - (-inf) = NaN for a query with no key in a tile (here: queries with no key at all)",
        ["test_tiled_empty_rows"], diagnosis="exp(-inf - (-inf))"),
    bug("ta_local_tile_indices", TA, [(ROWS, "rows = torch.arange(0, i1 - i0, device=q.device)[:, None]"),
                                      (COLS, "cols = torch.arange(0, j1 - j0, device=q.device)[None, :]")],
        "masks each tile with indices local to the tile instead of global positions",
        ["test_tiled_values", "test_tiled_grads"], diagnosis="indices local to the tile"),
    bug("ta_top_left_causal", TA, (ROWS, "rows = torch.arange(i0, i1, device=q.device)[:, None]"),
        "aligns the causal mask top-left (like is_causal=True) when L != S", ["test_tiled_values"],
        diagnosis="top-left"),
    bug("ta_causal_ignored", TA, [("if causal and j0 > i1 - 1 + offset:", "if False:"),
                                  ("            if causal:\n", "            if False:\n")],
        "ignores causal=True", ["test_tiled_values", "test_tiled_grads"], diagnosis="causal mask is missing"),
    bug("ta_scale_twice", TA, ("s = q_tile @ k[..., j0:j1, :].transpose(-2, -1)",
                               "s = (q_tile @ k[..., j0:j1, :].transpose(-2, -1)) * scale"),
        "scales the queries and the scores: scale applied twice", ["test_tiled_values"], diagnosis="applied twice"),
    bug("ta_no_scale", TA, ("q_tile = q[..., i0:i1, :] * scale", "q_tile = q[..., i0:i1, :]"),
        "never applies the scale", ["test_tiled_values"], diagnosis="scale is missing"),
    bug("ta_scale_argument_ignored", TA, ("scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale",
                                          "scale = 1.0 / math.sqrt(q.size(-1))"),
        "ignores a given scale", ["test_tiled_values"], diagnosis="scale argument is ignored"),
    bug("ta_last_key_block_dropped", TA, ("for j0 in range(0, S, block_k):", "for j0 in range(0, S - block_k + 1, block_k):"),
        "drops the last, partial block of keys (S not a multiple of block_k)", ["test_tiled_values"],
        diagnosis="partial block of keys is dropped"),
    bug("ta_last_query_block_dropped", TA, ("for i0 in range(0, L, block_q):", "for i0 in range(0, L - block_q + 1, block_q):"),
        "drops the last, partial block of queries", ["test_tiled_values"], diagnosis="partial block of queries"),
    bug("ta_lse_without_max", TA, (LSE, 'lses.append(torch.where(has_key, torch.log(l_safe), float("-inf")))'),
        "returns log(l) as the log-sum-exp, forgetting that l is relative to the running maximum",
        ["test_tiled_values"], diagnosis="without the running maximum"),
    bug("ta_lse_log_of_zero", TA, (LSE, "lses.append(m + torch.log(l))"),
        "log(0) for a query without keys: the value is -inf as wanted but its backward is inf * 0 = NaN",
        ["test_tiled_empty_rows"], diagnosis="backward produced NaN"),
    bug("ta_finite_fill", TA, (TA_MASK, "s = s.masked_fill(cols > rows, torch.finfo(s.dtype).min)"),
        "fills masked scores with finfo.min: a query with no key averages the values instead of giving 0",
        ["test_tiled_empty_rows"], diagnosis="non-zero output"),
    bug("ta_full_causal_mask", TA, [("    outs, lses = [], []\n    for i0",
                                     "    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(offset)\n"
                                     "    outs, lses = [], []\n    for i0"),
                                    (TA_MASK, 's = s.masked_fill(~allowed[i0:i1, j0:j1], float("-inf"))')],
        "builds the whole (L, S) causal mask once and slices it: the memory the tiles were meant to save",
        ["test_tiled_memory"], diagnosis="whole (L, S) scores, weights or mask"),
    bug("ta_weights_detached", TA, ("p = torch.exp(s - m_safe[..., None])", "p = torch.exp(s - m_safe[..., None]).detach()"),
        "detaches the tile's weights: the forward is right, the gradients are not", ["test_tiled_grads"],
        diagnosis="gradient of tiled_attention with respect to"),
    bug("ta_tile_softmax", TA, [("p = torch.exp(s - m_safe[..., None])", "p = torch.softmax(s, dim=-1) * torch.exp(s - m_safe[..., None]).sum(-1, keepdim=True)")],
        "uses torch.softmax on each tile (forbidden)", ["test_tiled_values"], diagnosis="asks you to write yourself"),
    # --- merge_attention ----------------------------------------------------------------------------
    bug("mg_average", MG, (MG_OUT, "out = (out1 + out2) / 2"),
        "averages the two partial outputs", ["test_merge_values"], diagnosis="averages the two outputs"),
    bug("mg_no_max_overflow", MG, ("m = torch.maximum(lse1, lse2)", "m = torch.zeros_like(lse1)"),
        "weights the parts by exp(lse) without subtracting the maximum: overflow beyond ~709",
        ["test_merge_values"], diagnosis="overflows"),
    bug("mg_lse_is_max", MG, (MG_LSE, "lse = m"),
        "returns the larger log-sum-exp as the merged one", ["test_merge_values"], diagnosis="max(lse1, lse2)"),
    bug("mg_lse_added", MG, (MG_LSE, "lse = lse1 + lse2"),
        "adds the log-sum-exps", ["test_merge_values"], diagnosis="lse1 + lse2"),
    bug("mg_weights_swapped", MG, ("w1, w2 = torch.exp(lse1 - m_safe), torch.exp(lse2 - m_safe)",
                                   "w2, w1 = torch.exp(lse1 - m_safe), torch.exp(lse2 - m_safe)"),
        "weights each output by the other part's share", ["test_merge_values"], diagnosis="swaps the weights"),
    bug("mg_no_inf_guard", MG, ('m_safe = torch.where(m == float("-inf"), 0.0, m)          # both parts empty',
                                "m_safe = m"),
        "both parts empty: exp(-inf - (-inf)) = NaN", ["test_merge_empty"], diagnosis="returns NaN where a part is empty"),
    bug("mg_max_detached", MG, ("m = torch.maximum(lse1, lse2)", "m = torch.maximum(lse1, lse2)\n    lse1, lse2 = lse1.detach(), lse2.detach()"),
        "detaches the log-sum-exps: the merge is right, its gradients with respect to lse1 and lse2 are not",
        ["test_merge_grads"], diagnosis="gradient of merge_attention"),
    # --- tile_schedule ------------------------------------------------------------------------------
    bug("ts_top_left", TS, ("offset = n_keys - n_queries", "offset = 0"),
        "aligns the diagonal top-left", ["test_tile_schedule"], diagnosis="top-left"),
    bug("ts_window_ignored", TS, ("    if window is not None:\n", "    if False:\n"),
        "ignores the window: the plain causal schedule", ["test_tile_schedule"], diagnosis="window is ignored"),
    bug("ts_window_plus_one", TS, ("k_last[None, :] > q_first[:, None] - window", "k_last[None, :] >= q_first[:, None] - window"),
        "a window of window + 1 keys", ["test_tile_schedule"], diagnosis="off by one"),
    bug("ts_floor_block_count", TS, ("n_qb, n_kb = -(-n_queries // block_q), -(-n_keys // block_k)",
                                     "n_qb, n_kb = n_queries // block_q, n_keys // block_k"),
        "counts only the full blocks (floor instead of ceil)", ["test_tile_schedule"], diagnosis="ceil"),
    # --- sliding_window_attention --------------------------------------------------------------------
    bug("sw_window_plus_one", SW, (SW_MASK, 's = s.masked_fill((cols > rows) | (cols < rows - window), float("-inf"))'),
        "lets a query see window + 1 keys", ["test_window_values"], diagnosis="window + 1 keys"),
    bug("sw_only_tiles_skipped", SW, (SW_MASK, 's = s.masked_fill(cols > rows, float("-inf"))'),
        "skips the tiles outside the window but does not mask the older keys inside a computed tile",
        ["test_window_values"], diagnosis="inside a computed tile"),
    bug("sw_no_inf_guard", SW, (GUARD, "m_safe = m_new"),
        "a tile before the window for some queries of the block: exp(-inf - (-inf)) = NaN",
        ["test_window_values"], diagnosis="exp(-inf - (-inf))"),
    bug("sw_top_left", SW, ("    offset = S - L\n", "    offset = 0\n"),
        "aligns the window top-left when L != S", ["test_window_values"], diagnosis="top-left"),
    bug("sw_every_tile", SW, (SW_LOOP, "for j0 in range(0, S, block_k):"),
        "computes every tile and relies on the mask: right values, none of the saving",
        ["test_window_tiles"], diagnosis="computes every tile"),
    bug("sw_causal_tiles_only", SW, (SW_LOOP, "for j0 in range(0, last_key + 1, block_k):"),
        "skips only the tiles after the diagonal, as plain causal attention", ["test_window_tiles"],
        diagnosis="tiles of plain causal attention"),
    bug("sw_output_not_rescaled", SW, (O_UPDATE, "o = o + p @ v[..., j0:j1, :]"),
        "O not rescaled when the running maximum changes", ["test_window_values"],
        diagnosis="output accumulated so far is not rescaled"),
    bug("sw_full_window_mask", SW, [("    outs, lses = [], []\n    for i0",
                                     "    pos = torch.arange(L, device=q.device)[:, None] + offset\n"
                                     "    key = torch.arange(S, device=q.device)[None, :]\n"
                                     "    blocked = (key > pos) | (key <= pos - window)\n"
                                     "    outs, lses = [], []\n    for i0"),
                                    (SW_MASK, 's = s.masked_fill(blocked[i0:i1, j0:j1], float("-inf"))')],
        "builds the whole (L, S) window mask", ["test_window_tiles"], diagnosis="whole (L, S) scores or window mask"),
]

_OS_RESHAPE = '''def online_softmax(x, block_size):
    """Block maxima and sums computed for all blocks at once on a padded (..., n_blocks, block) view,
    then combined block after block."""
    n = x.size(-1)
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    padded = torch.cat([x, x.new_full(x.shape[:-1] + (pad,), float("-inf"))], dim=-1)
    blocks = padded.reshape(*x.shape[:-1], n_blocks, block_size)
    block_max = blocks.amax(dim=-1)                                     # (..., n_blocks)
    safe = torch.where(block_max == float("-inf"), torch.zeros_like(block_max), block_max)
    block_sum = torch.exp(blocks - safe[..., None]).sum(dim=-1)         # relative to each block's max
    m = x.new_full(x.shape[:-1], float("-inf"))
    l = x.new_zeros(x.shape[:-1])
    for b in range(n_blocks):
        m_new = torch.maximum(m, block_max[..., b])
        ref = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        l = l * torch.exp(m - ref) + block_sum[..., b] * torch.exp(safe[..., b] - ref)
        m = m_new
    return torch.exp(x - m[..., None]) / l[..., None]
'''

_TA_EINSUM = '''def tiled_attention(q, k, v, block_q=64, block_k=64, causal=False, scale=None):
    """einsum for the tiles, scale on the scores, torch.where for the masks, lists of tiles."""
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    neg = torch.tensor(float("-inf"), dtype=q.dtype)
    out_rows, lse_rows = [], []
    for start in range(0, L, block_q):
        stop = min(start + block_q, L)
        qb = q[..., start:stop, :]
        run_max = qb.new_full(qb.shape[:-1], float("-inf"))
        run_sum = qb.new_zeros(qb.shape[:-1])
        acc = qb.new_zeros(qb.shape[:-1] + v.shape[-1:])
        pos = torch.arange(start, stop)[:, None] + (S - L)
        for kstart in range(0, S, block_k):
            kstop = min(kstart + block_k, S)
            if causal and kstart > pos.max():
                continue
            sc = torch.einsum("...id,...jd->...ij", qb, k[..., kstart:kstop, :]) * scale
            if causal:
                sc = torch.where(torch.arange(kstart, kstop)[None, :] <= pos, sc, neg)
            new_max = torch.maximum(run_max, sc.max(dim=-1).values)
            ref = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            corr = torch.exp(run_max - ref)
            w = torch.exp(sc - ref.unsqueeze(-1))
            run_sum = run_sum * corr + w.sum(-1)
            acc = acc * corr.unsqueeze(-1) + torch.einsum("...ij,...jd->...id", w, v[..., kstart:kstop, :])
            run_max = new_max
        empty = run_sum == 0
        denom = torch.where(empty, torch.ones_like(run_sum), run_sum)
        out_rows.append(acc / denom.unsqueeze(-1))
        lse_rows.append(torch.where(empty, neg, run_max + denom.log()))
    return torch.cat(out_rows, -2), torch.cat(lse_rows, -1)
'''

_MG_LOGADDEXP = '''def merge_attention(out1, lse1, out2, lse2):
    """torch.logaddexp for the merged log-sum-exp, then each part weighted by exp(lse_i - lse)."""
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.isfinite(lse)
    ref = torch.where(finite, lse, torch.zeros_like(lse))
    w1 = torch.where(finite, torch.exp(lse1 - ref), torch.zeros_like(lse))
    w2 = torch.where(finite, torch.exp(lse2 - ref), torch.zeros_like(lse))
    return w1.unsqueeze(-1) * out1 + w2.unsqueeze(-1) * out2, lse
'''

_TS_BRUTE = '''def tile_schedule(n_queries, n_keys, block_q, block_k, window=None):
    """The whole mask, cut into tiles: a tile is computed if any of its pairs may attend."""
    i = torch.arange(n_queries)[:, None] + n_keys - n_queries
    j = torch.arange(n_keys)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    rows = []
    for a in range(0, n_queries, block_q):
        rows.append(torch.stack([allowed[a:a + block_q, b:b + block_k].any() for b in range(0, n_keys, block_k)]))
    return torch.stack(rows)
'''

_SW_SCHEDULE = '''def sliding_window_attention(q, k, v, window, block_q=64, block_k=64, scale=None):
    """The loop over the key blocks that tile_schedule marks; finfo-free masking with where."""
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    plan = tile_schedule(L, S, block_q, block_k, window)
    outs, lses = [], []
    for a, i0 in enumerate(range(0, L, block_q)):
        i1 = min(i0 + block_q, L)
        qt = q[..., i0:i1, :]
        m = qt.new_full(qt.shape[:-1], float("-inf"))
        l = qt.new_zeros(qt.shape[:-1])
        o = qt.new_zeros(qt.shape[:-1] + (v.size(-1),))
        pos = torch.arange(i0, i1)[:, None] + S - L
        for b in plan[a].nonzero().flatten().tolist():
            j0, j1 = b * block_k, min(b * block_k + block_k, S)
            s = torch.matmul(qt, k[..., j0:j1, :].transpose(-1, -2)) * scale
            key = torch.arange(j0, j1)[None, :]
            s = torch.where((key <= pos) & (key > pos - window), s, torch.full_like(s, float("-inf")))
            m_new = torch.maximum(m, s.amax(-1))
            safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe[..., None])
            c = torch.exp(m - safe)
            l = c * l + p.sum(-1)
            o = c[..., None] * o + p @ v[..., j0:j1, :]
            m = m_new
        ok = l > 0
        outs.append(torch.where(ok[..., None], o / torch.where(ok, l, torch.ones_like(l))[..., None], torch.zeros_like(o)))
        lses.append(torch.where(ok, m + torch.log(torch.where(ok, l, torch.ones_like(l))), torch.full_like(l, float("-inf"))))
    return torch.cat(outs, -2), torch.cat(lses, -1)
'''

def _rewrite(name, cell, source, why):
    from support import solution_cells
    old = solution_cells("acceleration")[cell]
    return control(name, cell, (old, source), why)


BUGS.append(_rewrite("mg_logaddexp_both_empty", MG, _MG_LOGADDEXP,
                     "torch.logaddexp: right values, but its backward is NaN where both parts are empty (-inf, -inf)"))
BUGS[-1] = bug(BUGS[-1].name, MG, list(BUGS[-1].edits), BUGS[-1].why, ["test_merge_empty"],
               diagnosis="backward produced NaN")

CONTROLS = [
    _rewrite("os_blocks_at_once_then_combined", OS, _OS_RESHAPE,
             "block maxima and sums of a padded (..., n_blocks, block) view, combined block by block"),
    control("ta_running_max_detached", TA, ("m_new = torch.maximum(m, s.amax(dim=-1))",
                                            "m_new = torch.maximum(m, s.amax(dim=-1)).detach()"),
            "the running maximum treated as a constant, as kernels do: the gradient through it cancels exactly"),
    _rewrite("ta_einsum_where_scale_on_scores", TA, _TA_EINSUM,
             "einsum tiles, the scale on the scores, torch.where masks, continue instead of break"),
    _rewrite("ts_brute_force_tiles", TS, _TS_BRUTE, "the mask cut into tiles (small inputs only)"),
    _rewrite("sw_loop_over_schedule", SW, _SW_SCHEDULE, "the learner's own tile_schedule drives the key loop"),
]

CHAPTER_AS_ANSWER = {
    OS: chapter_code("acceleration", "online_softmax"),
    TA: chapter_code("acceleration", "tiled_attention"),
}
