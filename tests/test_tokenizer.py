from __future__ import annotations

import pytest

from tokenizer import CharTokenizer, UnknownCharactersError


def test_tokenizer_roundtrip_restores_text():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == len(set(text))


def test_ids_follow_sorted_character_order():
    tokenizer = CharTokenizer.from_text("cab")
    assert tokenizer.encode("abc") == [0, 1, 2]


def test_unknown_characters_are_listed_in_the_error():
    tokenizer = CharTokenizer.from_text("hello world")
    with pytest.raises(UnknownCharactersError, match=r"^2 character\(s\) outside the vocabulary: "
                                                     r"'!', 'Z'"):
        tokenizer.encode("Zhello!")


def test_saved_tokenizer_loads_back_identical(tmp_path):
    tokenizer = CharTokenizer.from_text("ünïcödé text\n")
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_json(), encoding="utf-8")
    assert CharTokenizer.load(path).chars == tokenizer.chars
