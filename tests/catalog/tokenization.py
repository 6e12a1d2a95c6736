"""Plausible mistakes in the tokenization exercise, each one a small edit of the solution; correct
answers in other styles (controls); and the chapter's own code as the answer."""

from support import bug, chapter_code, control

PAIRS, TOK = "pairs", "tokenizer"
TRAIN_LOOP = "for new_id in range(256, 256 + n_merges):"

BUGS = [
    # --- get_pair_counts / merge -------------------------------------------------------------------
    bug("pair_counts_skip_overlaps", PAIRS,
        ("    for pair in zip(ids, ids[1:]):\n        counts[pair] = counts.get(pair, 0) + 1\n",
         "    i = 0\n    while i + 1 < len(ids):\n        pair = (ids[i], ids[i + 1])\n"
         "        counts[pair] = counts.get(pair, 0) + 1\n        i += 2 if ids[i] == ids[i + 1] else 1\n"),
        "skips the position after a pair of equal ids: 'aaaaa' counts 2 (a, a) pairs instead of 4 "
        "(minbpe #51)", ["test_pairs"], diagnosis="overlapping pairs"),
    bug("pair_counts_ignores_counts_argument", PAIRS,
        ("counts = {} if counts is None else counts", "counts = {}"),
        "always starts a new dict: counts gathered over many pre-tokens are lost", ["test_pairs"],
        diagnosis="same dict"),
    bug("pair_counts_presence_only", PAIRS, ("counts[pair] = counts.get(pair, 0) + 1", "counts[pair] = 1"),
        "records which pairs occur, not how often", ["test_pairs"], diagnosis="once per position"),
    bug("pair_counts_sorted", PAIRS, ("        counts[pair] = counts.get(pair, 0) + 1\n    return counts",
                                      "        counts[pair] = counts.get(pair, 0) + 1\n    return dict(sorted(counts.items()))"),
        "returns the counts sorted by pair: max(counts, key=counts.get) then breaks ties by the smallest "
        "pair, not the first seen", ["test_pairs"], diagnosis="scan order"),
    bug("merge_keeps_second_id", PAIRS, ("            out.append(new_id)\n            i += 2", "            out.append(new_id)\n            i += 1"),
        "advances by one after a match: the second id of the pair stays, and overlapping pairs merge twice",
        ["test_pairs"], diagnosis="skip both ids"),
    bug("merge_first_only", PAIRS, ("            out.append(new_id)\n            i += 2",
                                    "            out.append(new_id)\n            return out + list(ids[i + 2:])"),
        "replaces only the first occurrence (str.replace(..., 1) thinking)", ["test_pairs"],
        diagnosis="only the first"),
    bug("merge_drops_last_id", PAIRS, ("    while i < len(ids):\n        if i + 1", "    while i < len(ids) - 1:\n        if i + 1"),
        "stops one id early: the last id is lost when no pair starts there", ["test_pairs"], diagnosis="last id"),
    bug("merge_in_place", PAIRS, ("            i += 1\n    return out", "            i += 1\n    ids[:] = out\n    return out"),
        "writes the result into the caller's list", ["test_pairs"], diagnosis="modified its input"),
    bug("merge_right_to_left", PAIRS,
        ("    out, i = [], 0\n    while i < len(ids):\n        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:\n"
         "            out.append(new_id)\n            i += 2\n        else:\n            out.append(ids[i])\n            i += 1\n    return out",
         "    out, i = [], len(ids) - 1\n    while i >= 0:\n        if i >= 1 and ids[i - 1] == pair[0] and ids[i] == pair[1]:\n"
         "            out.append(new_id)\n            i -= 2\n        else:\n            out.append(ids[i])\n            i -= 1\n    return out[::-1]"),
        "scans from the right: [a, a, a] becomes [a, aa] instead of [aa, a]", ["test_pairs"],
        diagnosis="left to right"),
    # --- training -------------------------------------------------------------------------------------
    bug("train_across_pretokens", TOK, ("            for pre in self._pretokens(part):\n                freq[pre]",
                                        "            for pre in ([part] if part else []):\n                freq[pre]"),
        "trains on the raw text: merges such as 'e t' cross word boundaries", ["test_train"],
        diagnosis="cross pre-token boundaries"),
    bug("tie_last_seen", TOK, ("pair = tied[0]", "pair = tied[-1]"),
        "breaks ties by the pair seen last", ["test_train", "test_ties"], diagnosis="tie was broken"),
    bug("tie_smallest_by_default", TOK, ("pair = tied[0]", "pair = min(tied)"),
        "breaks ties by the smallest ids (Hugging Face's rule) under ties='first'", ["test_train"],
        diagnosis="tie was broken"),
    bug("tie_greatest_by_ids", TOK, ("pair = max(tied, key=lambda p: (vocab[p[0]], vocab[p[1]]))", "pair = max(tied)"),
        "compares the pairs' ids instead of their bytes under ties='greatest'", ["test_ties"],
        diagnosis="not their ids"),
    bug("tie_smallest_by_bytes", TOK, ("pair = min(tied)", "pair = min(tied, key=lambda p: (vocab[p[0]], vocab[p[1]]))"),
        "compares the pairs' bytes instead of their ids under ties='smallest'", ["test_ties"],
        diagnosis="not their bytes"),
    bug("ties_unknown_accepted", TOK, ('            raise ValueError(f"ties must be \'first\', \'smallest\' or \'greatest\', not {ties!r}")',
                                       "            pass"),
        "an unknown tie rule silently means 'greatest'", ["test_ties"], diagnosis="should raise ValueError"),
    bug("vocab_size_ignores_specials", TOK, ("n_merges = vocab_size - 256 - len(self.special_tokens)", "n_merges = vocab_size - 256"),
        "does not count the special tokens in vocab_size: one merge too many per special", ["test_train", "test_vocab"],
        diagnosis="special tokens count in vocab_size"),
    bug("vocab_size_is_merges", TOK, ("n_merges = vocab_size - 256 - len(self.special_tokens)",
                                      "n_merges = vocab_size - len(self.special_tokens)"),
        "takes vocab_size as the number of merges, off by the 256 byte tokens", ["test_train"],
        diagnosis="256 + merges + specials"),
    bug("one_merge_too_few", TOK, (TRAIN_LOOP, "for new_id in range(256, 255 + n_merges):"),
        "learns one merge too few", ["test_train"], diagnosis="256 + merges + specials"),
    bug("merge_ids_from_257", TOK, (TRAIN_LOOP, "for new_id in range(257, 257 + n_merges):"),
        "numbers the merges from 257", ["test_train"], diagnosis="id 256 + k"),
    bug("trains_on_specials", TOK, ("for part in self._cut(text, self.special_tokens)[::2]:", "for part in [text]:"),
        "does not cut the training text at the special tokens: merges learn from '<|endoftext|>'",
        ["test_train"], diagnosis="special tokens were trained on"),
    bug("counts_ignore_word_frequency", TOK, ("counts[pair] = counts.get(pair, 0) + n", "counts[pair] = counts.get(pair, 0) + 1"),
        "counts each distinct pre-token once, not as often as it occurs", ["test_train"], diagnosis="most frequent"),
    bug("no_early_stop", TOK, ("            if not counts:\n                break\n", ""),
        "takes the max of empty counts when no pair is left", ["test_train"], diagnosis="stop training early"),
    # --- vocab -------------------------------------------------------------------------------------------
    bug("vocab_without_specials", TOK, ('        for s, i in self.special_tokens.items():\n            vocab[i] = s.encode("utf-8")\n        return vocab',
                                        "        return vocab"),
        "leaves the special tokens out of vocab: decode fails on their ids", ["test_vocab"],
        diagnosis="UTF-8 encoding"),
    bug("vocab_code_points", TOK, ("        vocab = {i: bytes([i]) for i in range(256)}\n        for (a, b), new_id",
                                   "        vocab = {i: chr(i).encode('utf-8') for i in range(256)}\n        for (a, b), new_id"),
        "builds the byte tokens from code points: bytes 128..255 become two bytes", ["test_vocab"],
        diagnosis="not chr(i).encode()"),
    # --- encode / decode ------------------------------------------------------------------------------------
    bug("encode_leftmost_pair", TOK, ('pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, float("inf")))',
                                      "pair = next((p for p in zip(ids, ids[1:]) if p in self.merges), None)"),
        "applies the leftmost pair that is a merge instead of the lowest rank", ["test_encode_decode"],
        diagnosis="position in the text"),
    bug("encode_smallest_pair", TOK, ('pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, float("inf")))',
                                      "pair = min(zip(ids, ids[1:]), key=lambda p: (p not in self.merges, p))"),
        "picks the smallest pair that is a merge, not the one of lowest rank", ["test_encode_decode"],
        diagnosis="lowest rank"),
    bug("encode_without_pretokens", TOK, ("        for pre in self._pretokens(text):\n            ids.extend",
                                          "        for pre in ([text] if text else []):\n            ids.extend"),
        "encodes the whole text as one piece: merges cross pre-tokens at encoding time", ["test_encode_decode"],
        diagnosis="across pre-tokens"),
    bug("encode_code_points", TOK, ('ids.extend(self._encode_bytes(pre.encode("utf-8")))', "ids.extend(self._encode_bytes([ord(c) for c in pre]))"),
        "uses code points as byte ids", ["test_encode_decode"], diagnosis="text.encode('utf-8')"),
    bug("decode_strict", TOK, ('.decode("utf-8", errors="replace")', '.decode("utf-8")'),
        "decodes strictly: a split character raises UnicodeDecodeError", ["test_encode_decode"],
        diagnosis='errors="replace"'),
    bug("decode_ignore", TOK, ('.decode("utf-8", errors="replace")', '.decode("utf-8", errors="ignore")'),
        "drops a split character silently instead of showing U+FFFD", ["test_encode_decode"],
        diagnosis='errors="replace"'),
    bug("decode_token_by_token", TOK, ('return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")',
                                       'return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)'),
        "decodes each token on its own: a character split over two tokens becomes two U+FFFD",
        ["test_encode_decode"], diagnosis="join all the bytes first"),
    # --- special tokens ------------------------------------------------------------------------------------
    bug("specials_not_longest_first", TOK, ("alternatives = sorted(specials, key=len, reverse=True)", "alternatives = sorted(specials)"),
        "tries the specials in alphabetical order: '<|a|>' wins over '<|a|><|b|>'", ["test_specials"],
        diagnosis="longest first"),
    bug("specials_allowed_by_default", TOK, ('def encode(self, text, allowed_special="none_raise"):', 'def encode(self, text, allowed_special="all"):'),
        "recognises special tokens in any text by default (the prompt-injection hole tiktoken closes)",
        ["test_specials"], diagnosis="as tiktoken does"),
    bug("none_raise_does_not_raise", TOK, ('raise ValueError(f"the text holds the special token {found[0]!r}: pass allowed_special")', "pass"),
        "'none_raise' encodes the special's string as text instead of refusing it", ["test_specials"],
        diagnosis="raises ValueError"),
    bug("none_recognises_specials", TOK, ('elif allowed_special == "none":\n            allowed = set()',
                                          'elif allowed_special == "none":\n            allowed = set(self.special_tokens)'),
        "'none' recognises the special tokens", ["test_specials"], diagnosis="ordinary text"),
    bug("set_recognises_all", TOK, ("            allowed = set(allowed_special)", "            allowed = set(self.special_tokens)"),
        "a set of allowed specials recognises every special", ["test_specials"], diagnosis="only the specials in the set"),
    bug("set_with_unknown_accepted", TOK, ('                raise ValueError(f"not special tokens: {sorted(unknown)}")', "                pass"),
        "a set naming a string that is no special token is accepted", ["test_specials"],
        diagnosis="only special tokens"),
    bug("bad_mode_accepted", TOK, ("""            raise ValueError(f"allowed_special must be 'all', 'none', 'none_raise' or a set, not {allowed_special!r}")""",
                                   "            allowed = set()"),
        "an unknown allowed_special silently means 'none'", ["test_specials"], diagnosis="did not raise ValueError"),
    bug("encode_ordinary_drops_specials", TOK, ("        for pre in self._pretokens(text):\n            ids.extend",
                                                "        for pre in [q for p in self._cut(text, self.special_tokens)[::2] for q in self._pretokens(p)]:\n            ids.extend"),
        "encode_ordinary cuts the specials out of the text instead of encoding their strings",
        ["test_specials", "test_encode_ordinary"], diagnosis="ordinary text"),
    # --- streaming ---------------------------------------------------------------------------------------
    bug("stream_decodes_each_token", TOK, ("            yield decoder.decode(vocab[i])", '            yield vocab[i].decode("utf-8", errors="replace")'),
        "decodes each token on its own: a character split across tokens streams as U+FFFD", ["test_stream"],
        diagnosis="keep the incomplete bytes"),
    bug("stream_no_flush", TOK, ("        if tail:\n            yield tail\n", ""),
        "never flushes the decoder: a truncated character at the end is lost", ["test_stream"], diagnosis="flush"),
    bug("stream_skips_empty", TOK, ("            yield decoder.decode(vocab[i])",
                                    "            piece = decoder.decode(vocab[i])\n            if piece:\n                yield piece"),
        "yields nothing for an id that ends inside a character", ["test_stream"], diagnosis="one string per id"),
    bug("stream_reads_all_first", TOK, ("        for i in ids:\n            yield", "        for i in list(ids):\n            yield"),
        "reads every id before yielding: not a stream", ["test_stream"], diagnosis="must stream"),
]

CONTROLS = [
    control("pair_counts_zip_slices", PAIRS,
            ("    counts = {} if counts is None else counts\n    for pair in zip(ids, ids[1:]):\n        counts[pair] = counts.get(pair, 0) + 1\n",
             "    if counts is None:\n        counts = {}\n    for j in range(len(ids) - 1):\n        a, b = ids[j], ids[j + 1]\n"
             "        counts[(a, b)] = counts.get((a, b), 0) + 1\n"),
            "an index loop instead of zip"),
    control("merge_with_skip_flag", PAIRS,
            ("    out, i = [], 0\n    while i < len(ids):\n        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:\n"
             "            out.append(new_id)\n            i += 2\n        else:\n            out.append(ids[i])\n            i += 1\n    return out",
             "    out, skip = [], False\n    for j, x in enumerate(ids):\n        if skip:\n            skip = False\n            continue\n"
             "        if j + 1 < len(ids) and (x, ids[j + 1]) == tuple(pair):\n            out.append(new_id)\n            skip = True\n"
             "        else:\n            out.append(x)\n    return out"),
            "a for loop with a skip flag"),
    control("train_every_occurrence", TOK,
            [("        words = {tuple(pre.encode(\"utf-8\")): n for pre, n in freq.items()}",
              "        chunks = [list(pre.encode(\"utf-8\")) for part in self._cut(text, self.special_tokens)[::2]\n"
              "                  for pre in self._pretokens(part)]"),
             ("            counts = {}\n            for ids, n in words.items():\n                for pair in zip(ids, ids[1:]):\n"
              "                    counts[pair] = counts.get(pair, 0) + n\n",
              "            counts = {}\n            for ids in chunks:\n                get_pair_counts(ids, counts)\n"),
             ("            words = {tuple(merge(list(ids), pair, new_id)): n for ids, n in words.items()}",
              "            chunks = [merge(ids, pair, new_id) for ids in chunks]")],
            "counts over every pre-token occurrence with get_pair_counts (minbpe's RegexTokenizer), no deduplication"),
    control("specials_by_hand_scan", TOK,
            ("        alternatives = sorted(specials, key=len, reverse=True)\n        return re.split(\"(\" + \"|\".join(re.escape(s) for s in alternatives) + \")\", text)",
             "        out, start, i = [], 0, 0\n        longest = sorted(specials, key=len, reverse=True)\n        while i < len(text):\n"
             "            hit = next((s for s in longest if text.startswith(s, i)), None)\n            if hit is None:\n                i += 1\n                continue\n"
             "            out += [text[start:i], hit]\n            i = start = i + len(hit)\n        return out + [text[start:]]"),
            "finds the special tokens with str.startswith instead of a regex"),
    control("stream_by_hand", TOK,
            ("        decoder = codecs.getincrementaldecoder(\"utf-8\")(errors=\"replace\")\n        for i in ids:\n"
             "            yield decoder.decode(vocab[i])\n        tail = decoder.decode(b\"\", final=True)\n        if tail:\n            yield tail",
             "        buf = b\"\"\n        for i in ids:\n            buf += vocab[i]\n            cut = len(buf)\n"
             "            for back in range(1, min(3, len(buf)) + 1):      # an unfinished character at the end?\n"
             "                b = buf[-back]\n                if b >> 6 != 0b10:\n"
             "                    need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1\n"
             "                    if need > back:\n                        cut = len(buf) - back\n                    break\n"
             "            head, buf = buf[:cut], buf[cut:]\n"
             "            yield head.decode(\"utf-8\", errors=\"replace\")\n"
             "        if buf:\n            yield buf.decode(\"utf-8\", errors=\"replace\")"),
            "buffers the bytes of an unfinished character by hand, from the UTF-8 lead byte"),
]

CHAPTER_AS_ANSWER = {
    PAIRS: chapter_code("tokenization", "get_pair_counts", "merge"),
    TOK: "import math\n\n\n" + chapter_code("tokenization", "BPETokenizer"),
}
