"""Plausible mistakes in the normalization exercise, each a small edit of the solution; correct answers
in other styles (CONTROLS); and the chapter's LayerNorm, RMSNorm and residual pasted as answers, which
must score at most a third (they know one feature dimension only, and nothing of Gemma's norm or of
a stack)."""

from support import bug, control, chapter_code

LN, RMS, GEMMA, RES, STACK = "layernorm", "rmsnorm", "gemma", "residual", "stack"
T_LN, T_RMS, T_SHAPE, T_GEMMA, T_RES, T_STACK = ("test_layernorm", "test_rmsnorm", "test_normalized_shape",
                                                 "test_gemma", "test_residual", "test_stack")

_DIMS = "        dims = tuple(range(-k, 0))\n"
_LN_VAR = "        var = (x - mean).pow(2).mean(dim=dims, keepdim=True)\n"
_LN_Y = "        y = (x - mean) / torch.sqrt(var + self.eps)\n"
_CHECK = ("        if x.dim() < k or tuple(x.shape[-k:]) != self.normalized_shape:\n"
          "            raise ValueError(f\"input of shape {tuple(x.shape)} does not end with {self.normalized_shape}\")\n")
_ONES = "        self.weight = nn.Parameter(torch.ones(self.normalized_shape))\n"
_RMS_EPS = "        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps\n"
_RMS_RET = "        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps) * self.weight\n"
_GEMMA_RET = "        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + self.eps) * (1 + self.weight)\n"
_PRE = "        return x + sublayer(norm(x))\n"
_POST = "    return norm(x + sublayer(x))\n"
_FINAL = "    if final_norm is not None:\n        x = final_norm(x)\n"
_POST_FINAL = ("    if final_norm is not None and not norm_first:\n"
               "        raise ValueError(\"a post-LN stack already ends with a norm: a final norm would be two norms in a row\")\n")
_LEN = ("    if len(sublayers) != len(norms):\n"
        "        raise ValueError(f\"{len(sublayers)} sublayers for {len(norms)} norms\")\n")

BUGS = [
    # -- LayerNorm: the statistics
    bug("unbiased_variance", LN, (_LN_VAR, "        var = x.var(dim=dims, keepdim=True)\n"),
        "torch.var's default is the unbiased variance (divided by d - 1); LayerNorm divides by d",
        [T_LN, T_SHAPE], diagnosis="unbiased variance"),
    bug("annotated_transformer_std", LN, (_LN_Y, "        y = (x - mean) / (x.std(dim=dims, keepdim=True) + self.eps)\n"),
        "the Annotated Transformer's LayerNorm: unbiased std, eps added outside the square root",
        [T_LN, T_SHAPE], diagnosis="Annotated Transformer"),
    bug("eps_outside_sqrt", LN, (_LN_Y, "        y = (x - mean) / (torch.sqrt(var) + self.eps)\n"),
        "adds eps to the standard deviation instead of the variance", [T_LN, T_SHAPE],
        diagnosis="eps outside the square root"),
    bug("eps_ignored", LN, (_LN_Y, "        y = (x - mean) / torch.sqrt(var)\n"),
        "forgets eps (a constant row then divides by zero)", [T_LN, T_SHAPE], diagnosis="eps is ignored"),
    bug("eps_hardcoded", LN, (_LN_Y, "        y = (x - mean) / torch.sqrt(var + 1e-5)\n"),
        "writes the default 1e-5 into forward: a different eps passed to the constructor is ignored",
        [T_LN], diagnosis="eps fixed at 1e-5"),
    bug("stats_over_batch_too", LN, (_DIMS, "        dims = (0,) + tuple(range(-k, 0))\n"),
        "takes the statistics over the batch dimension as well (BatchNorm-like): examples mix",
        [T_LN, T_SHAPE], diagnosis="batch dimension"),
    bug("stats_over_positions_too", LN, (_DIMS, "        dims = (-k - 1,) + tuple(range(-k, 0))\n"),
        "takes the statistics over the positions as well: tokens see each other (and the future)",
        [T_LN, T_SHAPE], diagnosis="positions (sequence dimension)"),
    bug("last_dim_only", LN, (_DIMS, "        dims = (-1,)\n"),
        "normalises over the last dimension whatever normalized_shape says (the chapter's LayerNorm)",
        [T_SHAPE], diagnosis="last dimension only"),
    bug("weight_not_applied", LN, ("        y = y * self.weight\n", ""),
        "creates the gain but never multiplies by it", [T_LN, T_SHAPE], diagnosis="weight (gain) is not applied"),
    bug("bias_not_added", LN, ("            y = y + self.bias\n", "            y = y\n"),
        "creates the shift but never adds it", [T_LN, T_SHAPE], diagnosis="bias (shift) is not added"),
    bug("bias_created_when_false", LN, ("            self.bias = None\n",
                                        "            self.bias = nn.Parameter(torch.zeros(self.normalized_shape))\n"),
        "ignores bias=False and creates a (zero) bias anyway", [T_LN], diagnosis="bias was created when bias=False"),
    bug("weight_init_zeros", LN, (_ONES, _ONES.replace("torch.ones", "torch.zeros")),
        "initialises the gain at zeros: a fresh LayerNorm outputs its bias only", [T_LN, T_SHAPE],
        diagnosis="initialised wrong"),
    bug("weight_init_randn", LN, (_ONES, _ONES.replace("torch.ones", "torch.randn")),
        "initialises the gain randomly, like a linear layer's weight", [T_LN, T_SHAPE], diagnosis="initialised wrong"),
    bug("weight_not_a_parameter", LN, (_ONES, "        self.weight = torch.ones(self.normalized_shape)\n"),
        "stores the gain as a plain tensor: not learned, not saved, not moved by .to()", [T_LN, T_SHAPE],
        diagnosis="no nn.Parameter named weight"),
    bug("float32_arithmetic", LN, [(_DIMS + "        mean", _DIMS + "        dtype, x = x.dtype, x.float()\n        mean"),
                                   ("        return y\n", "        return y.to(dtype)\n")],
        "computes in float32 and casts back: float64 inputs lose their precision", [T_LN, T_SHAPE],
        diagnosis="float32"),
    bug("inplace_centring", LN, [(_LN_VAR + _LN_Y, "        x -= mean\n        var = x.pow(2).mean(dim=dims, keepdim=True)\n"
                                                   "        y = x / torch.sqrt(var + self.eps)\n")],
        "centres the caller's tensor in place with -=", [T_LN, T_SHAPE], diagnosis="modified in place"),
    bug("inplace_divide_saved_tensor", LN, [(_LN_VAR + _LN_Y, "        xc = x - mean\n"
                                                               "        var = xc.pow(2).mean(dim=dims, keepdim=True)\n"
                                                               "        xc /= torch.sqrt(var + self.eps)\n"
                                                               "        y = xc\n")],
        "divides the centred tensor in place after pow(2) saved it for backward: the forward is right, "
        "backward() raises", [T_LN, T_SHAPE], diagnosis="modified in place"),
    bug("no_shape_validation", LN, (_CHECK, ""),
        "never checks that x ends with normalized_shape", [T_SHAPE], diagnosis="instead of ValueError"),
    bug("delegates_to_f_layer_norm", LN, (_DIMS, "        return F.layer_norm(x, self.normalized_shape, self.weight, "
                                                 "self.bias, self.eps)\n" + _DIMS),
        "calls F.layer_norm, which the exercise asks to write", [T_LN, T_SHAPE], diagnosis="calls F.layer_norm"),
    # -- RMSNorm
    bug("rms_subtracts_mean", RMS, (_RMS_RET, "        x = x - x.mean(dim=dims, keepdim=True)\n" + _RMS_RET),
        "centres x first: that is LayerNorm without the bias, not RMSNorm", [T_RMS, T_SHAPE],
        diagnosis="the mean is subtracted"),
    bug("rms_eps_1e6", RMS, (_RMS_EPS, _RMS_EPS.replace("torch.finfo(x.dtype).eps", "1e-6")),
        "eps=None taken as Llama's 1e-6 instead of finfo(x.dtype).eps", [T_RMS, T_SHAPE],
        diagnosis="eps fixed at 1e-06"),
    bug("rms_eps_1e5", RMS, (_RMS_EPS, _RMS_EPS.replace("torch.finfo(x.dtype).eps", "1e-5")),
        "eps=None taken as LayerNorm's 1e-5", [T_RMS, T_SHAPE], diagnosis="eps fixed at 1e-05"),
    bug("rms_eps_float32_finfo", RMS, (_RMS_EPS, _RMS_EPS.replace("torch.finfo(x.dtype)", "torch.finfo(torch.float32)")),
        "uses float32's machine epsilon whatever the input's dtype", [T_RMS],
        diagnosis="float32's machine epsilon"),
    bug("rms_l2_norm", RMS, (_RMS_RET, _RMS_RET.replace("x.pow(2).mean(", "x.pow(2).sum(")),
        "divides by the L2 norm (sum of squares) instead of the root mean square", [T_RMS, T_SHAPE],
        diagnosis="L2 norm"),
    bug("rms_eps_outside_sqrt", RMS, (_RMS_RET, "        return x / (x.pow(2).mean(dim=dims, keepdim=True).sqrt() + eps) * self.weight\n"),
        "adds eps to the root mean square instead of the mean square", [T_RMS], diagnosis="eps outside the square root"),
    bug("rms_weight_not_applied", RMS, (_RMS_RET, _RMS_RET.replace(" * self.weight", "")),
        "never multiplies by the gain", [T_RMS, T_SHAPE], diagnosis="weight (gain) is not applied"),
    bug("rms_last_dim_only", RMS, (_DIMS, "        dims = (-1,)\n"),
        "normalises over the last dimension whatever normalized_shape says", [T_SHAPE], diagnosis="last dimension only"),
    bug("rms_stats_over_batch", RMS, (_DIMS, "        dims = (0,) + tuple(range(-k, 0))\n"),
        "takes the mean square over the batch too", [T_RMS, T_SHAPE], diagnosis="batch dimension"),
    bug("rms_weight_init_zeros", RMS, (_ONES, _ONES.replace("torch.ones", "torch.zeros")),
        "initialises the gain at zeros (Gemma's convention without Gemma's 1 + w)", [T_RMS, T_SHAPE],
        diagnosis="initialised wrong"),
    bug("rms_with_bias", RMS, (_ONES, _ONES + "        self.bias = nn.Parameter(torch.zeros(self.normalized_shape))\n"),
        "gives RMSNorm a bias parameter, which nn.RMSNorm does not have", [T_RMS, T_SHAPE],
        diagnosis="a bias was created"),
    bug("rms_float32_like_llama", RMS, (_RMS_RET, "        h = x.float()\n"
                                                   "        h = h * torch.rsqrt(h.pow(2).mean(dim=dims, keepdim=True) + eps)\n"
                                                   "        return h.to(x.dtype) * self.weight\n"),
        "computes in float32 and casts back, as Hugging Face's Llama does", [T_RMS, T_SHAPE], diagnosis="float32"),
    bug("rms_delegates_to_f_rms_norm", RMS, (_RMS_RET, "        return F.rms_norm(x, self.normalized_shape, self.weight, eps)\n"),
        "calls F.rms_norm, which the exercise asks to write", [T_RMS, T_SHAPE], diagnosis="calls F.rms_norm"),
    # -- Gemma's RMSNorm
    bug("gemma_gain_without_one", GEMMA, (_GEMMA_RET, _GEMMA_RET.replace("(1 + self.weight)", "self.weight")),
        "multiplies by weight instead of 1 + weight: a fresh module outputs zeros", [T_GEMMA],
        diagnosis="instead of (1 + self.weight)"),
    bug("gemma_weight_init_ones", GEMMA, ("        self.weight = nn.Parameter(torch.zeros(self.normalized_shape))\n",
                                          "        self.weight = nn.Parameter(torch.ones(self.normalized_shape))\n"),
        "initialises Gemma's weight at ones: the fresh gain is 2", [T_GEMMA], diagnosis="initialised wrong"),
    bug("gemma_eps_finfo", GEMMA, (_GEMMA_RET, _GEMMA_RET.replace("+ self.eps)", "+ torch.finfo(x.dtype).eps)")),
        "uses nn.RMSNorm's default eps instead of Gemma's 1e-6", [T_GEMMA], diagnosis="nn.RMSNorm's default"),
    bug("gemma_float32", GEMMA, (_GEMMA_RET, "        h = x.float()\n"
                                             "        h = h * torch.rsqrt(h.pow(2).mean(dim=dims, keepdim=True) + self.eps)\n"
                                             "        return (h * (1 + self.weight.float())).to(x.dtype)\n"),
        "computes in float32 and casts back, as Hugging Face's Gemma does", [T_GEMMA], diagnosis="float32"),
    # -- residual
    bug("pre_post_swapped", RES, ("    if norm_first:\n", "    if not norm_first:\n"),
        "swaps the two arrangements", [T_RES], diagnosis="pre/post order is swapped"),
    bug("norm_on_branch_output", RES, (_PRE, "        return x + norm(sublayer(x))\n"),
        "normalises the sublayer's output instead of its input", [T_RES], diagnosis="residual branch output"),
    bug("residual_from_normalised_x", RES, (_PRE, "        x = norm(x)\n        return x + sublayer(x)\n"),
        "overwrites x with norm(x), so the identity path carries the normalised x", [T_RES],
        diagnosis="starts from the normalised x"),
    bug("post_ln_without_norm", RES, (_POST, "    return x + sublayer(x)\n"),
        "forgets the norm in the post-LN branch", [T_RES], diagnosis="norm is never applied"),
    bug("inplace_residual_add", RES, (_PRE, "        x += sublayer(norm(x))\n        return x\n"),
        "adds the branch into the caller's tensor with +=", [T_RES], diagnosis="modified in place"),
    bug("sublayer_called_twice", RES, (_POST, "    branch = sublayer(x)\n    return norm(x + sublayer(x))\n"),
        "calls the sublayer twice (a leftover debug line): with dropout the two calls differ", [T_RES],
        diagnosis="exactly once"),
    # -- residual_stack
    bug("final_norm_never_applied", STACK, (_FINAL, ""),
        "accepts final_norm but never applies it", [T_STACK], diagnosis="final norm 0 times"),
    bug("final_norm_after_every_block", STACK, [(_FINAL, ""),
                                                ("        x = residual(x, sublayer, norm, norm_first)\n",
                                                 "        x = residual(x, sublayer, norm, norm_first)\n"
                                                 "        if final_norm is not None:\n            x = final_norm(x)\n")],
        "applies the final norm after every sub-block", [T_STACK], diagnosis="final norm"),
    bug("post_ln_final_norm_allowed", STACK, (_POST_FINAL, ""),
        "accepts a final norm after post-LN sub-blocks: two norms in a row (pytorch #74092)", [T_STACK],
        diagnosis="two norms in a row"),
    bug("no_length_check", STACK, (_LEN, ""),
        "zip silently drops the unpaired sublayers", [T_STACK], diagnosis="2 sublayers for 1 norm"),
    bug("stack_reversed", STACK, ("zip(sublayers, norms)", "zip(reversed(sublayers), reversed(norms))"),
        "runs the sub-blocks from the last to the first", [T_STACK], diagnosis="reverse order"),
    bug("stack_always_pre_ln", STACK, ("residual(x, sublayer, norm, norm_first)", "residual(x, sublayer, norm, True)"),
        "ignores norm_first: every sub-block pre-LN", [T_STACK], diagnosis="nn.TransformerEncoder"),
    bug("stack_library_residual", STACK, ("        x = residual(x, sublayer, norm, norm_first)\n",
                                          "        x = handson.nn.normalization.residual(x, sublayer, norm, norm_first)\n"),
        "calls the library's residual instead of its own", [T_STACK], diagnosis="calls the library's residual"),
]

CONTROLS = [
    control("ln_var_correction_rsqrt_register", LN,
            [(_LN_VAR, "        var = x.var(dim=dims, keepdim=True, correction=0)\n"),
             (_LN_Y, "        y = (x - mean) * torch.rsqrt(var + self.eps)\n"),
             ("            self.bias = None\n", "            self.register_parameter(\"bias\", None)\n")],
            "torch.var with correction=0, rsqrt, and register_parameter('bias', None) as nn.LayerNorm does"),
    control("ln_flatten_var_mean", LN,
            [(_DIMS + "        mean = x.mean(dim=dims, keepdim=True)\n" + _LN_VAR + _LN_Y,
              "        flat = x.flatten(x.dim() - k)\n"
              "        var, mean = torch.var_mean(flat, dim=-1, keepdim=True, unbiased=False)\n"
              "        y = ((flat - mean) / (var + self.eps).sqrt()).view(x.shape)\n")],
            "flattens the normalised dims into one and uses torch.var_mean(unbiased=False)"),
    control("ln_upcasts_half_only", LN,
            [(_DIMS + "        mean", _DIMS + "        dtype = x.dtype\n"
                                            "        if dtype in (torch.float16, torch.bfloat16):\n"
                                            "            x = x.float()\n        mean"),
             ("        return y\n", "        return y.to(dtype)\n")],
            "computes half-precision inputs in float32 (as fused kernels do), float32 and float64 in their own dtype"),
    control("rms_square_sqrt_divide", RMS,
            [(_RMS_RET, "        rms = torch.sqrt(x.square().mean(dim=dims, keepdim=True) + eps)\n"
                        "        return self.weight * (x / rms)\n")],
            "x.square(), an explicit sqrt and a division, the weight multiplied first"),
    control("gemma_weight_add_one", GEMMA,
            [(_GEMMA_RET, "        scale = self.weight + 1.0\n"
                          "        ms = torch.mean(x * x, dim=dims, keepdim=True)\n"
                          "        return scale * x / torch.sqrt(ms + self.eps)\n")],
            "the gain computed as weight + 1.0, the mean square as mean(x * x)"),
    control("residual_conditional_expression", RES,
            [("    if norm_first:\n" + _PRE + _POST,
              "    return x + sublayer(norm(x)) if norm_first else norm(x + sublayer(x))\n")],
            "one conditional expression"),
    control("stack_inline_loop_index", STACK,
            [("    for sublayer, norm in zip(sublayers, norms):\n        x = residual(x, sublayer, norm, norm_first)\n",
              "    for i in range(len(sublayers)):\n"
              "        if norm_first:\n"
              "            x = x + sublayers[i](norms[i](x))\n"
              "        else:\n"
              "            x = norms[i](x + sublayers[i](x))\n")],
            "the sub-blocks written inline with an index loop, no call to residual"),
]

# The chapter's code pasted into the answer cells: its LayerNorm (one feature dimension), RMSNorm and
# residual, unchanged; nothing for Gemma's RMSNorm or the stack, which the chapter does not build.
CHAPTER_AS_ANSWER = {
    LN: chapter_code("normalization", "LayerNorm"),
    RMS: chapter_code("normalization", "RMSNorm"),
    RES: chapter_code("normalization", "residual"),
}
