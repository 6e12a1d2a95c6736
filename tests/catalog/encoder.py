"""Plausible mistakes in the encoder exercise, each one a small edit of the solution; correct answers
in other styles (controls); and the chapter's code pasted as the answer."""

from support import bug, control, chapter_code

ENC, LOAD, CLS = "encoder", "load", "classifier"

ACT = 'h = F.relu(h) if self.activation == "relu" else F.gelu(h)\n'
FF_RET = "return self.linear2(self.dropout(h))"
PRE_ATT = "x = x + self.dropout1(self.self_attn(self.norm1(x), attn_mask)[0])"
PRE_FF = "x = x + self.dropout2(self.ff(self.norm2(x)))"
POST_ATT = "x = self.norm1(x + self.dropout1(self.self_attn(x, attn_mask)[0]))"
POST_FF = "x = self.norm2(x + self.dropout2(self.ff(x)))"
FWD_DOC = '"""x (B, L, d_model); attn_mask bool, True = may attend, broadcastable to (B, n_head, L, L)."""\n'
LAYERS = ("self.layers = nn.ModuleList([EncoderLayer(d_model, n_head, d_ff, dropout, norm_first, activation)\n"
          "                                     for _ in range(n_layers)])")
FINAL = "self.norm = LayerNorm(d_model) if norm_first else None"
APPLY_FINAL = "        if self.norm is not None:\n            x = self.norm(x)\n"
LOOP = "        for layer in self.layers:\n            x = layer(x, attn_mask)\n"
ATTN = "self.self_attn = MultiHeadAttention(d_model, n_head, dropout=dropout)"
FFB = "self.ff = FeedForward(d_model, d_ff, activation, dropout)"

N_CHECK = ('    if len(encoder.layers) != len(torch_encoder.layers):\n'
           '        raise ValueError(f"{len(encoder.layers)} layers cannot hold {len(torch_encoder.layers)}")\n')
NF_CHECK = ('        if mine.norm_first != theirs.norm_first:\n'
            '            raise ValueError("the norm placements differ (norm_first)")\n')
ACT_CHECK = ('        if {"relu": 1, "gelu": 2}[mine.ff.activation] != theirs.activation_relu_or_gelu:\n'
             '            raise ValueError("the activations differ")\n')
NORM_CHECK = ('    if (encoder.norm is None) != (torch_encoder.norm is None):\n'
              '        raise ValueError("a final norm on one side only")\n')
SHAPE_CHECK = ('    for p, src in pairs:\n'
               '        if p.shape != src.shape:\n'
               '            raise ValueError(f"shapes differ: {tuple(p.shape)} and {tuple(src.shape)}")\n')
COPY = "    with torch.no_grad():\n        for p, src in pairs:\n            p.copy_(src)\n"
QKV = "for lin, wi, bi in zip((a.q, a.k, a.v), w, b):"
QKV_PAIRS = "pairs += [(lin.weight, wi), (lin.bias, bi)]"
FINAL_PAIRS = ("    if encoder.norm is not None:\n"
               "        pairs += [(encoder.norm.weight, torch_encoder.norm.weight), (encoder.norm.bias, torch_encoder.norm.bias)]\n")
LOOP_PAIRS = "    for mine, theirs in zip(encoder.layers, torch_encoder.layers):\n        a, t = mine.self_attn, theirs.self_attn\n"

MASK = "return (torch.arange(L, device=lengths.device) < lengths[:, None])[:, None, None, :]"
POOL = "pooled = (h * real).sum(1) / real.sum(1)"
ENCODE = "h = self.encoder(x, mask)"
EMBED = "x = self.tok_emb(idx) + self.pos_emb(torch.arange(L, device=idx.device))"
LEN_CHECK = ('        if L > self.max_len:\n'
             '            raise ValueError(f"a sequence of {L} tokens is longer than max_len = {self.max_len}")\n')

BUGS = [
    # the feed-forward network
    bug("ff_gelu_tanh", ENC, ("else F.gelu(h)", 'else F.gelu(h, approximate="tanh")'),
        "GPT-2's tanh approximation instead of the exact GELU of nn.TransformerEncoderLayer",
        ["test_feedforward", "test_layer"], diagnosis="tanh approximation"),
    bug("ff_no_activation", ENC, ("        " + ACT, ""), "two linear layers without an activation: one linear map",
        ["test_feedforward", "test_layer"], diagnosis="no activation"),
    bug("ff_activation_ignored", ENC, ('F.relu(h) if self.activation == "relu" else F.gelu(h)', "F.relu(h)"),
        "accepts activation= but always uses the ReLU", ["test_feedforward", "test_layer"],
        diagnosis="ignores activation"),
    bug("ff_activation_after_linear2", ENC, (FF_RET, 'return F.relu(self.linear2(self.dropout(h))) if self.activation == "relu" '
                                                      'else F.gelu(self.linear2(self.dropout(h)))'),
        "applies the activation after the output layer as well", ["test_feedforward", "test_layer"],
        diagnosis="after linear2 as well"),
    bug("ff_dropout_before_activation", ENC,
        [("h = self.linear1(x)\n", "h = self.dropout(self.linear1(x))\n"), (FF_RET, "return self.linear2(h)")],
        "drops linear1's outputs before the GELU (for a ReLU it would be the same)", ["test_feedforward"],
        diagnosis="is it before the activation"),
    bug("ff_dropout_on_input", ENC,
        [("h = self.linear1(x)\n", "h = self.linear1(self.dropout(x))\n"), (FF_RET, "return self.linear2(h)")],
        "drops the input of the feed-forward network instead of its hidden units", ["test_feedforward"],
        diagnosis="applied to the input"),
    bug("ff_dropout_after_linear2", ENC, (FF_RET, "return self.dropout(self.linear2(h))"),
        "drops the output of the feed-forward (the layer already drops the branch) instead of the hidden units",
        ["test_feedforward"], diagnosis="after linear2"),
    bug("ff_dropout_in_eval", ENC, (FF_RET, "return self.linear2(F.dropout(h, self.dropout.p))"),
        "F.dropout without training=self.training: active in evaluation too",
        ["test_feedforward", "test_encoder_properties"], diagnosis="eval mode"),
    bug("ff_dropout_not_rescaled", ENC,
        (FF_RET, "keep = (torch.rand_like(h) >= self.dropout.p) if self.training else torch.ones_like(h, dtype=torch.bool)\n"
                 "        return self.linear2(h * keep)"),
        "a bare random mask without the 1/(1 - p) scaling of inverted dropout", ["test_feedforward"],
        diagnosis="rescaled"),
    # the layer
    bug("norm_placement_swapped", ENC, ("        if self.norm_first:\n", "        if not self.norm_first:\n"),
        "pre-LN and post-LN swapped", ["test_layer", "test_encoder"], diagnosis="norm placement is swapped"),
    bug("norm_on_branch", ENC,
        [(PRE_ATT, "x = x + self.norm1(self.dropout1(self.self_attn(x, attn_mask)[0]))"),
         (PRE_FF, "x = x + self.norm2(self.dropout2(self.ff(x)))")],
        "pre-LN written as x + norm(sublayer(x)): the norm on the branch's output", ["test_layer", "test_encoder"],
        diagnosis="applied to the sub-layer's output"),
    bug("no_residual", ENC,
        [(POST_ATT, "x = self.norm1(self.dropout1(self.self_attn(x, attn_mask)[0]))"),
         (POST_FF, "x = self.norm2(self.dropout2(self.ff(x)))")],
        "post-LN without the residual additions", ["test_layer", "test_encoder"],
        diagnosis="residual connection is missing"),
    bug("residual_of_normed", ENC,
        [(PRE_ATT, "h = self.norm1(x)\n            x = h + self.dropout1(self.self_attn(h, attn_mask)[0])"),
         (PRE_FF, "h = self.norm2(x)\n            x = h + self.dropout2(self.ff(h))")],
        "pre-LN whose residual carries norm(x) instead of x", ["test_layer", "test_encoder"],
        diagnosis="adds norm(x) instead of x"),
    bug("norms_swapped", ENC,
        [(POST_ATT, "x = self.norm2(x + self.dropout1(self.self_attn(x, attn_mask)[0]))"),
         (POST_FF, "x = self.norm1(x + self.dropout2(self.ff(x)))")],
        "norm1 used after the feed-forward and norm2 after the attention", ["test_layer", "test_encoder"],
        diagnosis="norm1 and norm2 are swapped"),
    bug("mask_inverted", ENC, (FWD_DOC, FWD_DOC + "        if attn_mask is not None:\n"
                                        "            attn_mask = ~attn_mask                 # PyTorch's convention\n"),
        "inverts the mask as if it were PyTorch's True = ignore", ["test_layer", "test_encoder"],
        diagnosis="mask is inverted"),
    bug("mask_on_queries", ENC, (FWD_DOC, FWD_DOC + "        if attn_mask is not None:\n"
                                          "            attn_mask = attn_mask.transpose(-1, -2)\n"),
        "turns the key padding mask into a query mask: real queries read the padding",
        ["test_layer", "test_encoder", "test_encoder_properties"], diagnosis="applied to the queries"),
    bug("mask_ignored", ENC, [("self.self_attn(self.norm1(x), attn_mask)[0]", "self.self_attn(self.norm1(x))[0]"),
                              ("self.self_attn(x, attn_mask)[0]", "self.self_attn(x)[0]")],
        "never passes the mask to the attention", ["test_layer", "test_encoder", "test_encoder_properties"],
        diagnosis="attn_mask is ignored"),
    bug("layer_activation_not_passed", ENC, (FFB, "self.ff = FeedForward(d_model, d_ff, dropout=dropout)"),
        "the layer builds a ReLU feed-forward whatever its activation", ["test_layer", "test_encoder"],
        diagnosis="activation argument is ignored"),
    bug("residual_dropout_in_eval", ENC, ("self.dropout1 = nn.Dropout(dropout)", "self.dropout1 = lambda t: F.dropout(t, dropout)"),
        "F.dropout on the attention branch without training=self.training", ["test_encoder_properties"],
        diagnosis="eval mode"),
    bug("dropout_ignored", ENC, [(ATTN, "self.self_attn = MultiHeadAttention(d_model, n_head)"),
                                 (FFB, "self.ff = FeedForward(d_model, d_ff, activation)"),
                                 ("self.dropout1 = nn.Dropout(dropout)", "self.dropout1 = nn.Dropout(0.0)"),
                                 ("self.dropout2 = nn.Dropout(dropout)", "self.dropout2 = nn.Dropout(0.0)")],
        "accepts dropout= but never uses it", ["test_encoder_properties"], diagnosis="deterministic"),
    # the stack
    bug("shared_layers", ENC, (LAYERS, "layer = EncoderLayer(d_model, n_head, d_ff, dropout, norm_first, activation)\n"
                                       "        self.layers = nn.ModuleList([layer] * n_layers)"),
        "one layer object repeated: all layers share their weights", ["test_encoder"], diagnosis="one module object"),
    bug("missing_final_norm", ENC, (FINAL, "self.norm = None"),
        "a pre-LN stack without its final LayerNorm", ["test_encoder"], diagnosis="has no final norm"),
    bug("final_norm_in_post_ln", ENC, (FINAL, "self.norm = LayerNorm(d_model)"),
        "a final norm after post-LN layers: two norms in a row (pytorch #74092)", ["test_encoder"],
        diagnosis="two norms in a row"),
    bug("final_norm_not_applied", ENC, (APPLY_FINAL, ""),
        "builds the final norm but never applies it", ["test_encoder"], diagnosis="final norm is never applied"),
    bug("mask_first_layer_only", ENC, (LOOP, "        for i, layer in enumerate(self.layers):\n"
                                             "            x = layer(x, attn_mask if i == 0 else None)\n"),
        "gives the mask to the first layer only", ["test_encoder", "test_encoder_properties"],
        diagnosis="first layer only"),
    bug("layers_ignored_after_first", ENC, (LOOP, "        x = self.layers[0](x, attn_mask)\n"),
        "runs only the first layer", ["test_encoder"], diagnosis="check the order of the layers"),
    # loading PyTorch's weights
    bug("load_qkv_order", LOAD, (QKV, "for lin, wi, bi in zip((a.k, a.q, a.v), w, b):"),
        "takes the first block of in_proj_weight for the keys", ["test_load"], diagnosis="cat([W_q, W_k, W_v])"),
    bug("load_views", LOAD, (COPY, "    for p, src in pairs:\n        p.data = src.data\n"),
        "p.data = a slice of in_proj_weight: the parameter shares PyTorch's memory", ["test_load", "test_load_copies"],
        diagnosis="shares memory"),
    bug("load_changes_dtype", LOAD, (COPY, "    for p, src in pairs:\n        p.data = src.detach().clone()\n"),
        "replaces the data by a float64 clone: a float32 encoder becomes float64", ["test_load_copies"],
        diagnosis="changed the encoder's dtype"),
    bug("load_new_parameters", LOAD, (COPY, "    for mod in encoder.modules():\n"
                                            "        for name, p in list(mod.named_parameters(recurse=False)):\n"
                                            "            src = next(s for q, s in pairs if q is p)\n"
                                            "            setattr(mod, name, nn.Parameter(src.detach().clone().to(p.dtype)))\n"),
        "replaces the parameter objects: an optimizer built before loading trains the old ones", ["test_load"],
        diagnosis="replaced the parameter object"),
    bug("load_no_bias", LOAD, (QKV_PAIRS, "pairs += [(lin.weight, wi)]"),
        "copies the q, k, v weights but not their biases", ["test_load"], diagnosis="was not copied (biases too"),
    bug("load_no_final_norm", LOAD, (FINAL_PAIRS, ""),
        "forgets the final norm", ["test_load"], diagnosis="final norm"),
    bug("load_layers_reversed", LOAD, (LOOP_PAIRS, LOOP_PAIRS.replace("torch_encoder.layers)", "reversed(torch_encoder.layers))")),
        "pairs layer i with layer n - 1 - i", ["test_load"], diagnosis="holds the weights of layer"),
    bug("load_no_layer_count_check", LOAD, (N_CHECK, ""),
        "zip silently loads the first layers of a deeper or shallower model", ["test_load_errors"],
        diagnosis="3 layers cannot hold 2"),
    bug("load_no_norm_first_check", LOAD, (NF_CHECK, ""),
        "loads a post-LN checkpoint into a pre-LN encoder", ["test_load_errors"],
        diagnosis="post-LN encoder cannot hold a pre-LN"),
    bug("load_no_final_norm_check", LOAD, (NORM_CHECK, ""),
        "loads a post-LN checkpoint with two norms in a row, dropping its final norm", ["test_load_errors"],
        diagnosis="two norms in a row"),
    bug("load_no_activation_check", LOAD, (ACT_CHECK, ""),
        "loads ReLU weights into a GELU encoder", ["test_load_errors"], diagnosis="GELU encoder cannot hold"),
    bug("load_no_shape_check", LOAD, (SHAPE_CHECK, ""),
        "copy_ fails with a RuntimeError (or broadcasts) instead of a ValueError", ["test_load_errors"],
        diagnosis="d_ff = 32 cannot hold d_ff = 16"),
    bug("load_checks_while_copying", LOAD,
        [(SHAPE_CHECK, ""), (COPY, "    with torch.no_grad():\n        for p, src in pairs:\n"
                                   "            if p.shape != src.shape:\n"
                                   "                raise ValueError(\"shapes differ\")\n"
                                   "            p.copy_(src)\n")],
        "checks the shapes while copying: a failing load leaves a half-loaded encoder", ["test_load_errors"],
        diagnosis="before raising"),
    # the classifier
    bug("padding_mask_inverted", CLS, (MASK, MASK.replace("<", ">=")),
        "PyTorch's True = padding", ["test_padding_mask", "test_classifier"], diagnosis="inverted"),
    bug("padding_mask_off_by_one", CLS, (MASK, MASK.replace("<", "<=")),
        "counts position lengths[b] as real", ["test_padding_mask"], diagnosis="one position too many"),
    bug("padding_mask_max_length", CLS, (MASK, "return (torch.arange(int(lengths.max()), device=lengths.device) < lengths[:, None])[:, None, None, :]"),
        "as many columns as the longest sequence instead of L", ["test_padding_mask"], diagnosis="L columns"),
    bug("pool_mean_all", CLS, (POOL, "pooled = h.mean(1)"), "the mean includes the padded positions",
        ["test_classifier", "test_classifier_padding"], diagnosis="padding included"),
    bug("pool_sum", CLS, (POOL, "pooled = (h * real).sum(1)"), "a masked sum, not a mean",
        ["test_classifier"], diagnosis="without dividing"),
    bug("pool_divide_by_L", CLS, (POOL, "pooled = (h * real).sum(1) / L"), "divides by the padded length",
        ["test_classifier", "test_classifier_padding"], diagnosis="divides by L"),
    bug("pool_first_token", CLS, (POOL, "pooled = h[:, 0]"), "CLS pooling without a CLS token",
        ["test_classifier"], diagnosis="CLS pooling"),
    bug("pool_last_position", CLS, (POOL, "pooled = h[:, -1]"), "the last position, padding for short sequences "
        "(LLMs-from-scratch #566)", ["test_classifier", "test_classifier_padding"], diagnosis="last position"),
    bug("classifier_no_mask", CLS, (ENCODE, "h = self.encoder(x)"), "the encoder sees the padding",
        ["test_classifier", "test_classifier_padding"], diagnosis="no padding mask"),
    bug("classifier_query_mask", CLS, (ENCODE, "h = self.encoder(x, mask.transpose(-1, -2))"),
        "the padding mask applied to the queries", ["test_classifier", "test_classifier_padding"],
        diagnosis="applied to the queries"),
    bug("classifier_no_positions", CLS, (EMBED, "x = self.tok_emb(idx)"), "no position embeddings",
        ["test_classifier"], diagnosis="no position embeddings"),
    bug("classifier_no_length_check", CLS, (LEN_CHECK, ""),
        "a too long input fails deep inside nn.Embedding", ["test_classifier_padding"], diagnosis="deep inside"),
]

OWN_MHA = '''
class _SelfAttention(nn.Module):
    def __init__(self, d_model, n_head, dropout=0.0):
        super().__init__()
        self.n_head, self.p = n_head, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x, attn_mask=None):
        B, L, D = x.shape
        q, k, v = (lin(x).view(B, L, self.n_head, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.p if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, L, D)), None

'''

CONTROLS = [
    control("torch_layernorm", ENC, [("self.norm1 = LayerNorm(d_model)", "self.norm1 = nn.LayerNorm(d_model)"),
                                     ("self.norm2 = LayerNorm(d_model)", "self.norm2 = nn.LayerNorm(d_model)"),
                                     (FINAL, "self.norm = nn.LayerNorm(d_model) if norm_first else None")],
            "PyTorch's LayerNorm instead of the book's"),
    control("own_attention_sdpa", ENC, [("class FeedForward(nn.Module):", OWN_MHA + "class FeedForward(nn.Module):"),
                                        (ATTN, "self.self_attn = _SelfAttention(d_model, n_head, dropout)")],
            "a self-written attention with q, k, v, o and F.scaled_dot_product_attention"),
    control("deepcopied_layers", ENC, (LAYERS, "import copy\n"
                                               "        layer = EncoderLayer(d_model, n_head, d_ff, dropout, norm_first, activation)\n"
                                               "        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(n_layers)])"),
            "deep copies of one layer, as nn.TransformerEncoder builds them: independent, equal at the start"),
    control("functional_branches", ENC,
            [(FWD_DOC + "        ### BEGIN SOLUTION\n" if False else FWD_DOC,
              FWD_DOC + "        attend = lambda t: self.dropout1(self.self_attn(t, attn_mask)[0])\n"
                        "        ff = lambda t: self.dropout2(self.ff(t))\n"
                        "        for f, norm in ((attend, self.norm1), (ff, self.norm2)):\n"
                        "            x = x + f(norm(x)) if self.norm_first else norm(x + f(x))\n"
                        "        return x\n")],
            "one loop over the two residual sub-blocks"),
    control("load_state_dict", LOAD,
            (COPY, "    state = {}\n"
                   "    names = {id(p): n for n, p in encoder.named_parameters()}\n"
                   "    for p, src in pairs:\n"
                   "        state[names[id(p)]] = src.detach()\n"
                   "    encoder.load_state_dict(state, strict=False)\n"),
            "a state dict built from PyTorch's tensors, loaded with load_state_dict (which copies in place)"),
    control("mask_and_pool_other_style", CLS,
            [(MASK, "B = lengths.shape[0]\n"
                    "    return (lengths.unsqueeze(-1) > torch.arange(L, device=lengths.device)).view(B, 1, 1, L)"),
             (POOL, "pooled = h.masked_fill(real == 0, 0.0).sum(1) / lengths[:, None].to(h.dtype)")],
            "the mask by comparison the other way round, pooling by masked_fill and the lengths"),
]

CHAPTER_AS_ANSWER = {
    ENC: ("from handson.nn import MultiHeadAttention\nfrom handson.nn.normalization import LayerNorm, residual\n\n\n"
          + chapter_code("encoder", "FeedForward", "EncoderLayer", "Encoder")),
}
