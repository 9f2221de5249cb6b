"""Tokenizers: exact chess vocabulary, round trips, save/load of every kind."""

import json
import string

import pytest

from moex.data import (
    ByteTokenizer,
    CharTokenizer,
    ChessTokenizer,
    DataError,
    SentencePieceTokenizer,
    build_tokenizer,
    load_tokenizer,
)


def test_chess_vocab_is_exactly_the_32_characters():
    expected = set(" #+-.;=") | set(string.digits) | set("BKNOQR") | set("abcdefgh") | {"x"}
    tok = ChessTokenizer()
    assert tok.vocab_size == 32 == len(expected)
    assert set(tok.decode(range(32))) == expected
    assert tok.decode(range(32)) == "".join(sorted(expected))  # ASCII order


def test_chess_round_trip_and_unknown_character():
    tok = ChessTokenizer()
    s = ";1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7# 5.O-O-O e1=Q+"
    ids = tok.encode(s)
    assert len(ids) == len(s) and all(0 <= i < 32 for i in ids)
    assert tok.decode(ids) == s
    with pytest.raises(DataError, match="'P'"):
        tok.encode(";1.Pe4")
    with pytest.raises(DataError, match="out of range"):
        tok.decode([32])


def test_byte_round_trip_unicode():
    tok = ByteTokenizer()
    s = "naïve café — 東京\n"
    ids = tok.encode(s)
    assert ids == list(s.encode("utf-8")) and tok.vocab_size == 256
    assert tok.decode(ids) == s


def test_char_tokenizer_sorted_vocab_round_trip(tmp_path):
    tok = CharTokenizer.train(["hello world", "abc"])
    assert tok.decode(range(tok.vocab_size)) == "".join(sorted(set("hello worldabc")))
    assert tok.decode(tok.encode("world hello")) == "world hello"
    with pytest.raises(DataError, match="'z'"):
        tok.encode("z")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
    assert again.identity() == tok.identity()


@pytest.mark.parametrize("kind", ["chess", "byte"])
def test_fixed_tokenizers_save_load(tmp_path, kind):
    tok = build_tokenizer(kind)
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["kind"] == kind
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size


def _corpus(n=400):
    words = ["the", "king", "queen", "castle", "moves", "to", "a", "square", "and", "takes", "pawn", "rook"]
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 9)) + "." for i in range(n)]


def test_sentencepiece_train_save_load_round_trip(tmp_path):
    tok = SentencePieceTokenizer.train(_corpus(), vocab_size=400)
    assert 259 < tok.vocab_size <= 400  # byte pieces plus learned merges; tiny corpus may not fill it
    text = "the king takes a pawn.\nThe Queen  castles ünïcode!\n"  # unseen chars go through bytes
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok.encode("the king takes a pawn.")) < len("the king takes a pawn.")  # merges were learned
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    again = load_tokenizer(tmp_path)
    assert isinstance(again, SentencePieceTokenizer)
    assert again.encode(text) == ids and again.identity() == tok.identity()
    assert again.encode_batch(["a b", "king"]) == [tok.encode("a b"), tok.encode("king")]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no saved tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(DataError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(DataError, match="model file"):
        load_tokenizer(tmp_path)
