"""handson.exercise_checks.tokenization: the references are right, and each check passes on correct
code and fails, with its diagnosis, on a bug."""

from __future__ import annotations

import codecs

import pytest

from handson.exercise_checks import tokenization as x
from handson.nn import tokenization as lib

TEXT = "The loop runs while the condition holds; the else clause runs after it. " * 3 + "naïve café 😀"


def test_unicode_strings_deterministic_and_awkward():
    a, b = x.unicode_strings(50, seed=1), x.unicode_strings(50, seed=1)
    assert a == b and a != x.unicode_strings(50, seed=2)
    joined = "".join(x.unicode_strings(300, seed=0))
    assert any(ord(c) > 0xFFFF for c in joined)           # astral plane
    assert "\u0301" in joined and "\u200d" in joined       # combining mark, zero-width joiner
    joined.encode("utf-8")                                 # no lone surrogates


def test_reference_train_fixtures():
    assert x.reference_train("aaabdaaabac", 3, None) == {(97, 97): 256, (256, 97): 257, (257, 98): 258}
    assert x.reference_train("aaaaa", 2) == {(97, 97): 256, (256, 256): 257}
    assert x.reference_train("x", 5) == {}
    # the tokenizers Rust test's words: r+e, then a+re, i+s are the first merges (ties by first seen here)
    sennrich = "low " * 5 + "lower " * 2 + "newest " * 6 + "widest " * 3
    lists = {r: list(x.reference_train(sennrich, 10, r"\w+", ties=r)) for r in x.TIES}
    assert lists["first"][0] == (101, 115)                 # e s, seen before s t
    assert lists["greatest"][0] == (115, 116)              # s t > e s
    assert len({tuple(v) for v in lists.values()}) == 3
    # specials are cut out: no merge learns from them
    m = x.reference_train("ab<|x|>ab<|x|>", 5, specials=["<|x|>"])
    assert m == {(97, 98): 256}


def test_reference_train_matches_library():
    for n in (10, 60):
        tok = lib.BPETokenizer().train(TEXT, 256 + n)
        assert tok.merges == x.reference_train(TEXT, n)


def test_reference_encode_and_stream():
    tok = lib.BPETokenizer(special_tokens={"<|e|>": 400}).train(TEXT, 256 + 40 + 1)
    for s in [TEXT, "while<|e|>the 😀"] + x.unicode_strings(40, seed=3):
        assert x.reference_encode(s, tok.merges, specials=tok.special_tokens) == tok.encode(s)
    toy = {(98, 99): 256, (97, 98): 257}
    assert x.reference_encode("abc", toy, None) == [97, 256]
    assert x.reference_encode("abc", toy, None, leftmost=True) == [257, 99]
    vocab = tok.vocab
    ids = list("€".encode()) + [97]
    assert x.reference_stream(vocab, ids) == ["", "", "€", "a"]
    assert x.reference_stream(vocab, ids[:2]) == ["", "", "\ufffd"]
    assert "".join(x.reference_stream(vocab, [0xFF, 97])) == tok.decode([0xFF, 97])


def test_pair_counts_and_merge_checks():
    x.check_pair_counts(lib.get_pair_counts)
    x.check_merge(lib.merge)

    def no_overlap(ids, counts=None):
        counts = {} if counts is None else counts
        i = 0
        while i + 1 < len(ids):
            counts[(ids[i], ids[i + 1])] = counts.get((ids[i], ids[i + 1]), 0) + 1
            i += 2 if ids[i] == ids[i + 1] else 1
        return counts

    with pytest.raises(AssertionError, match="overlapping pairs"):
        x.check_pair_counts(no_overlap)
    with pytest.raises(AssertionError, match="same dict"):
        x.check_pair_counts(lambda ids, counts=None: lib.get_pair_counts(ids))

    def keep_second(ids, pair, new_id):
        out, i = [], 0
        while i < len(ids):
            if ids[i:i + 2] == list(pair):
                out.append(new_id)
            else:
                out.append(ids[i])
            i += 1
        return out

    with pytest.raises(AssertionError, match="skip both ids"):
        x.check_merge(keep_second)
    with pytest.raises(AssertionError, match="left to right"):
        x.check_merge(lambda ids, pair, new_id: lib.merge(ids[::-1], pair[::-1], new_id)[::-1])


class _Wrong(lib.BPETokenizer):
    """The library's tokenizer with one choice changed, to see the checks' diagnoses."""

    mode = ""

    def train(self, text, vocab_size):
        if self.mode == "no pretokens":
            self._split = None
        if self.mode == "specials":
            vocab_size += len(self.special_tokens)   # as if vocab_size did not count them
        super().train(text, vocab_size)
        return self

    def encode(self, text):
        if self.mode == "leftmost":
            ids = []
            for pre in self._pretokens(text):
                ids += x._encode_piece(pre.encode(), self.merges, leftmost=True)
            return ids
        return super().encode(text)

    def decode(self, ids):
        if self.mode == "strict":
            return b"".join(self.vocab[i] for i in ids).decode("utf-8")
        return super().decode(ids)


def _wrong(mode):
    return type("W", (_Wrong,), {"mode": mode})


def test_train_checks():
    tok = x.check_train(lib.BPETokenizer, TEXT, 256 + 30)
    x.check_vocab(tok)
    x.check_no_cross_pretoken(tok, TEXT)
    with pytest.raises(AssertionError, match="cross pre-token boundaries"):
        x.check_train(_wrong("no pretokens"), TEXT, 256 + 30)
    with pytest.raises(AssertionError, match="special tokens count in vocab_size"):
        x.check_train(_wrong("specials"), TEXT, 256 + 30 + 2, specials={"<|a|>": 400, "<|b|>": 401})
    with pytest.raises(AssertionError, match="check its signature"):
        x.check_train(lib.BPETokenizer, TEXT, 256 + 5, ties="smallest")
    with pytest.raises(AssertionError, match="spans two pre-tokens"):
        x.check_no_cross_pretoken(lib.BPETokenizer(pattern=None).train(TEXT, 256 + 30), TEXT)


def test_encode_decode_checks():
    tok = lib.BPETokenizer().train(TEXT, 256 + 40)
    x.check_encode(tok, [TEXT, "the else"])
    x.check_roundtrip(tok, x.unicode_strings(50))
    x.check_decode_replaces(tok)
    bad = _wrong("leftmost")()
    bad.merges = {(98, 99): 256, (97, 98): 257}
    with pytest.raises(AssertionError, match="position in the text"):
        x.check_encode(bad, ["abc"])
    strict = _wrong("strict")().train(TEXT, 256 + 40)
    with pytest.raises(AssertionError, match='errors="replace"'):
        x.check_decode_replaces(strict)


class _Full(lib.BPETokenizer):
    """A correct answer to the exercise's extra parts, built on the library (for the checks' tests)."""

    def encode(self, text, allowed_special="none_raise"):
        if allowed_special == "all":
            return super().encode(text)
        if allowed_special in ("none", "none_raise"):
            if allowed_special == "none_raise" and any(s in text for s in self.special_tokens):
                raise ValueError("special token in text")
            return self.encode_ordinary(text)
        if isinstance(allowed_special, set):
            if allowed_special - set(self.special_tokens):
                raise ValueError("unknown special")
            sub = lib.BPETokenizer(self.pattern, {s: self.special_tokens[s] for s in allowed_special})
            sub.merges = self.merges
            return sub.encode(text)
        raise ValueError(allowed_special)

    def encode_ordinary(self, text):
        sub = lib.BPETokenizer(self.pattern)
        sub.merges = self.merges
        return sub.encode(text)

    def decode_stream(self, ids):
        vocab = self.vocab
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in ids:
            yield dec.decode(vocab[i])
        tail = dec.decode(b"", final=True)
        if tail:
            yield tail


def test_specials_and_stream_checks():
    specials = {"<|a|>": 300, "<|a|><|b|>": 301, "<|b|>": 302}
    x.check_specials(_Full, specials, TEXT, 256 + 44 + 3, ["x<|a|><|b|>y<|b|>", "plain", "<|a|>"])
    with pytest.raises(AssertionError, match="check its signature"):
        x.check_specials(lib.BPETokenizer, specials, TEXT, 256 + 44 + 3, ["x<|a|>"])
    tok = _Full().train(TEXT, 256 + 40)
    euro = list("€".encode())
    x.check_stream(tok, [tok.encode("café 😀"), euro[:2], [0x80, 97]])
    x.check_stream_lazy(tok, tok.encode("café 😀"))

    class Eager(_Full):
        def decode_stream(self, ids):
            yield from super().decode_stream(list(ids))

    class NoFlush(_Full):
        def decode_stream(self, ids):
            vocab, dec = self.vocab, codecs.getincrementaldecoder("utf-8")(errors="replace")
            for i in ids:
                yield dec.decode(vocab[i])

    with pytest.raises(AssertionError, match="must stream"):
        x.check_stream_lazy(Eager().train(TEXT, 256 + 40), tok.encode("café 😀"))
    with pytest.raises(AssertionError, match="flush"):
        x.check_stream(NoFlush().train(TEXT, 256 + 40), [euro[:2]])


def test_hygiene_checks():
    x.check_not_library(type("Own", (), {}), lib.BPETokenizer)
    with pytest.raises(AssertionError, match="subclass"):
        x.check_not_library(_Full, lib.BPETokenizer)
