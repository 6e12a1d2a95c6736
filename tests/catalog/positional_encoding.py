"""Plausible mistakes in the positional-encoding exercise, each a small edit of the solution (the
pitfalls of the well-known implementations first); correct answers in other styles (CONTROLS); and
the chapter's own code pasted as the answer, which must score at most a third."""

from support import bug, chapter_code, control, solution_cells

SIN, ROPE, ALIBI, AT, MOD = "sinusoidal", "rope", "alibi", "rope_at", "rotary_attention"
_SOLUTION = solution_cells("positional_encoding")

_SIN_SET = ("    pe[:, 0::2] = torch.sin(angle)\n"
            "    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])\n")
_ROT = "    rotated = torch.cat([-x2, x1], dim=-1)\n"
_APPLY_QK = "        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)\n"
_ATTEND = "        out, _ = handson.nn.attention(q, k, v, attn_mask, is_causal=True)\n"


BUGS = [
    # --- sinusoidal encodings ------------------------------------------------------------------
    bug("sin_cos_concatenated", SIN, (_SIN_SET, "    pe = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)[:, :d_model]\n"),
        "lays out [sin | cos] (fairseq, tensor2tensor) instead of interleaving them as Vaswani 3.5",
        ["test_sinusoidal"], diagnosis="[sin | cos]"),
    bug("fairseq_frequencies", SIN,
        [("    angle = pos / base ** (two_i / d_model)\n",
          "    half = d_model // 2\n"
          "    angle = pos * torch.exp(torch.arange(half, dtype=torch.float64, device=device) * -(math.log(base) / (half - 1)))\n"),
         (_SIN_SET, "    pe = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)\n")],
        "fairseq's get_embedding: [sin | cos] with log(base)/(half - 1)", ["test_sinusoidal"], diagnosis="fairseq"),
    bug("sin_cos_swapped", SIN, (_SIN_SET, "    pe[:, 0::2] = torch.cos(angle)\n    pe[:, 1::2] = torch.sin(angle[:, : d_model // 2])\n"),
        "cosines in the even columns, sines in the odd ones", ["test_sinusoidal"], diagnosis="swapped"),
    bug("exponent_i_over_d", SIN, ("base ** (two_i / d_model)", "base ** (two_i / 2 / d_model)"),
        "uses i/d with i the pair index (the exponent is 2i/d)", ["test_sinusoidal"], diagnosis="2i/d_model"),
    bug("exponent_4i_over_d", SIN, ("base ** (two_i / d_model)", "base ** (2 * two_i / d_model)"),
        "multiplies the column index 2i by 2 again", ["test_sinusoidal"], diagnosis="4i/d_model"),
    bug("sin_positions_from_one", SIN, ("torch.arange(n_positions, ", "torch.arange(1, n_positions + 1, "),
        "numbers the positions from 1", ["test_sinusoidal"], diagnosis="counted from 1"),
    bug("sin_float32_angles", SIN, [("pos = torch.arange(n_positions, dtype=torch.float64", "pos = torch.arange(n_positions, dtype=torch.float32"),
                                    ("two_i = torch.arange(0, d_model, 2, dtype=torch.float64", "two_i = torch.arange(0, d_model, 2, dtype=torch.float32")],
        "computes the angles in float32 and casts the result", ["test_sinusoidal"], diagnosis="float32"),
    bug("sin_dtype_ignored", SIN, ("    return pe.to(dtype)\n", "    return pe\n"),
        "always returns float64", ["test_sinusoidal_dtype_device"], diagnosis="requested dtype"),
    bug("sin_base_ignored", SIN, ("pos / base ** (two_i / d_model)", "pos / 10000.0 ** (two_i / d_model)"),
        "uses 10000 whatever the base", ["test_sinusoidal"], diagnosis="base argument is ignored"),
    bug("sin_device_ignored", SIN, [("pos = torch.arange(n_positions, dtype=torch.float64, device=device)",
                                     "pos = torch.arange(n_positions, dtype=torch.float64)"),
                                    ("two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)",
                                     "two_i = torch.arange(0, d_model, 2, dtype=torch.float64)"),
                                    ("pe = torch.zeros(n_positions, d_model, dtype=torch.float64, device=device)",
                                     "pe = torch.zeros(n_positions, d_model, dtype=torch.float64)")],
        "builds the angles on the CPU whatever the device", ["test_sinusoidal_dtype_device"], diagnosis="meta"),
    # --- RoPE ------------------------------------------------------------------------------------
    bug("rope_interleaved_layout", ROPE, ("    angle = torch.cat([angle, angle], dim=-1)\n", "    angle = angle.repeat_interleave(2, dim=-1)\n"),
        "cos/sin in the interleaved layout with rotate-half pairing", ["test_rope_cos_sin", "test_apply_rope"],
        diagnosis="interleaved layout"),
    bug("rope_interleaved_throughout", ROPE,
        [("    angle = torch.cat([angle, angle], dim=-1)\n", "    angle = angle.repeat_interleave(2, dim=-1)\n"),
         ("    x1, x2 = x.chunk(2, dim=-1)\n" + _ROT,
          "    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)\n")],
        "a consistent interleaved (GPT-J, Meta Llama) RoPE: not the rotate-half pairing asked",
        ["test_rope_cos_sin", "test_apply_rope"], diagnosis="interleaved layout"),
    bug("rope_pairs_mixed", ROPE, ("    x1, x2 = x.chunk(2, dim=-1)\n" + _ROT,
                                   "    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)\n"),
        "rotate_half pairs (2i, 2i+1) while cos/sin are laid out for (i, i + d/2)", ["test_apply_rope"],
        diagnosis="interleaved pairing"),
    bug("rope_no_offset", ROPE, ("torch.arange(offset, offset + n_positions, ", "torch.arange(n_positions, "),
        "ignores the offset: every decoded token at position 0 (mlx-vlm #1983)", ["test_rope_cos_sin"],
        diagnosis="offset is ignored"),
    bug("rope_positions_from_one", ROPE, ("torch.arange(offset, offset + n_positions, ", "torch.arange(offset + 1, offset + n_positions + 1, "),
        "numbers the positions from offset + 1", ["test_rope_cos_sin"], diagnosis="counted from 1"),
    bug("rope_exponent_i_over_d", ROPE, ("dtype=torch.float64, device=device) / head_dim)", "dtype=torch.float64, device=device) / head_dim / 2)"),
        "theta_i = base^(-i/d) instead of base^(-2i/d)", ["test_rope_cos_sin"], diagnosis="exponent is i/head_dim"),
    bug("rope_cos_sin_swapped", ROPE, ("return angle.cos().to(dtype), angle.sin().to(dtype)", "return angle.sin().to(dtype), angle.cos().to(dtype)"),
        "returns (sin, cos)", ["test_rope_cos_sin"], diagnosis="swapped"),
    bug("rope_float32_angles", ROPE, [("theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64", "theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32"),
                                      ("pos = torch.arange(offset, offset + n_positions, dtype=torch.float64", "pos = torch.arange(offset, offset + n_positions, dtype=torch.float32")],
        "cos/sin computed in float32 then cast (HF Llama's rotary embedding)", ["test_rope_cos_sin"], diagnosis="float32"),
    bug("rope_rotation_reversed", ROPE, (_ROT, "    rotated = torch.cat([x2, -x1], dim=-1)\n"),
        "rotates by -m theta", ["test_apply_rope"], diagnosis="-m theta"),
    bug("rope_no_minus", ROPE, (_ROT, "    rotated = torch.cat([x2, x1], dim=-1)\n"),
        "swaps the halves without the minus sign: not a rotation", ["test_apply_rope"], diagnosis="without the minus"),
    bug("rope_cos_not_cast", ROPE, ("return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)", "return x * cos + rotated * sin"),
        "float64 cos/sin promote a float32 x to float64", ["test_rope_dtype_device"], diagnosis="dtype"),
    bug("rope_base_ignored", ROPE, ("theta = base ** (", "theta = 10000.0 ** ("),
        "uses 10000 whatever the base", ["test_rope_cos_sin"], diagnosis="base argument is ignored"),
    # --- ALiBi -----------------------------------------------------------------------------------
    bug("slopes_reversed", ALIBI, ("return torch.tensor(slopes, ", "return torch.tensor(slopes[::-1], "),
        "slopes in reverse head order", ["test_alibi_slopes"], diagnosis="reverse head order"),
    bug("slopes_paper_formula", ALIBI, ("slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p]", "slopes = power_of_two(n_head)"),
        "the paper's 2^(-8/n) sequence for every n: wrong for 12 heads (Baichuan2 #225)", ["test_alibi_slopes"],
        diagnosis="not a power of two"),
    bug("slopes_odd_places", ALIBI, ("power_of_two(2 * p)[0::2]", "power_of_two(2 * p)[1::2]"),
        "the extra slopes from the odd places of 2p heads", ["test_alibi_slopes"], diagnosis="odd places"),
    bug("slopes_first_of_double", ALIBI, ("slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p]", "slopes = power_of_two(2 * p)[:n_head]"),
        "the first n slopes of 2p heads", ["test_alibi_slopes"], diagnosis="first"),
    bug("alibi_sign", ALIBI, ("(slopes[:, None, None] * (j - i))", "(slopes[:, None, None] * (i - j))"),
        "a bonus instead of a penalty for distant keys", ["test_alibi_bias"], diagnosis="sign is flipped"),
    bug("alibi_top_left", ALIBI, (" + (S - n_queries)", ""),
        "aligned top-left: wrong for new queries over cached keys", ["test_alibi_bias"], diagnosis="top-left"),
    bug("alibi_symmetric", ALIBI, ("(slopes[:, None, None] * (j - i))", "(-slopes[:, None, None] * (j - i).abs())"),
        "-m |i - j|: the future gets a penalty instead of the unmasked linear values", ["test_alibi_bias"],
        diagnosis="future"),
    bug("alibi_future_masked", ALIBI, ("(slopes[:, None, None] * (j - i)).to(dtype)", "(slopes[:, None, None] * (j - i)).masked_fill(j > i, float(\"-inf\")).to(dtype)"),
        "masks the future inside the bias", ["test_alibi_bias"], diagnosis="future"),
    bug("alibi_bloom_form", ALIBI, ("(slopes[:, None, None] * (j - i))", "(slopes[:, None, None] * j.expand(n_queries, S))"),
        "Bloom's m * j: equal after a causal softmax, not the bias asked", ["test_alibi_bias"], diagnosis="Bloom"),
    bug("alibi_float32_slopes", ALIBI, ("slopes = alibi_slopes(n_head, dtype=torch.float64, device=device)", "slopes = alibi_slopes(n_head, device=device)"),
        "float32 slopes times float64 distances", ["test_alibi_bias"], diagnosis="float32"),
    bug("alibi_slopes_on_cpu", ALIBI, ("slopes = alibi_slopes(n_head, dtype=torch.float64, device=device)", "slopes = alibi_slopes(n_head, dtype=torch.float64)"),
        "slopes on the CPU whatever the device", ["test_alibi_bias"], diagnosis="meta"),
    # --- RoPE at explicit positions --------------------------------------------------------------
    bug("scaling_multiplies", AT, ("(positions.to(torch.float64) / scaling)", "(positions.to(torch.float64) * scaling)"),
        "multiplies the positions by the scaling factor", ["test_rope_scaling"], diagnosis="multiplied"),
    bug("scaling_on_base", AT, [("theta = base ** (", "theta = (base * scaling) ** ("),
                                ("(positions.to(torch.float64) / scaling)", "positions.to(torch.float64)")],
        "applies the factor to the base (a different method: NTK-style scaling is not linear interpolation)",
        ["test_rope_scaling"], diagnosis="applied to the base"),
    bug("scaling_ignored", AT, ("(positions.to(torch.float64) / scaling)", "positions.to(torch.float64)"),
        "ignores scaling", ["test_rope_scaling"], diagnosis="scaling argument is ignored"),
    bug("at_theta_on_cpu", AT, ("dtype=torch.float64, device=positions.device)", "dtype=torch.float64)"),
        "frequencies on the CPU whatever the positions' device", ["test_rope_at_dtype_device"], diagnosis="meta"),
    bug("at_positions_flattened", AT, ("(positions.to(torch.float64) / scaling)[..., None]", "(positions.to(torch.float64).flatten() / scaling)[:, None]"),
        "flattens (B, L) positions", ["test_rope_cos_sin_at"], diagnosis="shape"),
    bug("at_float32_angles", AT, [("dtype=torch.float64, device=positions.device)", "dtype=torch.float32, device=positions.device)"),
                                  ("positions.to(torch.float64)", "positions.to(torch.float32)")],
        "angles in float32 then cast", ["test_rope_cos_sin_at"], diagnosis="float32"),
    bug("at_interleaved_layout", AT, ("    angle = torch.cat([angle, angle], dim=-1)\n", "    angle = angle.repeat_interleave(2, dim=-1)\n"),
        "interleaved layout", ["test_rope_cos_sin_at"], diagnosis="interleaved layout"),
    # --- the rotary attention layer --------------------------------------------------------------
    bug("module_rope_on_v", MOD, (_APPLY_QK, _APPLY_QK + "        v = apply_rope(v, cos, sin)\n"),
        "rotates the values too", ["test_rotary_reference", "test_rotary_relative"], diagnosis="values are rotated"),
    bug("module_rope_q_only", MOD, (_APPLY_QK, "        q = apply_rope(q, cos, sin)\n"),
        "rotates the queries only", ["test_rotary_reference"], diagnosis="only the queries"),
    bug("module_no_rope", MOD, (_APPLY_QK, ""), "no rotation at all", ["test_rotary_reference"], diagnosis="no rotation"),
    bug("module_no_offset", MOD, ("positions = torch.arange(s_past, s_past + L, ", "positions = torch.arange(L, "),
        "decoded tokens rotated from position 0 (the KV-cache offset bug)", ["test_rotary_reference", "test_rotary_cache"],
        diagnosis="offset"),
    bug("module_rerotates_cache", MOD, ("k = torch.cat([past_kv[0], k], dim=-2)",
                                        "k = torch.cat([apply_rope(past_kv[0], *rope_cos_sin_at(torch.arange(s_past, device=x.device), "
                                        "self.head_dim, self.base, dtype=x.dtype)), k], dim=-2)"),
        "rotates the cached (already rotated) keys again", ["test_rotary_reference", "test_rotary_cache"],
        diagnosis="rotated again"),
    bug("module_interleaved", MOD, (_APPLY_QK,
                                    "        h = self.head_dim // 2\n"
                                    "        rot = lambda t: torch.stack([t[..., 0::2] * cos[..., :h] - t[..., 1::2] * sin[..., :h],\n"
                                    "                                     t[..., 0::2] * sin[..., :h] + t[..., 1::2] * cos[..., :h]], -1).flatten(-2)\n"
                                    "        q, k = rot(q), rot(k)\n"),
        "the interleaved pairing inside the layer (Meta-style weights in rotate-half code)", ["test_rotary_reference"],
        diagnosis="interleaved pairing"),
    bug("module_mixed_pairings", MOD, (_APPLY_QK,
                                       "        h = self.head_dim // 2\n"
                                       "        rot = lambda t: torch.stack([t[..., 0::2] * cos[..., :h] - t[..., 1::2] * sin[..., :h],\n"
                                       "                                     t[..., 0::2] * sin[..., :h] + t[..., 1::2] * cos[..., :h]], -1).flatten(-2)\n"
                                       "        q, k = apply_rope(q, cos, sin), rot(k)\n"),
        "q rotate-half, k interleaved (transformers #25199-like mix)", ["test_rotary_reference", "test_rotary_relative"],
        diagnosis="different pairings"),
    bug("module_top_left", MOD, (_ATTEND,
                                 "        allowed = torch.ones(L, k.size(-2), dtype=torch.bool, device=x.device).tril()\n"
                                 "        allowed = allowed if attn_mask is None else allowed & attn_mask\n"
                                 "        out, _ = handson.nn.attention(q, k, v, allowed)\n"),
        "a top-left causal mask: wrong with a cache", ["test_rotary_reference", "test_rotary_cache"], diagnosis="top-left"),
    bug("module_no_scale", MOD, (_ATTEND, "        out, _ = handson.nn.attention(q, k, v, attn_mask, is_causal=True, scale=1.0)\n"),
        "forgets 1/sqrt(head_dim)", ["test_rotary_reference"], diagnosis="sqrt(head_dim)"),
    bug("module_mask_ignored", MOD, (_ATTEND, "        out, _ = handson.nn.attention(q, k, v, None, is_causal=True)\n"),
        "ignores attn_mask", ["test_rotary_reference", "test_rotary_left_padding"], diagnosis="attn_mask is ignored"),
    bug("module_positions_no_head_axis", MOD, ("        if cos.dim() == 3:                                   # (B, L, d) -> (B, 1, L, d): same for every head\n"
                                               "            cos, sin = cos[:, None], sin[:, None]\n", ""),
        "(B, L, d) cos/sin broadcast against the head axis", ["test_rotary_reference"], diagnosis="head axis"),
    bug("module_no_validation", MOD, ("        if d_model % n_head or (d_model // n_head) % 2:\n"
                                      "            raise ValueError(f\"d_model={d_model} must split into {n_head} heads of an even size\")\n", ""),
        "accepts an odd head_dim or a non-divisible d_model", ["test_rotary_shapes"], diagnosis="ValueError"),
    bug("module_bias_ignored", MOD, ("self.q = nn.Linear(d_model, d_model, bias=bias)", "self.q = nn.Linear(d_model, d_model)"),
        "q keeps a bias with bias=False", ["test_rotary_shapes"], diagnosis="bias=False"),
    bug("module_returns_new_kv_only", MOD, ("return self.o(out.transpose(1, 2).reshape(B, L, D)), (k, v)",
                                            "return self.o(out.transpose(1, 2).reshape(B, L, D)), (k[..., -L:, :], v[..., -L:, :])"),
        "returns only the new keys and values as the cache", ["test_rotary_shapes"], diagnosis="cat(past_k"),
]

_SIN_STACK = '''def sinusoidal_encoding(n_positions, d_model, base=10000.0, *, dtype=None, device=None):
    half = (d_model + 1) // 2
    i = torch.arange(half, dtype=torch.float64, device=device)
    freq = torch.exp(-2.0 * i / d_model * math.log(base))
    angle = torch.outer(torch.arange(n_positions, dtype=torch.float64, device=device), freq)
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)[:, :d_model]
    return pe.to(torch.get_default_dtype() if dtype is None else dtype)
'''

_ROPE_EXPLICIT = '''def rope_cos_sin(n_positions, head_dim, base=10000.0, *, offset=0, dtype=None, device=None):
    dtype = dtype or torch.get_default_dtype()
    pos = offset + torch.arange(n_positions, device=device).double()
    inv = 1.0 / (base ** (torch.arange(head_dim // 2, device=device).double() * 2 / head_dim))
    ang = torch.einsum("m,i->mi", pos, inv).repeat(1, 2)
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def apply_rope(x, cos, sin):
    h = x.size(-1) // 2
    c, s = cos[..., :h].to(x.dtype), sin[..., :h].to(x.dtype)
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
'''

_ALIBI_REFERENCE = '''def alibi_slopes(n_head, *, dtype=None, device=None):
    def get_slopes(n):
        def power_of_2(n):
            start = 2 ** (-2 ** -(math.log2(n) - 3))
            return [start * start ** i for i in range(n)]
        if math.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_2(closest) + get_slopes(2 * closest)[0::2][: n - closest]
    return torch.tensor(get_slopes(n_head), dtype=torch.float64, device=device).to(dtype or torch.get_default_dtype())


def alibi_bias(n_head, n_queries, n_keys=None, *, dtype=None, device=None):
    S = n_keys or n_queries
    rel = (torch.arange(S, device=device)[None, :] - torch.arange(n_queries, device=device)[:, None] - (S - n_queries))
    b = alibi_slopes(n_head, dtype=torch.float64, device=device).view(-1, 1, 1) * rel.double()
    return b.to(dtype or torch.get_default_dtype())
'''

_ALIBI_LIBRARY = '''from handson.nn.positional_encoding import alibi_bias, alibi_slopes
'''

_AT_EINSUM = '''def rope_cos_sin_at(positions, head_dim, base=10000.0, *, scaling=1.0, dtype=None):
    freqs = torch.pow(torch.tensor(base, dtype=torch.float64, device=positions.device),
                      -torch.arange(0, head_dim, 2, device=positions.device).double() / head_dim)
    ang = torch.einsum("...,k->...k", positions.double() / scaling, freqs)
    ang = torch.cat((ang, ang), dim=-1)
    out = dtype if dtype is not None else torch.get_default_dtype()
    return ang.cos().to(out), ang.sin().to(out)
'''

_MOD_OWN_SOFTMAX = '''class RotarySelfAttention(nn.Module):
    def __init__(self, d_model, n_head, base=10000.0, *, bias=True):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError("n_head must divide d_model")
        if (d_model // n_head) % 2 != 0:
            raise ValueError("head_dim must be even")
        self.h, self.d, self.base = n_head, d_model // n_head, base
        for name in "qkvo":
            setattr(self, name, nn.Linear(d_model, d_model, bias=bias))

    def forward(self, x, positions=None, attn_mask=None, past_kv=None):
        B, L, _ = x.shape
        heads = lambda t: t.reshape(B, L, self.h, self.d).permute(0, 2, 1, 3)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        start = past_kv[0].shape[2] if past_kv is not None else 0
        pos = torch.arange(start, start + L, device=x.device) if positions is None else positions
        cos, sin = rope_cos_sin_at(pos, self.d, self.base, dtype=x.dtype)
        if pos.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if past_kv is not None:
            k = torch.cat((past_kv[0], k), 2)
            v = torch.cat((past_kv[1], v), 2)
        S = k.shape[2]
        allowed = torch.arange(S, device=x.device) <= torch.arange(L, device=x.device)[:, None] + (S - L)
        if attn_mask is not None:
            allowed = allowed & attn_mask
        scores = torch.einsum("bhld,bhsd->bhls", q, k) / math.sqrt(self.d)
        scores = torch.where(allowed, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=x.device))
        w = torch.softmax(scores, dim=-1)
        w = torch.where(allowed.any(-1, keepdim=True), w, torch.zeros((), dtype=w.dtype, device=x.device))
        out = torch.einsum("bhls,bhsd->bhld", w, v).permute(0, 2, 1, 3).reshape(B, L, self.h * self.d)
        return self.o(out), (k, v)
'''


def _rewrite(name, cell, source, why):
    """A control that replaces the whole answer cell."""
    return control(name, cell, (_SOLUTION[cell], source), why)


CONTROLS = [
    _rewrite("sinusoidal_stack_flatten", SIN, _SIN_STACK, "sin and cos stacked then flattened, exp/log frequencies"),
    _rewrite("rope_explicit_halves", ROPE, _ROPE_EXPLICIT, "einsum angles, repeat(1, 2), the rotation written per half"),
    _rewrite("alibi_reference_get_slopes", ALIBI, _ALIBI_REFERENCE, "the authors' recursive get_slopes"),
    _rewrite("alibi_from_library", ALIBI, _ALIBI_LIBRARY, "the library's functions, which the release allows"),
    _rewrite("rope_at_einsum_pow", AT, _AT_EINSUM, "torch.pow on a base tensor and an einsum over any leading shape"),
    _rewrite("module_own_softmax", MOD, _MOD_OWN_SOFTMAX, "its own masked softmax with torch.where, setattr layers"),
]

CHAPTER_AS_ANSWER = {
    SIN: chapter_code("positional_encoding", "sinusoidal_encoding"),
    ROPE: chapter_code("positional_encoding", "rope_cos_sin", "rotate_half", "apply_rope"),
    ALIBI: chapter_code("positional_encoding", "alibi_slopes", "alibi_bias"),
}
