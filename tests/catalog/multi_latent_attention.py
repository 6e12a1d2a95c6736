"""Plausible mistakes in the multi-head latent attention exercise, each a small edit of the solution;
correct answers in other styles (CONTROLS); and the chapter's code pasted as the answer, which must
score at most a third (it has the module but none of kv_cache_elements, absorb, MLACache and
latent_decode)."""

from support import bug, chapter_code, control

MLA, KV, ABS, CACHE, DEC = "mla", "kv_cache_elements", "absorb", "cache", "decode"

_Q_C = "        q_c = self.w_uq(c_q).view(B, L, H, dh).transpose(1, 2)               # (B, H, L, d_head)\n"
_Q_R = "        q_r = apply_rope(self.w_qr(c_q).view(B, L, H, dr).transpose(1, 2), cos, sin)\n"
_C_KV = "        c_kv = self.kv_norm(self.w_dkv(x))                                   # (B, L, d_c)\n"
_K_R = "        k_r = apply_rope(self.w_kr(x), cos, sin)                             # (B, L, d_rope): one head\n"
_K_C = "            k_c = self.w_uk(c_kv).view(B, L, H, dh).transpose(1, 2)\n"
_V_C = "            v_c = self.w_uv(c_kv).view(B, L, H, dh).transpose(1, 2)\n"
_NAIVE_W = "            weights = masked_softmax(scores / math.sqrt(dh + dr), mask)\n"
_CAUSAL = "        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()\n"
_COMBINE = "            mask = mask & attn_mask\n"
_Q_LAT = '    q_lat = torch.einsum("bhtd,hdc->bhtc", q_c, w_uk)             # W^UK moved to the query side\n'
_SCORES = '    scores = torch.einsum("bhtc,bsc->bhts", q_lat, c_kv) + torch.einsum("bhtr,bsr->bhts", q_r, k_r)\n'
_LAT_W = "    weights = masked_softmax(scores / math.sqrt(dh + mla.d_rope), mask)\n"
_LATENT = '    latent = torch.einsum("bhts,bsc->bhtc", weights, c_kv)        # weighted sum of the latents\n'
_LAT_RET = '    return torch.einsum("bhtc,hdc->bhtd", latent, w_uv), weights  # W^UV after the sum\n'
_FILL = '    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)\n'
_SOFT = "    return torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)\n"
_ROPE_CS = "        cos, sin = rope_cos_sin(L, dr, self.rope_base, dtype=x.dtype, device=x.device)\n"
_IF_ABS = "        if absorbed:\n"

_D_ROPE = "    cos, sin = rope_cos_sin(T, dr, mla.rope_base, offset=start, dtype=x.dtype, device=x.device)\n"
_D_QR = "    q_r = apply_rope(mla.w_qr(c_q).view(B, T, H, dr).transpose(1, 2), cos, sin)\n"
_D_UPDATE = "    c_kv, k_r = cache.update(mla.kv_norm(mla.w_dkv(x)), apply_rope(mla.w_kr(x), cos, sin))\n"
_D_MASK = "    mask = causal_mask(T, c_kv.size(1), device=x.device)           # bottom-right: T new over S cached\n"
_D_ATT = "    out, weights = latent_attention(mla, q_c, q_r, c_kv, k_r, mask)\n"

_INTERLEAVED = '''def rope_pairs(t, cos, sin):
    """RoPE on the pairs (2i, 2i + 1) -- the interleaved layout of the RoFormer paper."""
    half = t.size(-1) // 2
    c, s = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
    rot = torch.stack([-t[..., 1::2], t[..., 0::2]], dim=-1).flatten(-2)
    return t * c + rot * s


def masked_softmax(scores, mask):
'''

BUGS = [
    # --- the module: layers --------------------------------------------------------------------
    bug("per_head_rotary_key", MLA,
        [("self.w_kr = nn.Linear(d_model, d_rope, bias=False)", "self.w_kr = nn.Linear(d_model, n_head * d_rope, bias=False)"),
         (_K_R, "        k_r = apply_rope(self.w_kr(x).view(B, L, H, dr).transpose(1, 2), cos, sin)[:, 0]\n")],
        "gives every head its own rotary key: the cache grows by n_head * d_rope per token",
        ["test_mla_structure"], diagnosis="ONE head"),
    bug("layer_norm_latents", MLA, [("self.q_norm = RMSNorm(d_c_q)", "self.q_norm = nn.LayerNorm(d_c_q, bias=False)"),
                                    ("self.kv_norm = RMSNorm(d_c)", "self.kv_norm = nn.LayerNorm(d_c, bias=False)")],
        "normalises the latents with LayerNorm", ["test_mla_structure"], diagnosis="RMSNorm"),
    bug("biases", MLA, ("self.w_dkv = nn.Linear(d_model, d_c, bias=False)", "self.w_dkv = nn.Linear(d_model, d_c)"),
        "gives the down-projection a bias", ["test_mla_structure"], diagnosis="bias"),
    bug("cache_elements_doubled", MLA, ("    return d_c + d_rope\n", "    return 2 * (d_c + d_rope)\n"),
        "counts the latent twice, as if keys and values were cached separately", ["test_mla_structure"],
        diagnosis="576"),
    # --- the module: scores --------------------------------------------------------------------
    bug("scale_d_head", MLA, [(_NAIVE_W, _NAIVE_W.replace("math.sqrt(dh + dr)", "math.sqrt(dh)")),
                              (_LAT_W, _LAT_W.replace("math.sqrt(dh + mla.d_rope)", "math.sqrt(dh)"))],
        "scales by 1/sqrt(d_head), forgetting the rotary part of the query", ["test_mla_naive"],
        diagnosis="1/sqrt(d_head)"),
    bug("scale_absorbed_width", MLA, (_LAT_W, _LAT_W.replace("math.sqrt(dh + mla.d_rope)", "math.sqrt(c_kv.size(-1) + mla.d_rope)")),
        "scales the absorbed scores by the width of the absorbed query, d_c + d_rope",
        ["test_mla_absorbed", "test_decode"], diagnosis="1/sqrt(d_c + d_rope)"),
    bug("no_scale", MLA, [(_NAIVE_W, _NAIVE_W.replace(" / math.sqrt(dh + dr)", "")),
                          (_LAT_W, _LAT_W.replace(" / math.sqrt(dh + mla.d_rope)", ""))],
        "does not scale the scores", ["test_mla_naive"], diagnosis="not scaled"),
    bug("no_rope", MLA, [(_Q_R, "        q_r = self.w_qr(c_q).view(B, L, H, dr).transpose(1, 2)\n"),
                         (_K_R, "        k_r = self.w_kr(x)\n")],
        "forgets RoPE: the model has no positions at all", ["test_mla_naive"], diagnosis="RoPE was not applied"),
    bug("rope_on_queries_only", MLA, (_K_R, "        k_r = self.w_kr(x)\n"),
        "rotates the rotary queries but forgets the shared rotary key", ["test_mla_naive"],
        diagnosis="not to the shared key"),
    bug("kv_norm_on_keys_only", MLA,
        [(_C_KV, "        c_raw = self.w_dkv(x)\n        c_kv = self.kv_norm(c_raw)\n"),
         (_V_C, _V_C.replace("self.w_uv(c_kv)", "self.w_uv(c_raw)"))],
        "normalises the latent on the key path only: the values come from the raw latent", ["test_mla_naive"],
        diagnosis="the weights are right"),
    bug("rope_on_content", MLA,
        [(_Q_C, _Q_C + "        q_c = apply_rope(q_c, *rope_cos_sin(L, dh, self.rope_base, dtype=x.dtype, device=x.device))\n"),
         (_K_C, _K_C + "            k_c = apply_rope(k_c, *rope_cos_sin(L, dh, self.rope_base, dtype=x.dtype, device=x.device))\n")],
        "rotates the content queries and keys too, which is what blocks absorption", ["test_mla_naive"],
        diagnosis="content part"),
    bug("rope_before_up_projection", MLA,
        [(_Q_C, "        c_rot = apply_rope(c_q, *rope_cos_sin(L, c_q.size(-1), self.rope_base, dtype=x.dtype, device=x.device))\n"
                "        q_c = self.w_uq(c_rot).view(B, L, H, dh).transpose(1, 2)\n"),
         (_Q_R, "        q_r = self.w_qr(c_q).view(B, L, H, dr).transpose(1, 2)\n"),
         (_K_R, "        k_r = self.w_kr(x)\n"),
         (_K_C, "            c_kv_rot = apply_rope(c_kv, *rope_cos_sin(L, c_kv.size(-1), self.rope_base, dtype=x.dtype, device=x.device))\n"
                "            k_c = self.w_uk(c_kv_rot).view(B, L, H, dh).transpose(1, 2)\n")],
        "applies RoPE to the latents before the up-projections instead of to the decoupled part",
        ["test_mla_naive"], diagnosis="before the up-projection"),
    bug("rope_interleaved", MLA, [("def masked_softmax(scores, mask):\n", _INTERLEAVED),
                                  (_Q_R, _Q_R.replace("apply_rope(", "rope_pairs(")),
                                  (_K_R, _K_R.replace("apply_rope(", "rope_pairs("))],
        "rotates the pairs (2i, 2i+1) while the book's RoPE pairs i with i + d/2", ["test_mla_naive"],
        diagnosis="rotate-half"),
    bug("rope_cos_sin_float32", MLA, (_ROPE_CS, _ROPE_CS.replace("dtype=x.dtype, ", "")),
        "builds cos/sin in the default float32: float64 models are rounded", ["test_mla_naive"],
        diagnosis="float32"),
    bug("no_q_norm", MLA, ("        c_q = self.q_norm(self.w_dq(x))\n", "        c_q = self.w_dq(x)\n"),
        "forgets q_norm on the query latent", ["test_mla_naive"], diagnosis="q_norm was not applied"),
    bug("no_kv_norm", MLA, (_C_KV, "        c_kv = self.w_dkv(x)\n"),
        "forgets kv_norm on the KV latent", ["test_mla_naive"], diagnosis="kv_norm was not applied"),
    bug("no_norms", MLA, [("        c_q = self.q_norm(self.w_dq(x))\n", "        c_q = self.w_dq(x)\n"),
                          (_C_KV, "        c_kv = self.w_dkv(x)\n")],
        "defines the norms but applies neither", ["test_mla_naive"], diagnosis="q_norm and kv_norm were not applied"),
    bug("head_split_order", MLA,
        [(_Q_C, "        q_c = self.w_uq(c_q).view(B, L, dh, H).permute(0, 3, 1, 2)\n"),
         (_Q_R, "        q_r = apply_rope(self.w_qr(c_q).view(B, L, dr, H).permute(0, 3, 1, 2), cos, sin)\n"),
         (_K_C, "            k_c = self.w_uk(c_kv).view(B, L, dh, H).permute(0, 3, 1, 2)\n"),
         (_V_C, "            v_c = self.w_uv(c_kv).view(B, L, dh, H).permute(0, 3, 1, 2)\n")],
        "splits the up-projections' outputs as (d_head, n_head): every head mixes the others' features",
        ["test_mla_naive"], diagnosis="wrong index order"),
    bug("absorbed_w_uk_index_order", MLA, ("    w_uk = mla.w_uk.weight.view(H, dh, -1)                       # W^UK_h: (d_head, d_c)\n",
                                           "    w_uk = mla.w_uk.weight.view(dh, H, -1).transpose(0, 1)\n"),
        "absorbs W^UK with its head and feature indices swapped: the absorbed form computes another model",
        ["test_mla_absorbed", "test_decode"], diagnosis="weights of forward(absorbed=True) differs"),
    bug("values_from_w_uk", MLA, (_V_C, _V_C.replace("self.w_uv(", "self.w_uk(")),
        "up-projects the values with W^UK", ["test_mla_naive"], diagnosis="up-projected with w_uk"),
    # --- the module: masks -------------------------------------------------------------------
    bug("not_causal", MLA, (_CAUSAL, _CAUSAL.replace(".tril()", "")),
        "forgets the causal mask", ["test_mla_naive", "test_mla_absorbed"], diagnosis="causal mask is missing"),
    bug("mask_ignored", MLA, (_COMBINE, "            pass\n"),
        "ignores attn_mask", ["test_mla_naive"], diagnosis="attn_mask was ignored"),
    bug("mask_replaces_causal", MLA, (_COMBINE, "            mask = attn_mask\n"),
        "uses attn_mask instead of combining it with the causal mask", ["test_mla_naive"],
        diagnosis="replaced the causal mask"),
    bug("nan_rows", MLA, [(_FILL, '    scores = scores.masked_fill(~mask, float("-inf"))\n'),
                          (_SOFT, "    return torch.softmax(scores, dim=-1)\n")],
        "lets a query with no allowed key produce NaN", ["test_mla_naive"], diagnosis="NaN"),
    bug("mask_on_cpu", MLA, (_CAUSAL, _CAUSAL.replace(", device=x.device", "")),
        "creates the causal mask on the CPU whatever the input's device", ["test_mla_hygiene"],
        diagnosis="another device"),
    # --- the module: the absorbed form ---------------------------------------------------------
    bug("absorbed_materialises_keys", MLA,
        [(_Q_LAT, '    k_c = torch.einsum("bsc,hdc->bhsd", c_kv, w_uk)             # decompressed keys\n'),
         (_SCORES, '    scores = q_c @ k_c.transpose(-2, -1) + torch.einsum("bhtr,bsr->bhts", q_r, k_r)\n')],
        "the 'absorbed' form decompresses the keys of the context", ["test_mla_absorbed", "test_decode"],
        diagnosis="materialised per-head keys"),
    bug("w_uv_not_absorbed", MLA,
        [(_LATENT, '    v_c = torch.einsum("bsc,hdc->bhsd", c_kv, w_uv)             # decompressed values\n'),
         (_LAT_RET, "    return weights @ v_c, weights\n")],
        "absorbs W^UK but decompresses the values", ["test_mla_absorbed", "test_decode"],
        diagnosis="per-head values v^C"),
    bug("absorbed_key_per_head_loop", MLA,
        (_SCORES, "    scores = torch.stack([q_c[:, h] @ (c_kv @ w_uk[h].T).transpose(-2, -1) for h in range(H)], 1)\n"
                  '    scores = scores + torch.einsum("bhtr,bsr->bhts", q_r, k_r)\n'),
        "builds the keys of the context one head at a time", ["test_mla_absorbed", "test_decode"],
        diagnosis="(head 0)"),
    bug("absorbed_is_naive", MLA, (_IF_ABS, "        if False:\n"),
        "ignores absorbed=True and always decompresses", ["test_mla_absorbed"], diagnosis="materialised"),
    bug("latent_broadcast_matmul", MLA,
        [(_SCORES, "    scores = q_lat @ c_kv[:, None].transpose(-2, -1) + q_r @ k_r[:, None].transpose(-2, -1)\n"),
         (_LATENT, "    latent = weights @ c_kv[:, None]\n")],
        "multiplies by c_kv[:, None]: matmul expands and copies the latent once per head at every step",
        ["test_decode"], diagnosis="as large as the per-head keys"),
    # --- kv_cache_elements ---------------------------------------------------------------------
    bug("mha_without_factor_2", KV, ("        per_layer = 2 * n_head * d_head\n", "        per_layer = n_head * d_head\n"),
        "counts only the keys of MHA", ["test_kv_cache_elements"], diagnosis="2 n_h d_h"),
    bug("gqa_uses_n_head", KV, ("        per_layer = 2 * n_groups * d_head\n", "        per_layer = 2 * n_head * d_head\n"),
        "counts GQA's cache with n_head heads", ["test_kv_cache_elements"], diagnosis="2 n_g d_h"),
    bug("mla_per_head_rope", KV, ("        per_layer = mla_cache_elements(d_c, d_rope)\n",
                                  "        per_layer = d_c + n_head * d_rope\n"),
        "counts one rotary key per head", ["test_kv_cache_elements"], diagnosis="one shared k^R"),
    bug("gqa_missing_groups_typeerror", KV, ("        if n_groups is None:\n            raise ValueError(\"GQA needs n_groups\")\n", ""),
        "does not check n_groups: 2 * None raises TypeError", ["test_kv_cache_elements"],
        diagnosis="should raise ValueError"),
    # --- absorb --------------------------------------------------------------------------------
    bug("absorb_split_order", ABS,
        [("    w_uq = mla.w_uq.weight.view(H, dh, -1)                        # (H, d_head, d_c_q)\n",
          "    w_uq = mla.w_uq.weight.view(dh, H, -1).transpose(0, 1)\n"),
         ("    w_uk = mla.w_uk.weight.view(H, dh, -1)                        # (H, d_head, d_c)\n",
          "    w_uk = mla.w_uk.weight.view(dh, H, -1).transpose(0, 1)\n")],
        "takes head h's rows with the indices swapped", ["test_absorb"], diagnosis="wrong index order"),
    bug("absorb_mixes_heads", ABS, ('    return torch.einsum("hdq,hdc->hqc", w_uq, w_uk), torch.einsum("hdc,mhd->hcm", w_uv, w_o)\n',
                                    '    return (mla.w_uq.weight.T @ mla.w_uk.weight).expand(H, -1, -1), '
                                    'torch.einsum("hdc,mhd->hcm", w_uv, w_o)\n'),
        "merges W^UQ^T W^UK over all heads at once", ["test_absorb"], diagnosis="mixes the heads"),
    bug("absorb_vo_from_w_uk", ABS, ("    w_uv = mla.w_uv.weight.view(H, dh, -1)\n", "    w_uv = mla.w_uk.weight.view(H, dh, -1)\n"),
        "merges the output side with W^UK", ["test_absorb"], diagnosis="built from w_uk"),
    bug("absorb_o_rows", ABS, ("    w_o = mla.o.weight.view(-1, H, dh)                            # (d_model, H, d_head)\n",
                               "    w_o = mla.o.weight.reshape(H, dh, -1).permute(2, 0, 1)\n"),
        "takes head h's block of o from its rows instead of its columns", ["test_absorb"],
        diagnosis="w_vo differs"),
    bug("absorb_transposed", ABS, ('torch.einsum("hdq,hdc->hqc", w_uq, w_uk)', 'torch.einsum("hdq,hdc->hcq", w_uq, w_uk)'),
        "returns W^UK_h^T W^UQ_h, (d_c, d_c_q) per head", ["test_absorb"], diagnosis="(d_c_q, d_c)"),
    # --- MLACache ------------------------------------------------------------------------------
    bug("cache_no_max_len", CACHE, ("        if end > self.max_len:\n            raise ValueError(f\"the cache holds at most "
                                    "{self.max_len} tokens; {end} would not fit\")\n", ""),
        "does not enforce max_len", ["test_cache"], diagnosis="should raise ValueError"),
    bug("cache_returns_buffer", CACHE, ("        return self.c_kv[:, :end], self.k_r[:, :end]\n", "        return self.c_kv, self.k_r\n"),
        "returns the whole pre-allocated buffer, zeros included", ["test_cache"], diagnosis="all latents cached so far"),
    bug("cache_never_advances", CACHE, ("        self.length = end\n", ""),
        "forgets to advance: every update overwrites the first tokens", ["test_cache"], diagnosis="len(cache) is"),
    bug("cache_reset_noop", CACHE, ("    def reset(self):\n        self.length = 0\n", "    def reset(self):\n        pass\n"),
        "reset forgets nothing", ["test_cache"], diagnosis="after reset()"),
    # --- latent_decode -------------------------------------------------------------------------
    bug("decode_no_offset", DEC, (_D_ROPE, _D_ROPE.replace("offset=start, ", "")),
        "rotates every chunk from position 0", ["test_decode"], diagnosis="rotated from position 0"),
    bug("decode_query_offset_missing", DEC,
        (_D_QR, "    q_r = apply_rope(mla.w_qr(c_q).view(B, T, H, dr).transpose(1, 2), "
                "*rope_cos_sin(T, dr, mla.rope_base, dtype=x.dtype, device=x.device))\n"),
        "rotates the new keys at their positions but the new queries from 0", ["test_decode"],
        diagnosis="new queries q^R were rotated from position 0"),
    bug("decode_top_left", DEC, (_D_MASK, "    mask = torch.ones(T, c_kv.size(1), dtype=torch.bool, device=x.device).tril()\n"),
        "aligns the causal mask top-left: the new tokens cannot see most of the cache", ["test_decode"],
        diagnosis="top-left"),
    bug("decode_caches_decompressed_keys", DEC,
        (_D_UPDATE, "    c_kv, k_r = cache.update(mla.w_uk(mla.kv_norm(mla.w_dkv(x))), apply_rope(mla.w_kr(x), cos, sin))\n"),
        "caches the decompressed keys instead of the latent", ["test_decode"], diagnosis="nothing decompressed"),
    bug("decode_caches_before_norm", DEC, (_D_UPDATE, _D_UPDATE.replace("mla.kv_norm(mla.w_dkv(x))", "mla.w_dkv(x)")),
        "caches the latent before kv_norm", ["test_decode"], diagnosis="before kv_norm"),
    bug("decode_naive", DEC,
        (_D_ATT, "    k_c = mla.w_uk(c_kv).view(B, -1, H, dh).transpose(1, 2)\n"
                 "    v_c = mla.w_uv(c_kv).view(B, -1, H, dh).transpose(1, 2)\n"
                 "    scores = q_c @ k_c.transpose(-2, -1) + q_r @ k_r[:, None].transpose(-2, -1)\n"
                 "    weights = masked_softmax(scores / math.sqrt(dh + dr), mask)\n"
                 "    out = weights @ v_c\n"),
        "decompresses the whole cache at every step", ["test_decode"], diagnosis="materialised per-head keys"),
]

CONTROLS = [
    control("torch_rmsnorm", MLA, [("self.q_norm = RMSNorm(d_c_q)", "self.q_norm = nn.RMSNorm(d_c_q)"),
                                   ("self.kv_norm = RMSNorm(d_c)", "self.kv_norm = nn.RMSNorm(d_c)")],
            "PyTorch's nn.RMSNorm (eps None = machine epsilon) instead of the book's"),
    control("folded_heads_one_latent_head", MLA,
            [(_SCORES, "    B, T, S = q_c.size(0), q_c.size(2), c_kv.size(1)\n"
                       "    q = torch.cat([q_lat, q_r], dim=-1).reshape(B, H * T, -1)     # heads folded into the queries\n"
                       "    scores = (q @ torch.cat([c_kv, k_r], dim=-1).transpose(-2, -1)).view(B, H, T, S)\n"),
             (_LATENT, "    latent = (weights.reshape(B, H * T, S) @ c_kv).view(B, H, T, -1)\n")],
            "the latent as one key head of width d_c + d_rope, the query heads folded into the query axis (the chapter's way)"),
    control("sdpa_naive_output", MLA,
            [("            out = weights @ v_c\n",
              "            q = torch.cat([q_c, q_r], dim=-1)\n"
              "            k = torch.cat([k_c, k_r[:, None].expand(-1, H, -1, -1)], dim=-1)\n"
              "            out = F.scaled_dot_product_attention(q, k, v_c, attn_mask=mask.expand(B, H, L, L) "
              "| ~mask.any(-1, keepdim=True), scale=1 / math.sqrt(dh + dr))\n"
              "            out = out.masked_fill(~mask.expand(B, H, L, L).any(-1, keepdim=True), 0.0)\n")],
            "the naive output from F.scaled_dot_product_attention on the concatenated heads"),
    control("library_causal_mask", MLA, (_CAUSAL, "        mask = causal_mask(L, device=x.device)\n"),
            "the library's causal_mask"),
    control("kv_table_dict", KV, [("    if kind == \"mha\":\n", "    sizes = {\"mha\": lambda: 2 * n_head * d_head, \"mqa\": lambda: 2 * d_head}\n"
                                   "    if kind in sizes:\n        return sizes[kind]() * n_layers\n    if kind == \"mha\":\n")],
            "a lookup table for the kinds without options"),
    control("cache_by_concatenation", CACHE,
            [("        self.max_len, self.length = max_len, 0\n"
              "        self.c_kv = torch.zeros(batch_size, max_len, d_c, dtype=dtype, device=device)\n"
              "        self.k_r = torch.zeros(batch_size, max_len, d_rope, dtype=dtype, device=device)\n",
              "        self.max_len, self.length = max_len, 0\n"
              "        self.empty = (torch.zeros(batch_size, 0, d_c, dtype=dtype, device=device),\n"
              "                      torch.zeros(batch_size, 0, d_rope, dtype=dtype, device=device))\n"
              "        self.c_kv, self.k_r = self.empty\n"),
             ("        self.c_kv[:, self.length:end] = c_kv\n        self.k_r[:, self.length:end] = k_r\n",
              "        self.c_kv = torch.cat([self.c_kv, c_kv], dim=1)\n        self.k_r = torch.cat([self.k_r, k_r], dim=1)\n"),
             ("        return self.c_kv[:, :end], self.k_r[:, :end]\n", "        return self.c_kv, self.k_r\n"),
             ("    def reset(self):\n        self.length = 0\n",
              "    def reset(self):\n        self.length = 0\n        self.c_kv, self.k_r = self.empty\n")],
            "a cache that grows by concatenation"),
    control("decode_with_merged_matrices", DEC,
            [(_D_ATT, "    w_qk, w_vo = absorb(mla)                                       # merged ahead of time\n"
                      "    q_lat = torch.einsum(\"btq,hqc->bhtc\", c_q, w_qk)\n"
                      "    scores = torch.einsum(\"bhtc,bsc->bhts\", q_lat, c_kv) + q_r @ k_r[:, None].transpose(-2, -1)\n"
                      "    weights = masked_softmax(scores / math.sqrt(dh + dr), mask)\n"
                      "    latent = torch.einsum(\"bhts,bsc->bhtc\", weights, c_kv)\n"
                      "    return torch.einsum(\"bhtc,hcm->btm\", latent, w_vo), weights\n"),
             ("    return mla.o(out.transpose(1, 2).reshape(B, T, H * dh)), weights\n", "")],
            "decoding with absorb's merged matrices: W^UQ^T W^UK on the query latent, W^UV^T W^O^T on the output"),
]

# The chapter's module, pasted with the library imports it relies on: it has both forms and
# mla_cache_elements, and nothing of parts 2 to 5.
CHAPTER_AS_ANSWER = {
    MLA: "from handson.nn import attention, merge_heads, split_heads\n\n\n"
         + chapter_code("multi_latent_attention", "MultiHeadLatentAttention", "mla_cache_elements"),
}
