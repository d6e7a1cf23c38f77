"""Character tokenizer: every distinct character of the training text is one token.

    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode("To be"); tokenizer.decode(ids) == "To be"
    ids = tokenizer.encode_array(chunk)      # numpy, vectorised: for whole corpora

Token ids follow the characters' code points, so the vocabulary of a text is the same whether
it is found in one piece (from_text) or chunk by chunk (CharacterSet). This file imports
nothing of the project, so it can be copied into another one alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


class UnknownCharactersError(ValueError):
    """Text holds characters the vocabulary has never seen."""


class TokenizerFileError(ValueError):
    """A tokenizer file cannot be read or holds no valid vocabulary."""


def code_points(text: str) -> np.ndarray:
    """The text's Unicode code points: uint8 for ASCII text (the common case, a quarter of
    the memory), uint32 otherwise."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16)


class CharacterSet:
    """The distinct characters of a text fed in chunks, and how many there were."""

    def __init__(self) -> None:
        self.seen = np.zeros(0, dtype=bool)  # seen[code point]
        self.count = 0

    def add(self, text: str) -> None:
        codes = code_points(text)
        present = np.bincount(codes) > 0
        if len(present) > len(self.seen):
            present[:len(self.seen)] |= self.seen
            self.seen = present
        else:
            self.seen[:len(present)] |= present
        self.count += len(codes)

    @property
    def chars(self) -> list[str]:
        return [chr(code) for code in np.flatnonzero(self.seen)]


class CharTokenizer:
    def __init__(self, chars: Sequence[str]) -> None:
        if not chars:
            raise ValueError("a tokenizer needs at least one character")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("vocabulary must be distinct single characters")
        self.chars = list(chars)
        self._id_of = {c: i for i, c in enumerate(self.chars)}
        # code point -> id, or -1 for a character outside the vocabulary
        self._ids_by_code = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int32)
        self._ids_by_code[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id_of[c] for c in text]
        except KeyError:
            raise UnknownCharactersError(self.describe_unknown(set(text))) from None

    def describe_unknown(self, chars: Iterable[str]) -> str:
        unknown = self.unknown_characters(chars)
        listed = ", ".join(repr(c) for c in unknown)
        return f"{len(unknown)} character(s) outside the vocabulary: {listed}"

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as a numpy array of token_dtype(vocab_size), without a per-character
        Python loop; the same ids as encode()."""
        codes = code_points(text)
        table = self._ids_by_code
        # a code point past the table, or one it maps to -1, is outside the vocabulary
        if len(codes) and int(codes.max()) >= len(table):
            raise UnknownCharactersError(self.describe_unknown(set(text)))
        ids = table[codes]
        if (ids < 0).any():
            raise UnknownCharactersError(self.describe_unknown(set(text)))
        return ids.astype(token_dtype(self.vocab_size))

    def unknown_characters(self, chars: Iterable[str]) -> list[str]:
        """Those of chars outside the vocabulary, sorted."""
        return sorted(set(chars) - self._id_of.keys())

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(payload["chars"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TokenizerFileError(f"cannot read tokenizer {path}: {error}") from None
