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
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                              model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer
