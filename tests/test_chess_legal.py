"""The chess-legal suite: legality against python-chess, prompts, and its counts with hand-made samplers."""

import random
import shutil

import chess
import pytest

from moex.eval.chess_legal import continuation, legal_move, legal_rate, parse_game, play_engine, prompt_for

GAMES = [
    ";1.e4 e5 2.Nf3 Nc6 3.Bb5 a6 4.Ba4 Nf6 5.O-O Be7 6.Re1 b5 7.Bb3 d6 8.c3 O-O",
    ";1.d4 Nf6 2.c4 e6 3.Nc3 Bb4 4.Qc2 O-O 5.a3 Bxc3+ 6.Qxc3 b6 7.Bg5 Bb7",
    ";1.f3 e5 2.g4 Qh4#",
]


def board_after(*sans):
    b = chess.Board()
    for s in sans:
        b.push_san(s)
    return b


def test_legality_on_hand_made_prefixes_agrees_with_python_chess():
    b = board_after("e4", "e5", "Nf3")  # ;1.e4 e5 2.Nf3  -- Black to move
    for san in ["Nc6", "Nf6", "Ke7", "Qh4", "Bc5", "d6", "d5"]:
        assert legal_move(b, san) == b.parse_san(san)
    for san in ["O-O", "e4", "Nxe4", "Nc3", "Qxf2", "e7e5", "xx", "", "--", "Z0", "2.Nc6"]:
        assert legal_move(b, san) is None, san
    castle = board_after("e4", "e5", "Nf3", "Nc6", "Bc4", "Bc5")  # White may castle now
    assert legal_move(castle, "O-O") == chess.Move.from_uci("e1g1")
    mated = board_after("f3", "e5", "g4", "Qh4")
    assert mated.is_checkmate() and all(legal_move(mated, s) is None for s in ["Kf2", "Ke2", "h3", "O-O"])
    # every move python-chess generates, written canonically, is judged legal; nothing else in this bank is
    rng = random.Random(0)
    for _ in range(20):
        board = chess.Board()
        for _ in range(rng.randrange(0, 30)):
            if board.is_game_over():
                break
            board.push(rng.choice(list(board.legal_moves)))
        legal = {board.san(m) for m in board.legal_moves}
        bank = legal | {"Ke9", "Nb1", "Qd1", "O-O-O", "a1", "h8=Q", "Bx", "e4", "Kxe8"}
        for san in bank:
            assert (legal_move(board, san) is not None) == (san in legal), (board.fen(), san)


def test_prompts_and_game_parsing():
    assert prompt_for([]) == ";1."
    assert prompt_for(["e4"]) == ";1.e4 "
    assert prompt_for(["e4", "e5"]) == ";1.e4 e5 2."
    assert parse_game(";1.e4 e5 2.Nf3 Nc6 3.Bb") == ["e4", "e5", "Nf3", "Nc6"]  # truncated mid-move: dropped
    assert parse_game(GAMES[2]) == ["f3", "e5", "g4", "Qh4#"]
    for g in GAMES:  # a prompt is exactly the game string up to the next move
        sans = parse_game(g)
        for p in range(len(sans)):
            assert g.startswith(prompt_for(sans[:p]) + sans[p])


def test_legal_rate_counts_with_hand_made_samplers():
    games = [parse_game(g) for g in GAMES]
    truth = {prompt_for(s[:p]): s[p] for s in games for p in range(len(s))}
    oracle = legal_rate(games, truth.__getitem__, positions=100, rng=random.Random(0))
    assert oracle == {"legal_moves": 16 + 14 + 4, "positions": 34, "legal_rate": 1.0}
    # always "Nf3": legal exactly where python-chess says so
    want = sum(board_after(*s[:p]).is_legal(m) if (m := _try(board_after(*s[:p]), "Nf3")) else 0
               for s in games for p in range(len(s)))
    got = legal_rate(games, lambda prompt: "Nf3", positions=100, rng=random.Random(0))
    assert got["legal_moves"] == want and 0 < want < 34


def _try(board, san):
    try:
        return board.parse_san(san)
    except ValueError:
        return None


_RNG = random.Random(0)


def first_legal(prompt):
    """Plays a seeded random legal move of the position the prompt spells (no repetition draws)."""
    board = board_after(*parse_game(prompt))
    move = _RNG.choice(sorted(board.legal_moves, key=lambda m: m.uci()))
    return board.san(move)


def test_continuation_counts_consecutive_legal_plies():
    games = [parse_game(g) for g in GAMES[:2]]
    always = continuation(games, first_legal, opening_plies=6)
    assert always["continue_40"] == 1.0 and always["mean_legal_plies"] == 40
    never = continuation(games, lambda prompt: "Ke9", opening_plies=6)
    assert never == {"games": 2, "mean_legal_plies": 0, "continue_20": 0, "continue_40": 0}
    flip = iter([first_legal] * 25 + [lambda p: "??"] * 100)  # 25 legal plies, then garbage
    half = continuation(games[:1], lambda p: next(flip)(p), opening_plies=6)
    assert not board_after(*parse_game(GAMES[0])[:6]).is_game_over()
    assert half["mean_legal_plies"] == 25 and half["continue_20"] == 1 and half["continue_40"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("stockfish") or shutil.which("/usr/games/stockfish")),
                    reason="no UCI engine installed (Debian: apt-get install stockfish)")
def test_engine_games_add_up():
    res = play_engine(first_legal, shutil.which("stockfish") or "/usr/games/stockfish", games=1, max_plies=30)
    assert res["win"] + res["draw"] + res["loss"] == 1 and res["forfeits"] == 0
    res = play_engine(lambda p: "??", shutil.which("stockfish") or "/usr/games/stockfish", games=2)
    assert res == {"win": 0, "draw": 0, "loss": 2, "forfeits": 2}
