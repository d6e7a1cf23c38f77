"""Character tokenizer: every distinct character of the training text is one token.

    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode("To be"); tokenizer.decode(ids) == "To be"
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from utils.errors import UserError


class UnknownCharactersError(UserError):
    """Text holds characters the vocabulary has never seen."""


class CharTokenizer:
    def __init__(self, chars: Sequence[str]) -> None:
        if not chars:
            raise ValueError("a tokenizer needs at least one character")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("vocabulary must be distinct single characters")
        self.chars = list(chars)
        self._id_of = {c: i for i, c in enumerate(self.chars)}

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
            unknown = sorted(set(text) - self._id_of.keys())
            listed = ", ".join(repr(c) for c in unknown)
            raise UnknownCharactersError(
                f"{len(unknown)} character(s) outside the vocabulary: {listed}"
            ) from None

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
            raise UserError(f"cannot read tokenizer {path}: {error}") from None
