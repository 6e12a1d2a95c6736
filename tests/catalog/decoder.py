"""Plausible mistakes in the decoder exercise (decoder layer, GPT, generation with top-k / top-p / stop
tokens, the parameter formula, the next-token loss), each a small edit of the solution; correct answers
in other styles (CONTROLS); and the chapter's code pasted as the answer, which must score at most a third."""

from support import bug, chapter_code, control, solution_cells

LAYER, GPT, GEN, NP, LOSS = "layer", "gpt", "generate", "num_params", "loss"

_MASK = "        mask = causal if attn_mask is None else attn_mask & causal\n"
_CAUSAL = "        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()\n"
_SELF = "        x = self._sublayer(x, lambda h: self.self_attn(h, mask)[0], self.norm1)\n"
_CROSS = "        x = self._sublayer(x, lambda h: self.cross_attn(h, memory_mask, context=memory)[0], self.norm2)\n"
_FF3 = "        return self._sublayer(x, self.ff, self.norm3)\n"
_PRE = "            return x + self.dropout(f(norm(x)))\n"
_TIE = "        if tie_weights:\n            self.lm_head.weight = self.tok_emb.weight\n"
_GREEDY = "        if temperature == 0:\n            next_id = logits.argmax(dim=-1, keepdim=True)\n"
_TEMP = "            logits = logits / temperature\n"
_TOPK = "                kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]\n"
_SOFT = "            probs = torch.softmax(logits, dim=-1)\n"
_KEEP = "                keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)\n"
_DRAW = "            next_id = torch.multinomial(probs, 1, generator=generator)\n"
_FILL = "            next_id = next_id.masked_fill(finished[:, None], eos_id)\n"
_STOP = "        if eos_id is not None and bool(finished.all()):\n            break\n"

BUGS = [
    # -- the decoder layer: masks
    bug("no_causal_mask", LAYER, (_MASK, "        mask = attn_mask\n"),
        "forgets the causal mask: every query sees the future (pytorch/tutorials #2478's copying model)",
        ["test_layer", "test_gpt"], diagnosis="not causal"),
    bug("causal_mask_pytorch_convention", LAYER, (_CAUSAL, _CAUSAL.replace(".tril()", ".triu(1)")),
        "builds PyTorch's True = ignore causal mask and passes it where True = may attend",
        ["test_layer", "test_gpt"], diagnosis="inverted"),
    bug("causal_mask_hides_diagonal", LAYER, (_CAUSAL, _CAUSAL.replace(".tril()", ".tril(-1)")),
        "masks the diagonal too: a query may not see itself", ["test_layer"], diagnosis="hides the diagonal"),
    bug("attn_mask_ignored", LAYER, (_MASK, "        mask = causal\n"),
        "drops the target's padding mask", ["test_layer"], diagnosis="attn_mask is ignored"),
    bug("attn_mask_or", LAYER, (_MASK, _MASK.replace("attn_mask & causal", "attn_mask | causal")),
        "combines the padding mask with the causal mask by OR: padding re-opens the future",
        ["test_layer"], diagnosis="by OR"),
    bug("memory_mask_ignored", LAYER, (_CROSS, _CROSS.replace("self.cross_attn(h, memory_mask, context=memory)",
                                                              "self.cross_attn(h, context=memory)")),
        "never passes memory_mask: the decoder reads the source's padding", ["test_layer"],
        diagnosis="memory_mask is ignored"),
    bug("memory_mask_pytorch_convention", LAYER,
        (_CROSS, _CROSS.replace("memory_mask, context", "None if memory_mask is None else ~memory_mask, context")),
        "negates memory_mask as if it were PyTorch's key_padding_mask", ["test_layer"],
        diagnosis="memory_mask is inverted"),
    # -- the decoder layer: what attends to what
    bug("cross_attention_to_x", LAYER, (_CROSS, _CROSS.replace("context=memory", "context=h")),
        "the cross-attention attends to the decoder's own input: self-attention twice", ["test_layer"],
        diagnosis="come from x instead of memory"),
    bug("memory_normalised", LAYER, (_CROSS, _CROSS.replace("context=memory", "context=self.norm2(memory)")),
        "applies the decoder's pre-LN norm to the memory as well as to the queries", ["test_layer"],
        diagnosis="normalised by the decoder's norm2"),
    bug("norm2_norm3_swapped", LAYER, [(_CROSS, _CROSS.replace("self.norm2)", "self.norm3)")),
                                       (_FF3, _FF3.replace("self.norm3", "self.norm2"))],
        "uses norm3 before the cross-attention and norm2 before the feed-forward", ["test_layer"],
        diagnosis="norm2 and norm3 are swapped"),
    bug("cross_before_self", LAYER,
        (_SELF + "        if self.cross_attn is None:\n            return self._sublayer(x, self.ff, self.norm2)\n" + _CROSS,
         "        if self.cross_attn is None:\n" + "    " + _SELF
         + "            return self._sublayer(x, self.ff, self.norm2)\n"
         + _CROSS.replace("self.norm2)", "self.norm1)") + _SELF.replace("self.norm1)", "self.norm2)")),
        "runs the cross-attention before the self-attention", ["test_layer"], diagnosis="wrong order"),
    bug("norm_first_ignored", LAYER, ("        if self.norm_first:\n", "        if True:\n"),
        "always pre-LN, whatever norm_first says", ["test_layer"], diagnosis="norm placement is swapped"),
    bug("activation_ignored", LAYER, ("FeedForward(d_model, d_ff, activation, dropout)",
                                      "FeedForward(d_model, d_ff, \"relu\", dropout)"),
        "the feed-forward is always ReLU (the encoder's default) although the decoder's default is GELU",
        ["test_layer"], diagnosis="uses relu although"),
    bug("no_residual_pre_ln", LAYER, (_PRE, "            return self.dropout(f(norm(x)))\n"),
        "forgets the residual connection of pre-LN sublayers", ["test_layer"], diagnosis="the residuals"),
    bug("norm3_always", LAYER, ("self.norm3 = LayerNorm(d_model) if cross_attention else None",
                                "self.norm3 = LayerNorm(d_model)"),
        "builds a third norm in a decoder-only block (an unused parameter)", ["test_layer"],
        diagnosis="norm3 must be None"),
    bug("cross_shares_self_attention", LAYER,
        ("self.cross_attn = MultiHeadAttention(d_model, n_head, dropout=dropout) if cross_attention else None",
         "self.cross_attn = self.self_attn if cross_attention else None"),
        "reuses the self-attention module as the cross-attention: one set of weights for both", ["test_layer"],
        diagnosis="shares its parameters"),
    bug("memory_not_required", LAYER,
        ("        if (memory is None) != (self.cross_attn is None):\n"
         "            raise ValueError(\"memory is required by a layer with cross-attention, and only by one\")\n", ""),
        "a cross-attention layer called without memory is not refused (it fails later, or attends to nothing)",
        ["test_layer"], diagnosis="should raise ValueError"),
    # -- the GPT
    bug("no_final_norm", GPT, ("        return self.lm_head(self.norm(x))\n", "        return self.lm_head(x)\n"),
        "builds the final norm but never applies it", ["test_gpt"], diagnosis="final LayerNorm"),
    bug("lm_head_bias", GPT, ("nn.Linear(d_model, vocab_size, bias=False)", "nn.Linear(d_model, vocab_size)"),
        "gives the tied head a bias", ["test_gpt"], diagnosis="lm_head has a bias"),
    bug("tie_by_copy", GPT, (_TIE, "        if tie_weights:\n            with torch.no_grad():\n"
                                   "                self.lm_head.weight.copy_(self.tok_emb.weight)\n"),
        "ties by copying the values: two tensors that training makes drift apart", ["test_gpt"],
        diagnosis="a copy"),
    bug("tied_always", GPT, (_TIE, _TIE.replace("if tie_weights:", "if True:")),
        "ties the head even when tie_weights=False", ["test_gpt"], diagnosis="tie only when asked"),
    bug("never_tied", GPT, (_TIE, ""), "forgets to tie the head", ["test_gpt"], diagnosis="is not tok_emb.weight"),
    bug("blocks_one_module", GPT, ("nn.ModuleList([DecoderLayer(d_model, n_head, d_ff, dropout) for _ in range(n_layers)])",
                                   "nn.ModuleList([DecoderLayer(d_model, n_head, d_ff, dropout)] * n_layers)"),
        "repeats one block n_layers times: the layers share their weights", ["test_gpt"],
        diagnosis="one module repeated"),
    bug("post_ln_blocks", GPT, ("DecoderLayer(d_model, n_head, d_ff, dropout) for",
                                "DecoderLayer(d_model, n_head, d_ff, dropout, norm_first=False) for"),
        "stacks post-LN blocks under GPT-2's final norm", ["test_gpt"], diagnosis="post-LN"),
    bug("no_positions", GPT, ("self.tok_emb(idx) + self.pos_emb(positions)", "self.tok_emb(idx)"),
        "never adds the position embedding: the model cannot tell positions apart", ["test_gpt"],
        diagnosis="position embedding is not added"),
    bug("positions_from_one", GPT, ("torch.arange(L, device=idx.device)", "torch.arange(1, L + 1, device=idx.device)"),
        "numbers the positions from 1", ["test_gpt"], diagnosis="off by one"),
    bug("tokens_scaled", GPT, ("self.tok_emb(idx) + self.pos_emb", "self.tok_emb(idx) * math.sqrt(self.pos_emb.embedding_dim) + self.pos_emb"),
        "scales the token embeddings by sqrt(d_model) as Vaswani et al. do, which GPT-2 does not", ["test_gpt"],
        diagnosis="sqrt(d_model)"),
    bug("max_len_not_checked", GPT, ("        if L > self.max_len:\n            raise ValueError(f\"{L} tokens exceed max_len={self.max_len}\")\n", ""),
        "lets the embedding lookup fail with an IndexError instead of a clear ValueError", ["test_gpt"],
        diagnosis="should raise ValueError"),
    # -- generate: context and greedy
    bug("no_crop", GEN, ("model(idx[:, -model.max_len:])", "model(idx)"),
        "feeds the whole sequence: past max_len the model fails (or its positions run out)",
        ["test_generate"], diagnosis="crop the context"),
    bug("crop_keeps_first", GEN, ("model(idx[:, -model.max_len:])", "model(idx[:, :model.max_len])"),
        "crops to the first max_len tokens: generation freezes on the prompt", ["test_generate"],
        diagnosis="first max_len tokens"),
    bug("first_position_logits", GEN, ("[:, -1, :]", "[:, 0, :]"),
        "samples from the first position's logits", ["test_generate"], diagnosis="first position"),
    bug("greedy_by_sampling", GEN, (_GREEDY, "        if temperature == 0:\n            next_id = torch.multinomial("
                                             "torch.softmax(logits / 1e-9, dim=-1), 1, generator=generator)\n"),
        "makes greedy decoding a sample at a tiny temperature: it draws random numbers", ["test_generate"],
        diagnosis="temperature 0 is greedy"),
    bug("temperature_zero_divides", GEN, ("        if temperature == 0:\n", "        if False:\n"),
        "divides by a temperature of 0 (inf and NaN logits)", ["test_generate"], diagnosis="used as a divisor"),
    # -- generate: temperature and top-k
    bug("temperature_after_softmax", GEN, [(_TEMP, ""), (_SOFT, "            probs = torch.softmax(logits, dim=-1) / temperature\n")],
        "divides the probabilities by the temperature: multinomial renormalises, so it has no effect",
        ["test_generate"], diagnosis="has no effect"),
    bug("temperature_multiplied", GEN, (_TEMP, "            logits = logits * temperature\n"),
        "multiplies the logits by the temperature", ["test_generate"], diagnosis="multiplied"),
    bug("top_k_plus_one", GEN, (_TOPK, _TOPK.replace("min(top_k, ", "min(top_k + 1, ")),
        "keeps k + 1 tokens", ["test_generate"], diagnosis="k + 1"),
    bug("top_k_drops_kth", GEN, ("logits.masked_fill(logits < kth, ", "logits.masked_fill(logits <= kth, "),
        "filters with <= and drops the k-th token itself (top_k=1 keeps nothing)", ["test_generate"],
        diagnosis="k - 1 tokens"),
    bug("softmax_over_batch", GEN, (_SOFT, "            probs = torch.softmax(logits, dim=0)\n"),
        "normalises over the batch", ["test_generate"], diagnosis="wrong dimension"),
    bug("global_generator", GEN, (_DRAW, "            next_id = torch.multinomial(probs, 1)\n"),
        "ignores the generator: the global random state decides and is changed", ["test_generate"],
        diagnosis="global random generator"),
    # -- generate: top-p
    bug("top_p_drops_crossing_token", GEN, (_KEEP, _KEEP.replace("before < top_p", "before + sorted_probs <= top_p")),
        "keeps only the tokens whose cumulative probability stays within top_p, dropping the one that crosses it",
        ["test_top_p"], diagnosis="crosses the threshold"),
    bug("top_p_before_temperature", GEN,
        [(_TEMP, ""), ("                probs = probs.masked_fill(~keep, 0.0)\n",
                       "                probs = probs.masked_fill(~keep, 0.0)\n"
                       "            probs = torch.softmax(torch.log(probs) / temperature, dim=-1)\n")],
        "filters the nucleus on the untempered distribution and applies the temperature afterwards",
        ["test_top_p"], diagnosis="before the temperature"),
    bug("top_p_ignored", GEN, ("            if top_p is not None and top_p < 1.0:\n", "            if False:\n"),
        "accepts top_p but never filters", ["test_top_p"], diagnosis="other tokens than the reference"),
    bug("top_p_least_probable", GEN, ("torch.sort(probs, dim=-1, descending=True)", "torch.sort(probs, dim=-1)"),
        "sorts in increasing order: the nucleus is built from the least probable tokens", ["test_top_p"],
        diagnosis="other tokens than the reference"),
    # -- generate: stop tokens
    bug("eos_rows_continue", GEN, (_FILL, ""), "a finished row goes on generating", ["test_eos"],
        diagnosis="kept generating"),
    bug("eos_never_stops", GEN, (_STOP, ""), "runs all max_new_tokens steps after every row finished",
        ["test_eos"], diagnosis="did not stop"),
    bug("eos_stops_at_first_row", GEN, (_STOP, _STOP.replace("finished.all()", "finished.any()")),
        "stops as soon as one row has finished", ["test_eos"], diagnosis="every row has produced eos_id"),
    # -- the parameter formula
    bug("params_no_biases", NP, ("    attention = 2 * (d * d + d) + 2 * (d * kv + kv)",
                                 "    attention = 2 * (d * d) + 2 * (d * kv)"),
        "forgets the attention biases", ["test_num_params"], diagnosis="for GPT-2 small gives"),
    bug("params_untied_same", NP, ("    return total if tie_weights else total + vocab_size * d\n", "    return total\n"),
        "ignores tie_weights", ["test_num_params"], diagnosis="untied head adds"),
    bug("params_gqa_ignored", NP, ("    kv = d if n_kv_head is None else n_kv_head * (d // n_head)", "    kv = d"),
        "counts full-width keys and values with grouped-query attention", ["test_num_params"],
        diagnosis="n_kv_head * (d_model // n_head)"),
    bug("params_final_norm_missing", NP, (" + 2 * d\n    return", "\n    return"),
        "forgets the final LayerNorm", ["test_num_params"], diagnosis="for GPT-2 small gives"),
    bug("params_by_building", NP,
        ("    d = d_model\n",
         "    m = handson.nn.decoder.GPT(vocab_size, max_len, d_model, n_head or 1, n_layers, d_ff,\n"
         "                               tie_weights=tie_weights, n_kv_head=n_kv_head)\n"
         "    return sum(p.numel() for p in m.parameters())\n    d = d_model\n"),
        "builds the model to count it (175 billion parameters for GPT-3)", ["test_num_params"],
        diagnosis="ran tensor operations"),
    # -- the loss
    bug("loss_not_shifted", LOSS, ("idx[:, 1:].reshape(-1)", "idx[:, :-1].reshape(-1)"),
        "predicts each token from itself (targets not shifted)", ["test_loss"], diagnosis="not shifted"),
    bug("loss_shift_wrong_way", LOSS, [("logits = model(idx[:, :-1])", "logits = model(idx[:, 1:])"),
                                       ("idx[:, 1:].reshape(-1)", "idx[:, :-1].reshape(-1)")],
        "shifts the wrong way: each position predicts the token before it", ["test_loss"],
        diagnosis="wrong way"),
    bug("loss_summed", LOSS, ("idx[:, 1:].reshape(-1))", "idx[:, 1:].reshape(-1), reduction=\"sum\")"),
        "sums the loss over the tokens", ["test_loss"], diagnosis="summed"),
    bug("loss_detached", LOSS, ("logits = model(idx[:, :-1])", "logits = model(idx[:, :-1]).detach()"),
        "detaches the logits: nothing would train", ["test_loss"], diagnosis="detached"),
]

_RESIDUAL_LAYER = '''from handson.nn.normalization import residual


class DecoderLayer(nn.Module):
    def __init__(self, d_model, n_head, d_ff, dropout=0.0, norm_first=True, cross_attention=False,
                 activation="gelu"):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout=dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_head, dropout=dropout) if cross_attention else None
        self.ff = FeedForward(d_model, d_ff, activation, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model) if cross_attention else None
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x, memory=None, attn_mask=None, memory_mask=None):
        if self.cross_attn is not None and memory is None:
            raise ValueError("this layer attends to memory: pass it")
        if self.cross_attn is None and memory is not None:
            raise ValueError("a decoder-only layer takes no memory")
        x = residual(x, lambda h: self.dropout1(self.self_attn(h, attn_mask, is_causal=True,
                                                               need_weights=False)[0]),
                     self.norm1, self.norm_first)
        if self.cross_attn is not None:
            x = residual(x, lambda h: self.dropout2(self.cross_attn(h, memory_mask, context=memory)[0]),
                         self.norm2, self.norm_first)
            return residual(x, lambda h: self.dropout3(self.ff(h)), self.norm3, self.norm_first)
        return residual(x, lambda h: self.dropout2(self.ff(h)), self.norm2, self.norm_first)
'''

_OWN_ATTENTION_LAYER = '''class Attention(nn.Module):
    def __init__(self, d_model, n_head, dropout):
        super().__init__()
        self.n_head, self.p = n_head, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x, context, allowed):
        B, L, D = x.shape
        split = lambda t: t.view(B, -1, self.n_head, D // self.n_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)),
                                             attn_mask=allowed, dropout_p=self.p if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, L, D))


class DecoderLayer(nn.Module):
    def __init__(self, d_model, n_head, d_ff, dropout=0.0, norm_first=True, cross_attention=False,
                 activation="gelu"):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(d_model, n_head, dropout)
        self.cross_attn = Attention(d_model, n_head, dropout) if cross_attention else None
        self.ff = nn.Module()
        self.ff.linear1, self.ff.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.act = F.gelu if activation == "gelu" else F.relu
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model) if cross_attention else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory=None, attn_mask=None, memory_mask=None):
        if (memory is None) != (self.cross_attn is None):
            raise ValueError("memory iff cross_attention")
        L = x.size(1)
        i = torch.arange(L, device=x.device)
        allowed = i[None, :] <= i[:, None]
        if attn_mask is not None:
            allowed = torch.logical_and(allowed, attn_mask)
        steps = [(lambda h: self.self_attn(h, h, allowed), self.norm1)]
        if self.cross_attn is not None:
            steps.append((lambda h: self.cross_attn(h, memory, memory_mask), self.norm2))
        ff = lambda h: self.ff.linear2(self.drop(self.act(self.ff.linear1(h))))
        steps.append((ff, self.norm3 if self.cross_attn is not None else self.norm2))
        for f, norm in steps:
            x = x + self.drop(f(norm(x))) if self.norm_first else norm(x + self.drop(f(x)))
        return x
'''

_GPT_STYLE = '''class GPT(nn.Module):
    def __init__(self, vocab_size, max_len, d_model, n_head, n_layers, d_ff, dropout=0.0, tie_weights=True):
        super().__init__()
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList()
        for _ in range(n_layers):
            self.blocks.append(DecoderLayer(d_model, n_head, d_ff, dropout=dropout))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.tok_emb.weight = self.lm_head.weight          # tied the other way round: still one Parameter

    def forward(self, idx):
        if idx.shape[1] > self.max_len:
            raise ValueError("sequence longer than max_len")
        x = self.drop(self.tok_emb(idx) + self.pos_emb.weight[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))
'''

_GENERATE_STYLE = '''def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, *, top_p=None,
             eos_id=None):
    done = None
    for step in range(max_new_tokens):
        with torch.no_grad():
            z = model(idx[:, max(0, idx.size(1) - model.max_len):])[:, -1]
        if temperature == 0:
            tok = torch.argmax(z, dim=-1)
        else:
            p = F.softmax(z / temperature, dim=-1)
            if top_k is not None and top_k < p.size(-1):
                vals, ids = p.topk(top_k, dim=-1)
                p = torch.zeros_like(p).scatter(-1, ids, vals)          # zero outside the top k
                p = p / p.sum(dim=-1, keepdim=True)                      # top-p reads the renormalised mass
            if top_p is not None and top_p < 1:
                ps, order = p.sort(dim=-1, descending=True)
                excl = torch.cumsum(ps, dim=-1) - ps
                ps = torch.where(excl < top_p, ps, torch.zeros_like(ps))
                p = torch.zeros_like(p).scatter(-1, order, ps)
            tok = torch.multinomial(p, num_samples=1, generator=generator).squeeze(-1)
        if eos_id is not None:
            done = torch.zeros_like(tok, dtype=torch.bool) if done is None else done
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            done = done | tok.eq(eos_id)
        idx = torch.cat((idx, tok.unsqueeze(-1)), dim=-1)
        if done is not None and done.all():
            break
    return idx
'''

_NP_STYLE = '''def gpt_num_params(vocab_size, max_len, d_model, n_layers, d_ff, tie_weights=True, *, n_head=None,
                   n_kv_head=None):
    head_dim = d_model // n_head if n_head else d_model
    kv_width = d_model if n_kv_head is None else n_kv_head * head_dim
    linear = lambda n_in, n_out, bias=True: n_in * n_out + (n_out if bias else 0)
    layer_norm = 2 * d_model
    block = (linear(d_model, d_model) * 2 + linear(d_model, kv_width) * 2
             + linear(d_model, d_ff) + linear(d_ff, d_model) + 2 * layer_norm)
    head = 0 if tie_weights else linear(d_model, vocab_size, bias=False)
    return vocab_size * d_model + max_len * d_model + n_layers * block + layer_norm + head
'''

_LOSS_STYLE = '''def next_token_loss(model, idx):
    logits = model(idx)[:, :-1]                      # a causal model: position i only saw tokens 0..i
    return F.cross_entropy(logits.transpose(1, 2), idx[:, 1:])
'''

_SOLUTION = solution_cells("decoder")


def _rewrite(name, cell, source, why):
    """A control that replaces the whole answer cell."""
    return control(name, cell, (_SOLUTION[cell], source), why)


CONTROLS = [
    _rewrite("layer_with_residual_and_is_causal", LAYER, _RESIDUAL_LAYER,
            "the library's residual and MultiHeadAttention(is_causal=True), nn.LayerNorm, three dropouts"),
    _rewrite("layer_with_own_attention", LAYER, _OWN_ATTENTION_LAYER,
            "an own attention module on F.scaled_dot_product_attention, an arange causal mask, a loop over sublayers"),
    _rewrite("gpt_tied_other_way", GPT, _GPT_STYLE,
            "ties tok_emb.weight = lm_head.weight, slices pos_emb.weight, nn.LayerNorm"),
    _rewrite("generate_zeroing_probabilities", GEN, _GENERATE_STYLE,
            "filters by zeroing probabilities after the softmax (top-k by scatter), torch.where for stop tokens"),
    _rewrite("params_with_helpers", NP, _NP_STYLE, "a per-layer helper for Linear sizes"),
    _rewrite("loss_on_full_logits", LOSS, _LOSS_STYLE,
            "runs the model on all tokens and drops the last position's logits; class axis moved"),
]

_IMPORTS = ('from handson.nn.encoder import FeedForward\nfrom handson.nn.normalization import LayerNorm, residual\n'
            'from handson.nn.positional_encoding import apply_rope, rope_cos_sin\n\n\n')

CHAPTER_AS_ANSWER = {
    LAYER: _IMPORTS + chapter_code("decoder", "DecoderLayer"),
    GPT: _IMPORTS + chapter_code("decoder", "GPT"),
    GEN: chapter_code("decoder", "sample_next", "generate"),
}
