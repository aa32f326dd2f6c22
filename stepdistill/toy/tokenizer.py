"""A real CLIP tokenizer (byte-level BPE) for the toy vocabulary, built by the project's own code.

CLIP's BPE works on the bytes of each lower-cased word, mapped to printable unicode characters
(GPT-2's ``bytes_to_unicode``), with ``</w>`` marking the end of a word. Its vocabulary is the 256
byte symbols, the same 256 with ``</w>``, one entry per merge, and the two special tokens; that is
the layout built here, with merges learnt by the classic BPE algorithm (Sennrich et al. 2016) on the
toy captions until every caption word is a single token. Unknown words still tokenize, byte by byte.
"""
from __future__ import annotations

import collections
from pathlib import Path

from transformers import CLIPTokenizer

from .scenes import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # SD's text context length


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(words: collections.Counter) -> list[tuple[str, str]]:
    """Learn BPE merges over ``words`` (word -> count) until no pair is left inside any word."""
    b2u = bytes_to_unicode()
    corpus = {}
    for word, count in words.items():
        symbols = [b2u[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        corpus[tuple(symbols)] = count
    merges = []
    while True:
        pairs = collections.Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        # most frequent pair, ties broken alphabetically so the result is deterministic
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, count in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        corpus = merged


def caption_word_counts() -> collections.Counter:
    return collections.Counter(vocabulary())


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = bytes_to_unicode()
    symbols = list(b2u.values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = learn_bpe(caption_word_counts())
    vocab_list += ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_toy_tokenizer():
    """A ``transformers.CLIPTokenizer`` over the toy vocabulary (77-token context, SD 1.5's special tokens)."""
    vocab, merges = build_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=MODEL_MAX_LENGTH)


def save_toy_tokenizer(directory: str | Path):
    tok = build_toy_tokenizer()
    tok.save_pretrained(str(directory))
    return tok
