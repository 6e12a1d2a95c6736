"""The decoder exercise's checks: they accept the library's (correct) code and name the cause of a mistake."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from handson.exercise_checks import decoder as xchecks
from handson.nn.decoder import GPT, DecoderLayer, generate

f64 = dict(dtype=torch.float64)


def _layer(**kw):
    torch.manual_seed(0)
    return DecoderLayer(16, 4, 24, **kw).double()


def test_layer_matches_pytorch_with_and_without_cross_attention():
    x, mem = torch.randn(2, 5, 16, **f64), torch.randn(2, 6, 16, **f64)
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[1, ..., 4:] = False
    for nf in [True, False]:
        cross = _layer(norm_first=nf, cross_attention=True, activation="relu")
        xchecks.check_layer_structure(cross, 16, 24, cross_attention=True)
        xchecks.check_decoder_layer(cross, x, mem, pad, n_head=4, norm_first=nf, activation="relu")
        block = _layer(norm_first=nf)
        xchecks.check_decoder_layer(block, x, n_head=4, norm_first=nf, activation="gelu",
                                    attn_mask=torch.ones(2, 1, 1, 5, dtype=torch.bool))


class _NotCausal(DecoderLayer):
    def _self_attention(self, h, attn_mask, cache, layer, rope):
        return self.self_attn(h, attn_mask)[0]


class _MemoryAsX(DecoderLayer):
    def _cross_attention(self, h, memory, memory_mask):
        return self.cross_attn(h, None, context=h)[0]


def test_layer_diagnoses():
    x, mem = torch.randn(2, 5, 16, **f64), torch.randn(2, 6, 16, **f64)
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="not causal"):
        xchecks.check_decoder_layer(_NotCausal(16, 4, 24).double(), x, n_head=4, norm_first=True, activation="gelu")
    with pytest.raises(AssertionError, match="instead of memory"):
        xchecks.check_decoder_layer(_MemoryAsX(16, 4, 24, cross_attention=True).double(), x, mem, n_head=4,
                                    norm_first=True, activation="gelu")
    with pytest.raises(AssertionError, match="norm placement"):
        xchecks.check_decoder_layer(_layer(norm_first=False), x, n_head=4, norm_first=True, activation="gelu")
    with pytest.raises(AssertionError, match="norm3 must be None"):
        layer = _layer()
        layer.norm3 = nn.LayerNorm(16)
        xchecks.check_layer_structure(layer, 16, 24, cross_attention=False)


def test_gpt_checks():
    torch.manual_seed(0)
    m = GPT(11, 8, 16, 4, 2, 24).double()
    xchecks.check_gpt_structure(m, 11, 8, 16, 2, 24, tie_weights=True)
    idx = torch.randint(0, 11, (2, 8))
    xchecks.check_gpt_forward(m, idx)
    xchecks.check_no_token_leakage(m, idx)
    xchecks.check_param_count(m, xchecks.gpt_params_reference(11, 8, 16, 2, 24))
    assert xchecks.gpt_params_reference(50257, 1024, 768, 12, 3072) == 124_439_808
    g = GPT(11, 8, 16, 4, 2, 24, n_kv_head=2)
    assert sum(p.numel() for p in g.parameters()) == xchecks.gpt_params_reference(11, 8, 16, 2, 24, n_head=4, n_kv_head=2)
    copied = GPT(11, 8, 16, 4, 2, 24, tie_weights=False)
    with torch.no_grad():
        copied.lm_head.weight.copy_(copied.tok_emb.weight)
    with pytest.raises(AssertionError, match="a copy"):
        xchecks.check_gpt_structure(copied, 11, 8, 16, 2, 24, tie_weights=True)
    with pytest.raises(AssertionError, match="final LayerNorm"):
        xchecks.check_gpt_forward(_NoFinalNorm(11, 8, 16, 4, 2, 24).double(), idx)


class _NoFinalNorm(GPT):
    def forward(self, idx, cache=None, *, attn_mask=None, positions=None):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def _generate_global(model, idx, n, temperature=1.0, top_k=None, generator=None):
    return generate(model, idx, n, temperature, top_k, None)


def test_generate_checks():
    torch.manual_seed(0)
    bigram = xchecks.BigramLM(torch.randn(7, 7, **f64) * 2, max_len=4)
    prompt = torch.randint(0, 7, (8, 2))
    xchecks.check_generate(generate, bigram, prompt, 6, seed=None, temperature=0)
    xchecks.check_generate(generate, bigram, prompt, 6, temperature=0.5, top_k=3)
    xchecks.check_generate(xchecks.reference_generate, bigram, prompt, 6, top_p=0.7, eos_id=2)
    windowed = xchecks.ContextSumLM(torch.randn(7, 7, **f64), max_len=3)
    xchecks.check_generate(generate, windowed, prompt, 5, seed=None, temperature=0)
    with pytest.raises(ValueError, match="max_len"):
        windowed(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(AssertionError, match="global random generator"):
        xchecks.check_generate(_generate_global, bigram, prompt, 3)
    with pytest.raises(AssertionError, match="k \\+ 1"):
        xchecks.check_generate(lambda *a, **k: xchecks.reference_generate(*a, **k, k_off=1), bigram, prompt, 6,
                               top_k=3)


def test_formula_and_loss_checks():
    assert xchecks.check_no_tensor_work(lambda a: a * 2, 3) == 6
    with pytest.raises(AssertionError, match="ran tensor operations"):
        xchecks.check_no_tensor_work(lambda: int(torch.ones(2).sum()))
    bigram = xchecks.BigramLM(torch.randn(5, 5, **f64), max_len=8)
    idx = torch.randint(0, 5, (2, 6))

    def loss(model, i):
        logits = model(i[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 5), i[:, 1:].reshape(-1))

    def unshifted(model, i):
        logits = model(i[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 5), i[:, :-1].reshape(-1))

    xchecks.check_next_token_loss(loss, bigram, idx)
    with pytest.raises(AssertionError, match="not shifted"):
        xchecks.check_next_token_loss(unshifted, bigram, idx)
