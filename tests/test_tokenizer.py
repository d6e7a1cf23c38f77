from __future__ import annotations

import numpy as np
import pytest

from tokenizer import CharacterSet, CharTokenizer, UnknownCharactersError, token_dtype


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


@pytest.mark.parametrize("text", ["First Citizen:\nspeak.\n", "ünïcödé ☃ text\n", ""],
                         ids=["ascii", "unicode", "empty"])
def test_vectorised_encoding_and_chunked_vocabulary_match_the_plain_ones(text):
    tokenizer = CharTokenizer.from_text(text or "x")
    ids = tokenizer.encode_array(text)
    assert ids.dtype == np.uint8 and ids.tolist() == tokenizer.encode(text)
    characters = CharacterSet()
    for start in range(0, len(text), 5):
        characters.add(text[start:start + 5])
    assert characters.count == len(text)
    assert characters.chars == (CharTokenizer.from_text(text).chars if text else [])


@pytest.mark.parametrize("text", ["Zhello!", "hello ☃!"], ids=["ascii", "past-the-table"])
def test_vectorised_encoding_lists_unknown_characters(text):
    tokenizer = CharTokenizer.from_text("hello world")
    with pytest.raises(UnknownCharactersError, match=r"^2 character\(s\) outside the vocabulary"):
        tokenizer.encode_array(text)


def test_a_vocabulary_past_256_characters_gets_uint16_ids():
    tokenizer = CharTokenizer([chr(0x4E00 + i) for i in range(300)])
    assert tokenizer.encode_array(chr(0x4E00 + 299)).tolist() == [299]
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16
