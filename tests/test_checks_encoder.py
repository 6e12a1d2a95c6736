"""Unit tests of handson.exercise_checks.encoder: the library's encoder passes every check, and
small broken variants fail with the sentence that names their mistake."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from handson.exercise_checks import encoder as xchecks
from handson.nn.encoder import Encoder, EncoderLayer, FeedForward

f64 = dict(dtype=torch.float64)


def _x(B=3, L=5, d=8, seed=0):
    return torch.randn(B, L, d, generator=torch.Generator().manual_seed(seed), **f64)


def _key_mask(lengths, L):
    return (torch.arange(L) < torch.tensor(lengths)[:, None])[:, None, None, :]


def test_library_feedforward_passes():
    xchecks.check_feedforward(FeedForward)


class _TanhFF(FeedForward):
    def forward(self, x):
        h = self.linear1(x)
        h = F.relu(h) if self.activation == "relu" else F.gelu(h, approximate="tanh")
        return self.linear2(self.dropout(h))


class _DropAfterFF(FeedForward):
    def forward(self, x):
        h = self.linear1(x)
        h = F.relu(h) if self.activation == "relu" else F.gelu(h)
        return self.dropout(self.linear2(h))


@pytest.mark.parametrize("cls, phrase", [(_TanhFF, "tanh approximation"), (_DropAfterFF, "after linear2")])
def test_feedforward_mistakes_are_named(cls, phrase):
    with pytest.raises(AssertionError, match=phrase):
        xchecks.check_feedforward(cls)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_library_layer_and_encoder_match_torch(norm_first, activation):
    torch.manual_seed(0)
    layer = EncoderLayer(8, 2, 16, norm_first=norm_first, activation=activation).double()
    xchecks.check_layer_matches_torch(layer, _x(), _key_mask([5, 3, 1], 5), n_head=2, d_ff=16,
                                      norm_first=norm_first, activation=activation)
    enc = Encoder(2, 8, 2, 16, norm_first=norm_first, activation=activation).double()
    xchecks.check_encoder_matches_torch(enc, _x(), None, n_layers=2, n_head=2, d_ff=16,
                                        norm_first=norm_first, activation=activation)


class _SwappedLayer(EncoderLayer):
    def forward(self, x, attn_mask=None):
        self.norm_first = not self.norm_first
        try:
            return super().forward(x, attn_mask)
        finally:
            self.norm_first = not self.norm_first


class _InvertedMaskLayer(EncoderLayer):
    def forward(self, x, attn_mask=None):
        return super().forward(x, None if attn_mask is None else ~attn_mask)


@pytest.mark.parametrize("cls, phrase", [(_SwappedLayer, "norm placement is swapped"),
                                         (_InvertedMaskLayer, "mask is inverted")])
def test_layer_mistakes_are_named(cls, phrase):
    torch.manual_seed(1)
    layer = cls(8, 2, 16).double()
    with pytest.raises(AssertionError, match=phrase):
        xchecks.check_layer_matches_torch(layer, _x(), _key_mask([5, 3, 1], 5), n_head=2, d_ff=16,
                                          norm_first=False, activation="relu")


def test_shared_layers_and_final_norm_are_named():
    torch.manual_seed(2)
    enc = Encoder(2, 8, 2, 16).double()
    enc.layers = nn.ModuleList([enc.layers[0]] * 2)
    with pytest.raises(AssertionError, match="one module object"):
        xchecks.check_encoder_matches_torch(enc, _x(), None, n_layers=2, n_head=2, d_ff=16, norm_first=False,
                                            activation="relu")
    enc = Encoder(2, 8, 2, 16, norm_first=True).double()
    enc.norm = None
    with pytest.raises(AssertionError, match="has no final norm"):
        xchecks.check_encoder_matches_torch(enc, _x(), None, n_layers=2, n_head=2, d_ff=16, norm_first=True,
                                            activation="relu")


def test_padding_and_dropout_checks():
    torch.manual_seed(3)
    enc = Encoder(2, 8, 2, 16, norm_first=True).double().eval()
    xchecks.check_padding_invariance(enc, _x(L=6), torch.tensor([6, 4, 1]))
    xchecks.check_dropout_train_only(lambda p: Encoder(2, 8, 2, 16, dropout=p), _x())

    class NoMask(Encoder):
        def forward(self, x, attn_mask=None):
            return super().forward(x)

    with pytest.raises(AssertionError, match="padded positions"):
        xchecks.check_padding_invariance(NoMask(2, 8, 2, 16).double().eval(), _x(L=6), torch.tensor([6, 4, 1]))


def _load(encoder, t):
    pairs = []
    for mine, theirs in zip(encoder.layers, t.layers):
        a = mine.self_attn
        for lin, w, b in zip((a.q, a.k, a.v), theirs.self_attn.in_proj_weight.chunk(3),
                             theirs.self_attn.in_proj_bias.chunk(3)):
            pairs += [(lin.weight, w), (lin.bias, b)]
        pairs += [(a.o.weight, theirs.self_attn.out_proj.weight), (a.o.bias, theirs.self_attn.out_proj.bias)]
        for m, n in [(mine.ff.linear1, theirs.linear1), (mine.ff.linear2, theirs.linear2),
                     (mine.norm1, theirs.norm1), (mine.norm2, theirs.norm2)]:
            pairs += [(m.weight, n.weight), (m.bias, n.bias)]
    if encoder.norm is not None:
        pairs += [(encoder.norm.weight, t.norm.weight), (encoder.norm.bias, t.norm.bias)]
    with torch.no_grad():
        for p, s in pairs:
            p.copy_(s)


def test_check_loaded():
    t = xchecks.random_torch_encoder(2, 8, 2, 16, norm_first=True, activation="gelu", seed=1)
    enc = Encoder(2, 8, 2, 16, norm_first=True, activation="gelu").double()
    ids = {n: id(p) for n, p in enc.named_parameters()}
    _load(enc, t)
    xchecks.check_loaded(enc, t, ids)
    with torch.no_grad():                                    # q and k swapped in layer 0
        q, k = enc.layers[0].self_attn.q.weight, enc.layers[0].self_attn.k.weight
        tmp = q.clone()
        q.copy_(k)
        k.copy_(tmp)
    with pytest.raises(AssertionError, match=r"cat\(\[W_q, W_k, W_v\]\)"):
        xchecks.check_loaded(enc, t, ids)


def test_padding_mask_and_classifier_checks():
    xchecks.check_padding_mask(lambda lengths, L: (torch.arange(L) < lengths[:, None])[:, None, None, :])
    with pytest.raises(AssertionError, match="inverted"):
        xchecks.check_padding_mask(lambda lengths, L: (torch.arange(L) >= lengths[:, None])[:, None, None, :])

    class Classifier(nn.Module):
        def __init__(self, pool_all=False):
            super().__init__()
            self.pool_all = pool_all
            self.tok_emb, self.pos_emb = nn.Embedding(11, 8), nn.Embedding(8, 8)
            self.encoder = Encoder(2, 8, 2, 16, norm_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, idx, lengths):
            L = idx.size(1)
            if L > 8:
                raise ValueError("too long")
            real = torch.arange(L) < lengths[:, None]
            h = self.encoder(self.tok_emb(idx) + self.pos_emb(torch.arange(L)), real[:, None, None, :])
            if self.pool_all:
                return self.head(h.mean(1))
            return self.head((h * real[..., None]).sum(1) / real.sum(1, keepdim=True))

    torch.manual_seed(4)
    idx, lengths = torch.randint(0, 10, (3, 6)), torch.tensor([6, 3, 1])
    model = Classifier().double()
    xchecks.check_classifier_pooling(model, idx, lengths, max_len=8)
    xchecks.check_classifier_padding(model, idx, lengths, pad_id=10, extra=2)
    with pytest.raises(AssertionError, match="padding included"):
        xchecks.check_classifier_pooling(Classifier(pool_all=True).double(), idx, lengths, max_len=8)
