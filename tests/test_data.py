"""Data pipeline: chess strings, PGN reading, random games, sources, packing, build_data."""

import io
import re
from pathlib import Path

import chess
import chess.pgn
import numpy as np
import pytest
import torch

import moex.data.stream as stream_mod
from moex.config import DataConfig
from moex.data import (
    ChessTokenizer,
    DataError,
    TokenBlocks,
    build_data,
    game_to_string,
    load_documents,
    random_games,
    read_pgn,
)
from moex.data.prepare import read_index, shard_paths
from moex.data.tokenizers import ByteTokenizer

SHARED_PGN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chess" / "games.pgn"

SCHOLARS_MATE_PGN = """[Event "Test"]
[Result "1-0"]

1. e4 e5 2. Bc4 Nc6 3. Qh5 Nf6 4. Qxf7# 1-0
"""


def replay(game_string: str) -> chess.Board:
    """Independent check of a move string: parse every SAN token with python-chess from the start."""
    assert game_string.startswith(";1.")
    board = chess.Board()
    for token in game_string[1:].split(" "):
        san = re.sub(r"^\d+\.", "", token)
        move = board.parse_san(san)  # raises on an illegal move
        assert board.san(move) == san  # canonical SAN with +/#
        board.push(move)
    return board


# --------------------------------------------------------------------------- game strings


def test_game_to_string_scholars_mate():
    game = chess.pgn.read_game(io.StringIO(SCHOLARS_MATE_PGN))
    assert game_to_string(game) == ";1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7#"
    assert game_to_string(["e4", "e5", "Bc4", "Nc6", "Qh5", "Nf6", "Qxf7"]) == ";1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7#"
    assert game_to_string(game, max_chars=12) == ";1.e4 e5 2.B"


def test_game_to_string_castling_check_promotion():
    uci = "e2e4 d7d5 e4d5 c7c6 d5c6 d8d2 e1d2 g8f6 c6b7 e8d8 b7a8q".split()
    s = game_to_string([chess.Move.from_uci(u) for u in uci])
    assert s == ";1.e4 d5 2.exd5 c6 3.dxc6 Qxd2+ 4.Kxd2 Nf6 5.cxb7 Kd8 6.bxa8=Q"
    s = game_to_string("e4 e5 Nf3 Nc6 Bc4 Bc5 O-O Nf6 Re1".split())
    assert s == ";1.e4 e5 2.Nf3 Nc6 3.Bc4 Bc5 4.O-O Nf6 5.Re1"
    with pytest.raises(DataError, match="ply 2"):
        game_to_string(["e4", "e4"])


# --------------------------------------------------------------------------- PGN


def test_read_pgn_skips_comments_variations_results(tmp_path):
    pgn = tmp_path / "two.pgn"
    pgn.write_text(
        SCHOLARS_MATE_PGN
        + '\n[Event "B"]\n[Result "*"]\n\n1. d4 {a comment} d5 (1... Nf6 2. c4) 2. c4 $1 e6 *\n'
    )
    assert read_pgn(pgn) == [";1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7#", ";1.d4 d5 2.c4 e6"]
    assert read_pgn(pgn, max_games=1) == [";1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7#"]


def test_read_pgn_cache_equals_parse_and_follows_the_file(tmp_path):
    pgn, cache = tmp_path / "g.pgn", tmp_path / "cache"
    pgn.write_text(SCHOLARS_MATE_PGN + '\n[Event "B"]\n[Result "*"]\n\n1. d4 d5 2. c4 e6 *\n')
    fresh = read_pgn(pgn, max_chars=12)
    assert read_pgn(pgn, max_chars=12, cache_dir=cache) == fresh  # first call parses and writes the cache
    assert len(list(cache.iterdir())) == 1
    assert read_pgn(pgn, max_chars=12, cache_dir=cache) == fresh  # second call reads it
    assert read_pgn(pgn, max_games=1, cache_dir=cache) == read_pgn(pgn, max_games=1)  # other arguments: own entry
    pgn.write_text(SCHOLARS_MATE_PGN)  # a changed file is parsed again
    assert read_pgn(pgn, max_chars=12, cache_dir=cache) == read_pgn(pgn, max_chars=12)


def test_corrupt_pgn_names_file_and_line(tmp_path):
    good = '[Event "ok"]\n[Result "*"]\n\n1. e4 e5 *\n\n'
    bad = '[Event "bad"]\n[Result "*"]\n\n1. e4 e5 2. Ke3 Nc6 *\n\n'  # Ke3 is illegal
    pgn = tmp_path / "corrupt.pgn"
    pgn.write_text("\n" + good + good + bad + good)
    # blank line 1, each game 5 lines (with its trailing blank): the bad game starts on line 2 + 2*5 = 12
    assert pgn.read_text().splitlines()[11] == '[Event "bad"]'
    with pytest.raises(DataError, match=re.escape(f"{pgn}:12") + r".*game 3"):
        read_pgn(pgn)
    assert len(read_pgn(pgn, max_games=2)) == 2  # streaming stops before the bad game
    pgn.write_text('[Event "x"]\n\n1. e4 e5 2. Nxe5 *\n')
    with pytest.raises(DataError, match=re.escape(f"{pgn}:1")):
        read_pgn(pgn)
    with pytest.raises(DataError, match="not found"):
        read_pgn(tmp_path / "missing.pgn")


@pytest.mark.skipif(not SHARED_PGN.is_file(), reason="shared chess data absent")
def test_read_shared_pgn_first_50_games():
    games = read_pgn(SHARED_PGN, max_games=50)
    assert len(games) == 50
    assert games[0].startswith(";1.e4 e5 2.Nf3 Nf6 3.d4 Nxe4 4.Bd3 d5")
    for g in games:
        replay(g)
    assert all(set(g) <= set(ChessTokenizer().chars) for g in games)


# --------------------------------------------------------------------------- random games


def test_random_games_legal_and_deterministic():
    games = random_games(30, seed=5, max_plies=60)
    assert games == random_games(30, seed=5, max_plies=60)
    assert games != random_games(30, seed=6, max_plies=60)
    assert len(set(games)) == 30
    for g in games:
        board = replay(g)
        plies = len(board.move_stack)
        ended = board.is_checkmate() or board.is_stalemate() or board.is_insufficient_material()
        assert plies == 60 or (plies < 60 and ended)
    assert all(len(g) <= 40 for g in random_games(10, seed=5, max_plies=60, max_chars=40))


def test_random_games_same_with_workers():
    assert random_games(150, seed=1, max_plies=10, workers=2) == random_games(150, seed=1, max_plies=10)


# --------------------------------------------------------------------------- packing


def _blocks(tmp_path, n_tokens=1000, block_size=9, seed=0):
    path = tmp_path / "toks.bin"
    np.arange(n_tokens, dtype=np.uint16).tofile(path)
    return TokenBlocks(path, block_size, np.uint16, seed=seed)


def test_get_batch_shift_determinism_and_epochs(tmp_path):
    blocks = _blocks(tmp_path)  # 1000 tokens in blocks of 10 -> 100 blocks
    assert len(blocks) == 100
    x, y = blocks.get_batch(7, 4)
    assert x.shape == y.shape == (4, 9) and x.dtype == y.dtype == torch.int64
    assert (x[:, 1:] == y[:, :-1]).all() and (y[:, -1] == x[:, -1] + 1).all()
    assert (x[:, 0] % 10 == 0).all()  # every row starts on a block boundary
    again = _blocks(tmp_path)  # a fresh object (a resumed run) gives the same batch
    assert all((a == b).all() for a, b in zip(again.get_batch(7, 4), (x, y)))
    epoch0 = np.concatenate([blocks.block_indices(s, 10) for s in range(10)])
    epoch1 = np.concatenate([blocks.block_indices(s, 10) for s in range(10, 20)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))
    assert not (epoch0 == epoch1).all()  # reshuffled each epoch
    straddle = blocks.block_indices(3, 30)  # positions 90..119 cross into epoch 1
    assert straddle.tolist() == epoch0[90:].tolist() + epoch1[:20].tolist()


def test_rank_slices_partition_the_global_batch(tmp_path):
    blocks = _blocks(tmp_path)
    for step in (0, 5, 13):
        parts = [blocks.block_indices(step, 3, rank=r, world_size=4) for r in range(4)]
        assert np.concatenate(parts).tolist() == blocks.block_indices(step, 12).tolist()
        assert len(set(np.concatenate(parts).tolist())) == 12
    with pytest.raises(ValueError):
        blocks.get_batch(0, 2, rank=2, world_size=2)


def test_iter_eval_deterministic_in_order(tmp_path):
    blocks = _blocks(tmp_path, n_tokens=75, block_size=9)  # 7 blocks, 5-token tail unused
    batches = list(blocks.iter_eval(3))
    assert [len(x) for x, _ in batches] == [3, 3, 1]
    firsts = np.concatenate([x[:, 0].numpy() for x, _ in batches])
    assert firsts.tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert len(list(blocks.iter_eval(3, max_batches=2))) == 2
    per_rank = [list(blocks.iter_eval(2, rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in per_rank] == [1, 1]  # only full global batches with several ranks
    assert per_rank[1][0][0][:, 0].tolist() == [20, 30]
    with pytest.raises(DataError, match="fewer than one block"):
        _blocks(tmp_path, n_tokens=5, block_size=9)


# --------------------------------------------------------------------------- build_data


def _split_tokens(cache_dir, split):
    """A split's whole token stream: its shard files concatenated."""
    paths = shard_paths(cache_dir, read_index(cache_dir), split)
    return np.concatenate([np.fromfile(p, dtype=np.uint16) for p in paths])


def _chess_cfg(tmp_path, **kw):
    return DataConfig(source="chess_random", num_games=40, val_fraction=0.1, cache_dir=str(tmp_path / "cache"), **kw)


def test_build_data_chess_cache_hit_skips_tokenizing(tmp_path, monkeypatch):
    cfg = _chess_cfg(tmp_path)
    first = build_data(cfg, 64, tmp_path / "tok", progress=False)
    assert not first.info["cache_hit"] and first.tokenizer.vocab_size == 32
    assert first.info["train"]["documents"] == 36 and first.info["val"]["documents"] == 4
    x1, y1 = first.train.get_batch(2, 4)

    def boom(*a, **k):
        raise AssertionError("cache miss: data was regenerated or re-tokenized")

    monkeypatch.setattr(stream_mod, "random_games", boom)
    monkeypatch.setattr(ChessTokenizer, "encode", boom)
    second = build_data(cfg, 64, tmp_path / "tok", progress=False)
    assert second.info["cache_hit"] and second.info["train"] == first.info["train"]
    x2, y2 = second.train.get_batch(2, 4)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert not list(Path(first.info["cache_dir"]).glob(".*tmp"))
    changed = _chess_cfg(tmp_path, seed=99)  # a different seed must not hit the cache
    with pytest.raises(AssertionError, match="cache miss"):
        build_data(changed, 64, progress=False)


def test_chess_train_val_games_disjoint_and_complete(tmp_path):
    cfg = _chess_cfg(tmp_path)
    train, val = load_documents(cfg)
    games = random_games(40, cfg.seed, stream_mod.RANDOM_GAME_MAX_PLIES, cfg.max_game_chars)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(games) and len(val) == 4
    bundle = build_data(cfg, 64, progress=False)
    stream = _split_tokens(bundle.info["cache_dir"], "val")
    assert bundle.tokenizer.decode(stream.tolist()) == "".join(val)


def test_build_data_text_with_data_root_env(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    lines = [f"line {i} has some words" for i in range(40)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("MOEX_DATA_ROOT", str(root))
    cfg = DataConfig(source="text", path="corpus.txt", root="/nonexistent", tokenizer="char",
                     val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    bundle = build_data(cfg, 16, tmp_path / "tok", progress=False)
    info = bundle.info
    assert info["train"]["documents"] == 30 and info["val"]["documents"] == 10
    assert info["val"]["words"] == sum(len(line.split()) for line in lines[30:])
    stream = _split_tokens(info["cache_dir"], "train")
    assert bundle.tokenizer.decode(stream.tolist()) == "".join(line + "\n" for line in lines[:30])
    assert info["train"]["blocks"] == len(stream) // 17
    with pytest.raises(DataError, match="holds a char tokenizer"):
        build_data(DataConfig(**{**cfg.__dict__, "tokenizer": "byte"}), 16, tmp_path / "tok", progress=False)


def test_missing_text_file_lists_tried_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEX_DATA_ROOT", raising=False)
    cfg = DataConfig(source="text", path="nope/x.txt", root=str(tmp_path), tokenizer="byte",
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope" / "x.txt")) + ".*nope/x.txt"):
        build_data(cfg, 16, progress=False)
