"""A CLIP BPE tokenizer for a closed vocabulary (the world's captions), written from scratch.

transformers' ``CLIPTokenizer`` needs a byte-level BPE vocabulary (``vocab.json``) and merge list
(``merges.txt``). Here the vocabulary is every single byte (inside a word and at its end) plus
merges that spell out each given word, so those words are single tokens and anything else still
tokenizes (byte by byte).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def byte_symbols() -> list[str]:
    """The printable stand-in of each byte used by byte-level BPE (GPT-2 / CLIP): printable Latin-1
    bytes stand for themselves, the others for code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def bpe(word: str, merges: list[str]) -> list[str]:
    """The pieces CLIP's byte-pair encoding splits ``word`` (letters) into under ``merges`` (in
    rank order, "a b" each): the best-ranked adjacent pair is merged everywhere, until none is
    ranked."""
    ranks = {tuple(merge.split(" ")): rank for rank, merge in reversed(list(enumerate(merges)))}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def _split(word: str, merges: list[str], vocab: dict[str, int]) -> list[str] | None:
    """The pieces ``word`` splits into under either BPE that ``CLIPTokenizer`` may run: the Python
    one of transformers 4 (:func:`bpe`, which merges every occurrence of the best pair at once)
    or the ``tokenizers`` library's (which merges one occurrence at a time, so a better-ranked
    pair formed by the first can pre-empt the second); ``None`` when both give one token."""
    from tokenizers.models import BPE

    pieces = bpe(word, merges)
    if len(pieces) > 1:
        return pieces
    model = BPE(vocab, [tuple(merge.split(" ")) for merge in merges], continuing_subword_prefix="",
                end_of_word_suffix="</w>")
    pieces = [token.value for token in model.tokenize(word)]
    return pieces if len(pieces) > 1 else None


def write_clip_tokenizer(directory: str | Path, words: Iterable[str], model_max_length: int = 77):
    """Write a ``CLIPTokenizer`` (``save_pretrained`` layout) whose vocabulary holds ``words`` as
    single tokens into ``directory``, and return it."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    symbols = byte_symbols()
    vocab = {token: index for index, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for word in dict.fromkeys(w.lower() for w in words if w):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    # The merges above spell each word left to right, but BPE applies the best-ranked pair of the
    # whole word first, so another word's earlier merge can split a word into pieces that no merge
    # joins ("man" after "medium"). Such words get merges of their own, ranked after all others:
    # words that already end as one token have no pairs left, so they do not change.
    for word in dict.fromkeys(w.lower() for w in words if w):
        while (pieces := _split(word, merges, vocab)) is not None:
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                              model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer
