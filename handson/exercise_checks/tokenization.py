"""Checks with diagnoses for the tokenization exercise (byte-level BPE).

The references here are written independently of the chapter's library: a plain trainer that scans
every pre-token occurrence and breaks ties by an explicit rule, an encoder that merges the single
leftmost pair of lowest rank at a time (as tiktoken's core does), a reference for special tokens
that scans the text by hand, and the incremental UTF-8 decoder of the standard library for
streaming. Every check raises :class:`AssertionError` with one sentence: what is wrong and its
likely cause. Only the standard library is imported at import time (``regex`` when a check runs).
"""

from __future__ import annotations

import codecs
import functools
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

__all__ = [
    "GPT2_PATTERN",
    "TIES",
    "unicode_strings",
    "pretokens",
    "reference_train",
    "reference_encode",
    "reference_stream",
    "check_pair_counts",
    "check_merge",
    "check_train",
    "check_vocab",
    "check_no_cross_pretoken",
    "check_encode",
    "check_roundtrip",
    "check_decode_replaces",
    "check_specials",
    "check_stream",
    "check_stream_lazy",
    "check_no_heavy_imports",
    "check_not_library",
]

#: GPT-2's split pattern, written out here so that the grader does not import the library.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TIES = ("first", "smallest", "greatest")
_HEAVY = ("tiktoken", "tokenizers", "transformers", "sentencepiece")

#: Characters the property tests draw from: ASCII, Latin-1, combining marks, CJK, astral-plane
#: symbols, emoji with joiners and skin tones, odd whitespace, contractions and fragments of specials.
_POOL = (list("abcxyzABC019 ,.;!?'\"-_()\n\t") + list("éßñüøÆ") + ["\u0301", "\u0308", "\u0327"]
         + list("中文字日本語한국") + ["😀", "👩", "\u200d", "👧", "\U0001F3FD", "𝔘", "𝔫", "🜂", "\U00010348"]
         + ["\u00a0", "\u2028", "\u3000", "  ", "   "] + ["'s", "'re", "'ll", "<|", "|>", "€", "✓", "…"])


def unicode_strings(n: int, seed: int = 0, max_len: int = 30) -> list[str]:
    """``n`` deterministic pseudo-random strings over a pool of awkward characters (some empty)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randrange(max_len + 1))) for _ in range(n)]


def pretokens(text: str, pattern: str | None = GPT2_PATTERN) -> list[str]:
    """The pre-tokens of ``text`` (the whole text as one when ``pattern`` is None)."""
    if pattern is None:
        return [text] if text else []
    import regex

    return regex.findall(pattern, text)


def _cut_specials(text: str, specials: Iterable[str]) -> list[tuple[str, bool]]:
    """[(piece, is_special)] by a hand scan: at each position the longest special that matches wins."""
    specials = sorted(set(specials), key=len, reverse=True)
    out: list[tuple[str, bool]] = []
    start = i = 0
    while i < len(text):
        hit = next((s for s in specials if s and text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if start < i:
            out.append((text[start:i], False))
        out.append((hit, True))
        i = start = i + len(hit)
    if start < len(text):
        out.append((text[start:], False))
    return out


def _merge_all(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out: list[int] = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_train(text: str, n_merges: int, pattern: str | None = GPT2_PATTERN,
                    specials: Iterable[str] = (), ties: str = "first", *, overlapping: bool = True,
                    tie_last: bool = False) -> dict[tuple[int, int], int]:
    """The merges BPE learns (see ``_reference_train``); results are cached, the dict is a copy."""
    return dict(_reference_train(text, n_merges, pattern, tuple(sorted(set(specials))), ties,
                                 overlapping, tie_last))


@functools.lru_cache(maxsize=256)
def _reference_train(text: str, n_merges: int, pattern: str | None, specials: tuple[str, ...], ties: str,
                     overlapping: bool, tie_last: bool) -> dict[tuple[int, int], int]:
    """The merges BPE learns: every occurrence of every pre-token scanned, text cut at ``specials``.

    ``ties``: "first" (the pair whose first occurrence comes first in the text), "smallest" (the
    smallest (id_a, id_b)), "greatest" (the greatest (bytes_a, bytes_b)). ``overlapping=False`` and
    ``tie_last=True`` give two wrong variants, used only to diagnose mistakes.
    """
    chunks = [list(p.encode("utf-8")) for piece, special in _cut_specials(text, specials) if not special
              for p in pretokens(piece, pattern)]
    vocab = {i: bytes([i]) for i in range(256)}
    merges: dict[tuple[int, int], int] = {}
    for new_id in range(256, 256 + n_merges):
        counts: dict[tuple[int, int], int] = {}
        first: dict[tuple[int, int], int] = {}
        pos = 0
        for ids in chunks:
            j = 0
            while j + 1 < len(ids):
                pair = (ids[j], ids[j + 1])
                counts[pair] = counts.get(pair, 0) + 1
                first.setdefault(pair, pos)
                pos += 1
                # without overlaps: a pair of equal ids just counted does not count again at j + 1
                j += 2 if (not overlapping and ids[j] == ids[j + 1]) else 1
            pos += 1
        if not counts:
            break
        top = max(counts.values())
        tied = [p for p in counts if counts[p] == top]
        if ties == "first":
            pair = (max if tie_last else min)(tied, key=lambda p: first[p])
        elif ties == "smallest":
            pair = min(tied)
        elif ties == "greatest":
            pair = max(tied, key=lambda p: (vocab[p[0]], vocab[p[1]]))
        elif ties == "greatest ids":             # wrong variants, for diagnoses
            pair = max(tied)
        elif ties == "smallest bytes":
            pair = min(tied, key=lambda p: (vocab[p[0]], vocab[p[1]]))
        else:
            raise ValueError(ties)
        merges[pair] = new_id
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        chunks = [_merge_all(ids, pair, new_id) for ids in chunks]
    return merges


def _encode_piece(data: bytes, ranks: dict[tuple[int, int], int], leftmost: bool = False) -> list[int]:
    """Merge the single leftmost pair of lowest rank until no pair is a merge (``leftmost``: wrong rule)."""
    ids = list(data)
    while True:
        best, at = None, -1
        for j in range(len(ids) - 1):
            r = ranks.get((ids[j], ids[j + 1]))
            if r is not None and (best is None or (r < best and not leftmost)):
                best, at = r, j
                if leftmost:
                    break
        if best is None:
            return ids
        ids[at:at + 2] = [best]


def reference_encode(text: str, merges: dict[tuple[int, int], int], pattern: str | None = GPT2_PATTERN,
                     specials: dict[str, int] | None = None, *, leftmost: bool = False) -> list[int]:
    """The ids of ``text`` given the merges; the strings of ``specials`` are recognised (all of them)."""
    ids: list[int] = []
    for piece, special in _cut_specials(text, specials or {}):
        if special:
            ids.append((specials or {})[piece])
            continue
        for p in pretokens(piece, pattern):
            ids += _encode_piece(p.encode("utf-8"), merges, leftmost)
    return ids


def _vocab(merges: dict[tuple[int, int], int], specials: dict[str, int] | None = None) -> dict[int, bytes]:
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), i in merges.items():
        vocab[i] = vocab[a] + vocab[b]
    for s, i in (specials or {}).items():
        vocab[i] = s.encode("utf-8")
    return vocab


def reference_stream(vocab: dict[int, bytes], ids: Sequence[int]) -> list[str]:
    """One string per id (what that id completed, maybe ""), then the flushed rest if it is not empty."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [dec.decode(vocab[i]) for i in ids]
    tail = dec.decode(b"", final=True)
    return out + [tail] if tail else out


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's code; a TypeError about the arguments names the signature that is asked."""
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        if "argument" in msg or "positional" in msg or "keyword" in msg:
            raise AssertionError(f"{what} raised TypeError ({msg}): check its signature against the "
                                 "one the exercise gives.") from None
        raise
    except UnicodeDecodeError as exc:
        raise AssertionError(f"{what} raised UnicodeDecodeError ({exc.reason}): decode the joined bytes "
                             "with errors=\"replace\", a token sequence may end inside a UTF-8 character."
                             ) from None


# ---------------------------------------------------------------------------------------------
# get_pair_counts and merge
# ---------------------------------------------------------------------------------------------

def check_pair_counts(get_pair_counts: Callable[..., Any]) -> None:
    """Counts of adjacent pairs: overlapping ones count, ``counts`` is added to and returned."""
    cases = [([], {}), ([7], {}), ([1, 2, 3], {(1, 2): 1, (2, 3): 1}),
             ([1, 2, 1, 2, 1], {(1, 2): 2, (2, 1): 2}), ([97] * 5, {(97, 97): 4}),
             ([3, 3, 3, 4, 3, 3], {(3, 3): 3, (3, 4): 1, (4, 3): 1})]
    for ids, want in cases:
        arg = list(ids)
        got = _call(f"get_pair_counts({ids})", get_pair_counts, arg)
        if arg != ids:
            raise AssertionError(f"get_pair_counts({ids}) modified its input list: count without changing ids.")
        if not isinstance(got, dict):
            raise AssertionError(f"get_pair_counts({ids}) returned {type(got).__name__}, not a dict of "
                                 "(id, id) -> count.")
        got = dict(got)
        if got != want:
            if ids == [97] * 5 and got.get((97, 97)) == 2:
                raise AssertionError("get_pair_counts([97] * 5) counts (97, 97) twice, but 'aaaaa' holds 4 "
                                     "overlapping pairs: count every position, do not skip after a match.")
            if any(not isinstance(k, tuple) for k in got):
                raise AssertionError(f"get_pair_counts({ids}) has keys {list(got)[:3]}: the keys must be "
                                     "tuples (id_a, id_b).")
            raise AssertionError(f"get_pair_counts({ids}) returned {got}, expected {want}: count each "
                                 "adjacent pair (ids[i], ids[i + 1]) once per position.")
    # order: filled in scan order, so the first key is the pair seen first
    order = list(_call("get_pair_counts", get_pair_counts, [5, 6, 1, 2, 5, 6]))
    if order[:3] != [(5, 6), (6, 1), (1, 2)]:
        raise AssertionError(f"get_pair_counts([5, 6, 1, 2, 5, 6]) lists its pairs as {order}: fill the dict in "
                             "scan order, so that max(counts, key=counts.get) picks the pair seen first on ties.")
    counts = {(1, 2): 5, (9, 9): 1}
    got = _call("get_pair_counts([1, 2, 2], counts)", get_pair_counts, [1, 2, 2], counts)
    if got is not counts:
        raise AssertionError("get_pair_counts(ids, counts) must add to the given dict and return that same "
                             "dict, so that one dict can gather the counts of many pre-tokens.")
    if counts != {(1, 2): 6, (9, 9): 1, (2, 2): 1}:
        raise AssertionError(f"get_pair_counts([1, 2, 2], counts) left counts = {counts}: add to the existing "
                             "counts (+1 for (1, 2) and (2, 2)), do not reset them.")


def check_merge(merge: Callable[..., Any]) -> None:
    """Replace every non-overlapping occurrence, left to right, in a new list."""
    cases = [([1, 2, 3, 1, 2], (1, 2), 9, [9, 3, 9]), ([], (1, 2), 9, []), ([1], (1, 2), 9, [1]),
             ([3, 1, 2], (1, 2), 9, [3, 9]), ([1, 2], (1, 2), 9, [9]), ([2, 1], (1, 2), 9, [2, 1]),
             ([97, 97, 97], (97, 97), 256, [256, 97]), ([97] * 4, (97, 97), 256, [256, 256]),
             ([97] * 5, (97, 97), 256, [256, 256, 97]), ([1, 1, 2, 1, 2, 2], (1, 2), 7, [1, 7, 7, 2])]
    for ids, pair, new_id, want in cases:
        arg = list(ids)
        got = _call(f"merge({ids}, {pair}, {new_id})", merge, arg, pair, new_id)
        if arg != ids:
            raise AssertionError(f"merge({ids}, {pair}, {new_id}) modified its input list: build and return "
                                 "a new list.")
        got = list(got) if isinstance(got, (list, tuple)) else got
        if got == want:
            continue
        if not isinstance(got, list):
            raise AssertionError(f"merge({ids}, {pair}, {new_id}) returned {type(got).__name__}, not a list of ids.")
        rtl = _merge_all(ids[::-1], pair[::-1], new_id)[::-1]
        if got == rtl:
            raise AssertionError(f"merge({ids}, {pair}, {new_id}) gave {got}, expected {want}: occurrences are "
                                 "replaced left to right, so in [a, a, a] the first two ids merge.")
        if got.count(new_id) > want.count(new_id):
            raise AssertionError(f"merge({ids}, {pair}, {new_id}) gave {got}, expected {want}: overlapping "
                                 "occurrences were all replaced; after a match skip both ids (i += 2).")
        if got.count(new_id) == want.count(new_id) and len(got) > len(want):
            raise AssertionError(f"merge({ids}, {pair}, {new_id}) gave {got}, expected {want}: the second id of "
                                 "a match is kept; after a match skip both ids (i += 2).")
        if 0 < got.count(new_id) < want.count(new_id) and got[:got.index(new_id) + 1] == want[:got.index(new_id) + 1]:
            raise AssertionError(f"merge({ids}, {pair}, {new_id}) gave {got}, expected {want}: only the first "
                                 "occurrence was replaced; replace every occurrence.")
        if len(got) < len(want) and got == want[:len(got)]:
            raise AssertionError(f"merge({ids}, {pair}, {new_id}) gave {got}, expected {want}: the last id is "
                                 "lost; keep the id at the end when no pair starts there.")
        raise AssertionError(f"merge({ids}, {pair}, {new_id}) gave {got}, expected {want}: scan left to right, "
                             "replace (ids[i], ids[i + 1]) == pair by new_id and skip both, else keep ids[i].")


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def _make(cls: Any, pattern: Any, specials: dict[str, int] | None) -> Any:
    kwargs: dict[str, Any] = {}
    if pattern is not _DEFAULT:
        kwargs["pattern"] = pattern
    if specials is not None:
        kwargs["special_tokens"] = dict(specials)
    return _call("BPETokenizer(...)", cls, **kwargs)


_DEFAULT = object()


def _train(cls: Any, text: str, vocab_size: int, pattern: Any = _DEFAULT,
           specials: dict[str, int] | None = None, ties: str | None = None) -> Any:
    tok = _make(cls, pattern, specials)
    what = f"train(text, {vocab_size}" + (f", ties={ties!r})" if ties else ")")
    try:
        if ties is None:
            _call(what, tok.train, text, vocab_size)
        else:
            _call(what, tok.train, text, vocab_size, ties=ties)
    except ValueError as exc:
        if "empty" in str(exc):
            raise AssertionError(f"{what} raised ValueError ({str(exc).splitlines()[0]}): when no pair is left, "
                                 "stop training early instead of taking the max of no counts.") from None
        raise
    merges = getattr(tok, "merges", None)
    if not isinstance(merges, dict):
        raise AssertionError(f"after {what}, tokenizer.merges is {type(merges).__name__}, not a dict "
                             "(id_a, id_b) -> new id.")
    return tok


def _fmt(pair: tuple[int, int], vocab: dict[int, bytes]) -> str:
    try:
        return f"{pair} = {vocab[pair[0]] + vocab[pair[1]]!r}"
    except (KeyError, TypeError):
        return str(pair)


def check_train(cls: Any, text: str, vocab_size: int, pattern: Any = _DEFAULT,
                specials: dict[str, int] | None = None, ties: str | None = None,
                expected: dict[tuple[int, int], int] | None = None) -> Any:
    """Train a fresh tokenizer; its merges must be the reference's, in order, with ids 256, 257, ..."""
    tok = _train(cls, text, vocab_size, pattern, specials, ties)
    pat = GPT2_PATTERN if pattern is _DEFAULT else pattern
    spec = dict(specials or {})
    n = vocab_size - 256 - len(spec)
    rule = ties or "first"
    want = expected if expected is not None else reference_train(text, n, pat, spec, rule)
    got = dict(tok.merges)
    if list(got.items()) == list(want.items()):
        return tok
    vocab = _vocab(want)
    what = f"train(text, vocab_size={vocab_size}" + (f", ties={rule!r})" if ties else ")")
    ids = list(got.values())
    if ids and ids != list(range(256, 256 + len(ids))):
        raise AssertionError(f"after {what} the merge ids are {ids[:5]}...: the k-th merge gets id 256 + k, "
                             "after the 256 byte tokens, and merges keeps creation order.")
    m = min(len(got), len(want))
    if len(got) != len(want) and list(got)[:m] == list(want)[:m]:
        if spec and len(got) == n + len(spec):
            msg = "the special tokens count in vocab_size: learn vocab_size - 256 - len(special_tokens) merges"
        elif len(got) == vocab_size or len(got) == vocab_size - len(spec):
            msg = "the 256 byte tokens count in vocab_size: learn vocab_size - 256 - len(special_tokens) merges"
        elif len(got) < len(want):
            msg = "vocab_size = 256 + merges + specials; stop early only when no pair is left"
        else:
            msg = "vocab_size = 256 + merges + specials"
        raise AssertionError(f"{what} learned {len(got)} merges, expected {len(want)}: {msg}.")
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if k >= len(got) or k >= len(want):
        raise AssertionError(f"{what} learned {len(got)} merges, expected {len(want)}: stop only when no pair "
                             "is left or vocab_size = 256 + merges + specials is reached.")
    mine, theirs = list(got)[k], list(want)[k]
    variants = [
        (dict(pattern=None), "merges cross pre-token boundaries: split the text with the pattern first and "
         "count pairs inside each pre-token only"),
        (dict(overlapping=False), "overlapping pairs are not all counted: 'aaa' holds the pair (a, a) twice"),
        (dict(specials=()), "special tokens were trained on: cut the training text at the special tokens "
         "and train on the ordinary parts only"),
    ]
    for r in TIES:
        if r != rule:
            variants.append((dict(ties=r), f"a tie was broken by the {r!r} rule: with ties={rule!r} the "
                             + {"first": "pair seen first when scanning the text wins (max over counts "
                                "built in scan order)",
                                "smallest": "smallest pair (id_a, id_b) wins",
                                "greatest": "lexicographically greatest pair (vocab[a], vocab[b]) wins"}[rule]))
    if rule == "greatest":
        variants.insert(0, (dict(ties="greatest ids"), "ties were broken by the greatest ids: compare the pairs' "
                            "bytes (vocab[a], vocab[b]), not their ids"))
    if rule == "smallest":
        variants.insert(0, (dict(ties="smallest bytes"), "ties were broken by the smallest bytes: compare the "
                            "ids (id_a, id_b), not their bytes"))
    if rule == "first":
        variants.append((dict(tie_last=True), "a tie was broken by the pair seen last: the pair seen first "
                         "when scanning the text wins"))
    best, best_len = None, k          # the variant that agrees with the most merges explains it best
    mine_items = list(got.items())
    for opts, msg in variants:
        kw = dict(pattern=pat, specials=spec, ties=rule)
        kw.update(opts)
        alt = list(reference_train(text, len(got), kw["pattern"], kw["specials"], kw["ties"],
                                   overlapping=kw.get("overlapping", True), tie_last=kw.get("tie_last", False)).items())
        agree = next((i for i, (a, b) in enumerate(zip(alt, mine_items)) if a != b), min(len(alt), len(mine_items)))
        if agree > best_len:
            best, best_len, equal = msg, agree, 1
        elif agree == best_len and best is not None:
            equal += 1
            if msg.startswith("a tie was broken") and best.startswith("a tie was broken"):
                best = "a tie was broken by another rule: " + best.split(": ", 1)[1]
    if best is not None:
        raise AssertionError(f"{what}: merge {k} is {_fmt(mine, _vocab(got))}, expected "
                             f"{_fmt(theirs, vocab)}: {best}.")
    raise AssertionError(f"{what}: merge {k} is {_fmt(mine, _vocab(got))}, expected {_fmt(theirs, vocab)}: "
                         "merge the most frequent adjacent pair (counted inside pre-tokens), then count again.")


def check_vocab(tok: Any) -> None:
    """vocab: the 256 bytes, each merge the join of its two halves, each special its UTF-8 bytes."""
    vocab = getattr(tok, "vocab", None)
    if not isinstance(vocab, dict):
        raise AssertionError(f"tokenizer.vocab is {type(vocab).__name__}, not a dict id -> bytes.")
    want = _vocab(dict(tok.merges), dict(getattr(tok, "special_tokens", {}) or {}))
    for i in range(256):
        if vocab.get(i) != bytes([i]):
            raise AssertionError(f"vocab[{i}] is {vocab.get(i)!r}, expected {bytes([i])!r}: ids 0..255 are the "
                                 "single bytes (bytes([i]), not chr(i).encode()).")
    for i, b in want.items():
        if vocab.get(i) != b:
            raise AssertionError(f"vocab[{i}] is {vocab.get(i)!r}, expected {b!r}: a merge's bytes are the "
                                 "bytes of its two halves joined; a special token's are its UTF-8 encoding.")
    if len(vocab) != len(want):
        raise AssertionError(f"vocab has {len(vocab)} entries, expected {len(want)}: 256 bytes + one per "
                             "merge + one per special token.")


def check_no_cross_pretoken(tok: Any, text: str, pattern: str | None = GPT2_PATTERN) -> None:
    """Every learned token lies inside one pre-token of the training text."""
    inside = set()
    for p in pretokens(text, pattern):
        b = p.encode("utf-8")
        inside.update(b[i:j] for i in range(len(b)) for j in range(i + 2, len(b) + 1))
    vocab = _vocab(dict(tok.merges))
    for pair, i in tok.merges.items():
        if vocab[i] not in inside:
            raise AssertionError(f"the merge {pair} makes the token {vocab[i]!r}, which spans two pre-tokens: "
                                 "merges never cross pre-token boundaries (split with the pattern first).")


# ---------------------------------------------------------------------------------------------
# encoding and decoding
# ---------------------------------------------------------------------------------------------

def check_encode(tok: Any, texts: Sequence[str], pattern: str | None = GPT2_PATTERN,
                 encode: Callable[[str], Any] | None = None, specials: dict[str, int] | None = None) -> None:
    """``encode`` (default: tok.encode_ordinary-free ``tok.encode``) equals the reference given tok's merges."""
    merges = dict(tok.merges)
    fn = encode or tok.encode
    for text in texts:
        got = _call(f"encode({text[:30]!r})", fn, text)
        want = reference_encode(text, merges, pattern, specials)
        got = list(got) if isinstance(got, (list, tuple)) else got
        if got == want:
            continue
        short = text[:40]
        if got == reference_encode(text, merges, pattern, specials, leftmost=True):
            raise AssertionError(f"encode({short!r}) applies merges by their position in the text: apply the "
                                 "merge of lowest rank (earliest learned) first, as training did.")
        if got == reference_encode(text, merges, None, specials):
            raise AssertionError(f"encode({short!r}) merges across pre-tokens: split the text with the "
                                 "pattern and encode each pre-token on its own.")
        if got == list(text.encode("utf-8")):
            raise AssertionError(f"encode({short!r}) returned the raw bytes: apply the merges.")
        if isinstance(got, list) and b"".join(_vocab(merges, specials).get(i, b"?") for i in got) != \
                text.encode("utf-8"):
            raise AssertionError(f"encode({short!r}) gives ids whose bytes are not the text's UTF-8 bytes: "
                                 "encode each pre-token's text.encode('utf-8') and keep every byte.")
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(f"encode({short!r}) differs from id {at} on, {got[at:at + 6]} instead of "
                             f"{want[at:at + 6]}: repeatedly merge the pair of lowest rank until no pair of the "
                             "pre-token is a merge.")


def check_roundtrip(tok: Any, strings: Sequence[str], encode: Callable[[str], Any] | None = None) -> None:
    """decode(encode(s)) == s for every string."""
    fn = encode or tok.encode
    for s in strings:
        ids = _call(f"encode({s[:20]!r})", fn, s)
        back = _call("decode(encode(s))", tok.decode, ids)
        if back != s:
            if isinstance(back, str) and "\ufffd" in back:
                raise AssertionError(f"decode(encode({s[:20]!r})) = {back[:20]!r} holds U+FFFD: bytes were "
                                     "decoded token by token; join all the bytes first, then decode once.")
            raise AssertionError(f"decode(encode({s[:20]!r})) = {back!r}: the round trip must give the string "
                                 "back (UTF-8 bytes in, every byte kept, the bytes joined and decoded).")


def check_decode_replaces(tok: Any) -> None:
    """A split UTF-8 character decodes to U+FFFD instead of raising."""
    euro = list("€".encode("utf-8"))
    cases = [(euro[:1], "\ufffd"), (euro[:2], "\ufffd"), ([0x80], "\ufffd"), (euro, "€"),
             ([97] + euro[:2] + [98], "a\ufffdb"), ([0xFF, 97], "\ufffda")]
    for ids, want in cases:
        got = _call(f"decode({ids})", tok.decode, ids)
        if got != want:
            raise AssertionError(f"decode({ids}) = {got!r}, expected {want!r}: decode the joined bytes with "
                                 "errors=\"replace\" (a split character becomes U+FFFD, nothing is dropped).")


def check_specials(cls: Any, specials: dict[str, int], train_text: str, vocab_size: int,
                   texts: Sequence[str]) -> Any:
    """The allowed_special modes of encode, and encode_ordinary, against the hand-scan reference."""
    tok = _train(cls, train_text, vocab_size, specials=specials)
    merges = dict(tok.merges)
    names = sorted(specials)
    for text in texts:
        present = [s for s in names if s in text]
        what = f"encode({text[:30]!r}, allowed_special=\"all\")"
        got = _call(what, tok.encode, text, allowed_special="all")
        want = reference_encode(text, merges, GPT2_PATTERN, specials)
        if list(got) != want:
            plain = reference_encode(text, merges, GPT2_PATTERN, None)
            if list(got) == plain:
                raise AssertionError(f"{what} split the special tokens into ordinary tokens: with \"all\" every "
                                     "special string becomes its own single id.")
            vocab = _vocab(merges, specials)
            if (any(i in got for i in specials.values()) and all(i in vocab for i in got)
                    and b"".join(vocab[i] for i in got) == text.encode("utf-8")):
                raise AssertionError(f"{what} gave {list(got)[:12]}, expected {want[:12]}: find the specials "
                                     "first (longest first), then pre-tokenize only the text between them.")
            raise AssertionError(f"{what} gave {list(got)[:12]}, expected {want[:12]}: each special token is one "
                                 "id, the text between them is encoded as usual.")
        for mode in ("none", None):
            what = f"encode({text[:30]!r}, allowed_special=\"none\")" if mode else f"encode_ordinary({text[:30]!r})"
            fn = (lambda t: tok.encode(t, allowed_special="none")) if mode else getattr(tok, "encode_ordinary", None)
            if fn is None:
                raise AssertionError("the tokenizer has no encode_ordinary(text) method: it encodes a text with no "
                                     "special token recognised.")
            got = _call(what, fn, text)
            want = reference_encode(text, merges, GPT2_PATTERN, None)
            if list(got) != want:
                raise AssertionError(f"{what} gave {list(got)[:12]}, expected {want[:12]}: no special token is "
                                     "recognised here, their strings are ordinary text.")
        for s in names:
            what = f"encode({text[:30]!r}, allowed_special={{{s!r}}})"
            got = _call(what, tok.encode, text, allowed_special={s})
            want = reference_encode(text, merges, GPT2_PATTERN, {s: specials[s]})
            if list(got) != want:
                raise AssertionError(f"{what} gave {list(got)[:12]}, expected {want[:12]}: with a set only the "
                                     "specials in the set are recognised, the others are ordinary text.")
        for how in ("default", "none_raise"):
            what = (f"encode({text[:30]!r})" if how == "default"
                    else f"encode({text[:30]!r}, allowed_special=\"none_raise\")")
            call = (lambda t: tok.encode(t)) if how == "default" else (lambda t: tok.encode(t, allowed_special="none_raise"))
            if present:
                try:
                    call(text)
                except ValueError:
                    continue
                except Exception as exc:  # noqa: BLE001
                    raise AssertionError(f"{what} raised {type(exc).__name__}, expected ValueError: a text that "
                                         "holds a special token is refused unless allowed_special allows it."
                                         ) from None
                raise AssertionError(f"{what} returned ids for a text holding {present[0]!r}: by default "
                                     "(\"none_raise\") such a text raises ValueError, as tiktoken does.")
            got = _call(what, call, text)
            if list(got) != reference_encode(text, merges, GPT2_PATTERN, None):
                raise AssertionError(f"{what} differs from encode_ordinary on a text without special tokens.")
    for bad in ("everything", 3):
        try:
            tok.encode("x", allowed_special=bad)
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"encode('x', allowed_special={bad!r}) raised {type(exc).__name__}, expected "
                                 "ValueError for a mode that is not \"all\", \"none\", \"none_raise\" or a set."
                                 ) from None
        raise AssertionError(f"encode('x', allowed_special={bad!r}) did not raise ValueError: only \"all\", "
                             "\"none\", \"none_raise\" or a set of special strings are allowed.")
    try:
        tok.encode("x", allowed_special={"<|not a special|>"})
    except ValueError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"allowed_special with a string that is not a special token raised "
                             f"{type(exc).__name__}, expected ValueError.") from None
    else:
        raise AssertionError("allowed_special={'<|not a special|>'} did not raise ValueError: a set may name "
                             "only special tokens of the tokenizer.")
    return tok


def check_stream(tok: Any, ids_list: Sequence[Sequence[int]]) -> None:
    """decode_stream yields one string per id, then the flushed rest: the incremental UTF-8 decoder's pieces."""
    vocab = _vocab(dict(tok.merges), dict(getattr(tok, "special_tokens", {}) or {}))
    fn = getattr(tok, "decode_stream", None)
    if fn is None:
        raise AssertionError("the tokenizer has no decode_stream(ids) method.")
    for ids in ids_list:
        what = f"decode_stream({list(ids)[:8]})"
        got = _call(what, fn, iter(list(ids)))
        if isinstance(got, str):
            raise AssertionError(f"{what} returned one string: it must yield pieces (a generator), one per id.")
        got = list(_call(what, lambda: list(got)))
        want = reference_stream(vocab, ids)
        if got == want:
            continue
        joined = "".join(g for g in got if isinstance(g, str))
        if [g for g in got if g] == [w for w in want if w] and len(got) != len(want):
            raise AssertionError(f"{what} yields {len(got)} pieces, expected {len(want)}: yield one string per "
                                 "id, \"\" when the id ends inside a character, then the flushed rest if any.")
        if joined != "".join(want):
            if "\ufffd" in joined and "\ufffd" not in "".join(want):
                raise AssertionError(f"{what} yields U+FFFD for a character split across tokens: keep the "
                                     "incomplete bytes until the character is complete (an incremental decoder).")
            if len(joined) < len("".join(want)):
                raise AssertionError(f"{what} loses text: after the last id, flush the incremental decoder "
                                     "(final=True), which turns incomplete bytes into U+FFFD.")
            raise AssertionError(f"{what} joined gives {joined[:30]!r}, expected {''.join(want)[:30]!r}: the "
                                 "pieces together must equal decode(ids).")
        raise AssertionError(f"{what} yields {got[:8]}, expected {want[:8]}: yield, for each id, the text that "
                             "became complete with it (\"\" if none), as codecs.getincrementaldecoder('utf-8')"
                             "(errors='replace') gives it.")


def check_stream_lazy(tok: Any, ids: Sequence[int]) -> None:
    """The piece of id k is yielded before id k + 1 is read: the decoder streams."""
    read = [0]

    def source() -> Iterator[int]:
        for i in ids:
            read[0] += 1
            yield i

    gen = _call("decode_stream(ids)", tok.decode_stream, source())
    for k in range(len(ids)):
        try:
            next(gen)
        except StopIteration:
            raise AssertionError(f"decode_stream stopped after {k} pieces for {len(ids)} ids: yield one piece "
                                 "per id.") from None
        except TypeError:
            raise AssertionError("decode_stream(ids) must return an iterator (a generator): write it with "
                                 "yield.") from None
        if read[0] != k + 1:
            raise AssertionError(f"decode_stream read {read[0]} ids before yielding piece {k}: it must stream, "
                                 "yielding each id's piece before reading the next id (do not list(ids) first).")


def check_no_heavy_imports() -> None:
    """The answer may not delegate to a tokenizer library."""
    found = [m for m in _HEAVY if m in sys.modules]
    if found:
        raise AssertionError(f"{found[0]} was imported: write the tokenizer yourself, the exercise may not "
                             "use a tokenizer library.")


def check_not_library(cls: Any, library_cls: Any) -> None:
    """The answer's class is not the chapter's, a subclass of it, or a wrapper around it."""
    if cls is library_cls or (isinstance(cls, type) and issubclass(cls, library_cls)):
        raise AssertionError("BPETokenizer is (a subclass of) the library's handson.nn.tokenization.BPETokenizer: "
                             "write the class yourself.")
    tok = cls()
    if any(isinstance(v, library_cls) for v in vars(tok).values()):
        raise AssertionError("BPETokenizer wraps the library's handson.nn.tokenization.BPETokenizer: write the "
                             "class yourself.")
