"""The book's library, chapter "Tokenization".

Generated from book/tokenization.ipynb (the cells tagged `export`) by `make library`:
edit the chapter, not this file; `make test` fails when the two disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['GPT2_SPLIT_PATTERN', 'get_pair_counts', 'merge', 'BPETokenizer']


import math
import re

import regex

#: GPT-2's pre-tokenizer (openai/gpt-2 encoder.py): English contractions, runs of letters, runs of
#: digits, runs of other symbols (each optionally after one space), and whitespace. `regex`, not
#: `re`, because `\p{L}` (any letter) and `\p{N}` (any digit) are Unicode classes.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_pair_counts(ids, counts=None):
    """Counts of the adjacent pairs of ``ids``: dict[(int, int), int], added to ``counts`` if given.

    Every position counts, overlapping ones too: ``[a, a, a]`` holds the pair ``(a, a)`` twice.
    The dict is filled in scan order, so its first key is the pair seen first.
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, new_id):
    """``ids`` with every occurrence of ``pair`` replaced by ``new_id``, left to right.

    Occurrences do not overlap: ``[a, a, a]`` with ``(a, a)`` becomes ``[new_id, a]``.
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE as GPT-2: 256 byte tokens, a regex pre-tokenizer, learned merges, specials.

    ``special_tokens`` maps strings to ids (e.g. ``{"<|endoftext|>": 50256}``); they are matched
    in the text before anything else, are never split or merged, and take no part in training.
    ``vocab_size`` counts everything: 256 bytes + the merges + the special tokens.
    """

    def __init__(self, pattern=GPT2_SPLIT_PATTERN, special_tokens=None):
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.merges = {}                      # (id, id) -> new id, in creation order (= rank)
        self._split = regex.compile(pattern) if pattern is not None else None
        self._special_re = None
        if self.special_tokens:               # longest first, so a special inside a longer one loses
            alts = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re = re.compile("(" + "|".join(re.escape(s) for s in alts) + ")")

    @property
    def vocab(self):
        """dict[int, bytes]: the bytes each id stands for (derived from the merges and specials)."""
        vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new_id in self.merges.items():
            vocab[new_id] = vocab[a] + vocab[b]
        for s, i in self.special_tokens.items():
            vocab[i] = s.encode("utf-8")
        return vocab

    def _parts(self, text):
        """The text cut at its special tokens: [ordinary, special, ordinary, ..., ordinary]."""
        return self._special_re.split(text) if self._special_re else [text]

    def _pretokens(self, text):
        """The pre-tokens of a text without special tokens; no merge ever crosses their borders."""
        if self._split is None:
            return [text] if text else []
        return self._split.findall(text)

    def train(self, text, vocab_size):
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        Each step merges the most frequent adjacent pair; on equal counts the pair seen first when
        scanning the text from its start wins (what ``max(counts, key=counts.get)`` picks on counts
        built in scan order). Stops early if no pair is left.
        """
        n_merges = vocab_size - 256 - len(self.special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} < 256 bytes + {len(self.special_tokens)} specials")
        clash = sorted(s for s, i in self.special_tokens.items() if i < 256 + n_merges)
        if clash:
            raise ValueError(f"special tokens {clash} have ids below 256 + {n_merges} merges")
        # Each distinct pre-token once, in order of first appearance, with how often it occurs.
        freq = {}
        for part in self._parts(text)[::2]:   # the ordinary parts: specials are not trained on
            for pre in self._pretokens(part):
                freq[pre] = freq.get(pre, 0) + 1
        words = [list(pre.encode("utf-8")) for pre in freq]
        weight = list(freq.values())
        counts, where = {}, {}                # pair -> count in the text; pair -> words holding it
        for w, ids in enumerate(words):
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + weight[w]
                where.setdefault(pair, set()).add(w)

        def first_seen(pair):                 # (first word holding it, position in that word)
            w = min(where[pair])
            ids = words[w]
            return w, next(i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) == pair)

        self.merges = {}
        for new_id in range(256, 256 + n_merges):
            if not counts:
                break
            top = max(counts.values())
            tied = [p for p, c in counts.items() if c == top]
            pair = tied[0] if len(tied) == 1 else min(tied, key=first_seen)
            self.merges[pair] = new_id
            for w in sorted(where[pair]):     # only the words holding the pair change
                old, new = words[w], merge(words[w], pair, new_id)
                for p in zip(old, old[1:]):
                    counts[p] -= weight[w]
                for p in zip(new, new[1:]):
                    counts[p] = counts.get(p, 0) + weight[w]
                old_pairs, new_pairs = set(zip(old, old[1:])), set(zip(new, new[1:]))
                for p in old_pairs - new_pairs:
                    where[p].discard(w)
                for p in new_pairs - old_pairs:
                    where.setdefault(p, set()).add(w)
                words[w] = new
            for p in [p for p, c in counts.items() if c == 0]:
                del counts[p], where[p]
        return self

    def _encode_bytes(self, data):
        """Apply the merges to one pre-token: always the pair of lowest rank first."""
        ids = list(data)
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, math.inf))
            if pair not in self.merges:
                break
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def encode(self, text):
        """Token ids of ``text``; special tokens are recognised and become their own id."""
        ids, seen = [], {}
        for k, part in enumerate(self._parts(text)):
            if k % 2:                         # odd parts are the special tokens
                ids.append(self.special_tokens[part])
                continue
            for pre in self._pretokens(part):
                if pre not in seen:
                    seen[pre] = self._encode_bytes(pre.encode("utf-8"))
                ids.extend(seen[pre])
        return ids

    def decode(self, ids):
        """The text of ``ids``; bytes that are not valid UTF-8 (a split character) become U+FFFD."""
        vocab = self.vocab
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
