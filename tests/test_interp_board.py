"""Board-state labels against hand-worked positions and an independent python-chess replay."""

from pathlib import Path

import chess
import chess.pgn
import numpy as np
import pytest

from moex.interp import board

SHARED_PGN = Path(__file__).resolve().parents[2] / "shared/data/chess/games.pgn"


def labels_at(game, dot_index, group):
    _, _, L, names, _ = board.labels_for_games([game], [group])
    return dict(zip(names, L[dot_index]))


def test_dot_positions_and_pawn_after_e4():
    g, p, L, names, slices = board.labels_for_games([";1.e4 e5 2.Nf3"], ["piece", "empty"])
    assert g.tolist() == [0, 0] and p.tolist() == [2, 10]
    lab = dict(zip(names, L[1]))  # board after 1.e4 e5
    assert lab["piece/e4:P"] and lab["piece/e5:p"] and not lab["piece/e2:P"] and not lab["piece/f3:N"]
    assert lab["empty/e2:empty"] and not lab["empty/e4:empty"] and lab["empty/e3:empty"]
    assert L[1, slices["piece"]].sum() == 32 and L[1, slices["empty"]].sum() == 32


def test_masked_set_ignores_pieces_on_their_start_squares():
    _, _, L, names, _ = board.labels_for_games([";1.e4 e5 2.Nf3 Nc6 3.Bb5"], ["piece_masked"])
    assert len(names) == 768
    assert not L[0].any()  # start position: every piece is on its own start square
    on = {n for n, v in zip(names, L[2]) if v}
    assert on == {"piece_masked/e4:P", "piece_masked/e5:p", "piece_masked/f3:N", "piece_masked/c6:n"}


def test_castling_rights():
    game = ";1.e4 e5 2.Ke2 Ke7 3.a3"
    before, after = labels_at(game, 1, "castling"), labels_at(game, 2, "castling")
    assert all(before.values()) and not any(after.values())
    rooks = labels_at(";1.h4 a5 2.Rh3 Ra6 3.a3", 2, "castling")
    assert rooks == {"castling/white_kingside": False, "castling/white_queenside": True,
                     "castling/black_kingside": True, "castling/black_queenside": False}


def test_en_passant_only_next_to_an_enemy_pawn():
    game = ";1.e4 a6 2.e5 d5 3.exd6"
    assert labels_at(game, 2, "en_passant")["en_passant/en_passant_available"]
    assert not labels_at(game, 1, "en_passant")["en_passant/en_passant_available"]
    assert not labels_at(";1.e4 d5 2.exd5", 1, "en_passant")["en_passant/en_passant_available"]


def test_check_side_to_move_and_truncated_last_move():
    game = ";1.e4 e5 2.f4 Qh4+ 3.g3 Qxg3+ 4.hxg3 Bc"  # truncated mid-move at the end
    _, p, L, names, _ = board.labels_for_games([game], ["check", "side_to_move"])
    assert len(p) == 4 and p[-1] == game.index("4.") + 1
    assert L[:, 0].tolist() == [False, False, True, True]
    assert L[:, 1].all()  # it is white's move at every dot


@pytest.mark.parametrize("game, expected", [
    (";1.e4 d5 2.exd5 Nf6 3.Nc3", "1..2"),              # white up a pawn
    (";1.e4 e5 2.Nf3 d6 3.Nxe5 dxe5 4.d3", "-2..-1"),   # knight for a pawn
    (";1.Nf3 e5 2.Ng5 Qxg5 3.d3", "<=-3"),              # knight lost
    (";1.e4 Nf6 2.e5 Ng4 3.Qxg4 d6 4.d3", ">=3"),       # knight won
    (";1.e4 e5 2.Nf3", "0"),
])
def test_material_bins(game, expected):
    _, _, L, names, _ = board.labels_for_games([game], ["material"])
    assert L[-1].sum() == 1 and names[int(L[-1].argmax())] == f"material/material:{expected}"


def test_only_first_20_dots_and_errors():
    moves = ";" + " ".join(f"{i}.Nf3 Nf6 {i + 1}.Ng1 Ng8" for i in range(1, 40, 2))  # shuffling knights
    assert board.labels_for_games([moves], ["check"])[0].shape == (20,)
    with pytest.raises(ValueError, match="illegal move 'Ke3'"):
        board.labels_for_games([";1.Ke3 e5 2.d4"], ["check"])
    with pytest.raises(KeyError, match="valid"):
        board.labels_for_games([";1.e4"], ["nonsense"])


def test_registry_adds_a_property_with_one_function():
    @board.register_property("test_queens_off", ["no_queens"])
    def no_queens(b):
        return np.array([not b.pieces(chess.QUEEN, chess.WHITE) and not b.pieces(chess.QUEEN, chess.BLACK)])

    try:
        _, _, L, names, _ = board.labels_for_games([";1.e4 d5 2.exd5 Qxd5 3.Qf3 Qxf3 4.Nxf3 e6 5.d3"],
                                                    ["test_queens_off"])
        assert names == ["test_queens_off/no_queens"] and L[:, 0].tolist() == [False] * 4 + [True]
        with pytest.raises(ValueError, match="twice"):
            board.register_property("test_queens_off", ["x"])(no_queens)
    finally:
        del board.PROPERTIES["test_queens_off"]


def game_to_string(game: chess.pgn.Game, max_chars: int = 256) -> str:
    """`;1.e4 e5 2.Nf3 ...` written here by hand, independent of moex.data."""
    b, parts = game.board(), []
    for ply, mv in enumerate(game.mainline_moves()):
        san = b.san_and_push(mv)
        parts.append(f"{ply // 2 + 1}.{san}" if ply % 2 == 0 else san)
    return (";" + " ".join(parts))[:max_chars]


@pytest.mark.skipif(not SHARED_PGN.exists(), reason="shared chess data not present")
def test_real_games_match_an_independent_replay():
    """Piece labels at each dot equal python-chess's piece_at() after 2(k-1) plies of the PGN game."""
    with open(SHARED_PGN) as f:
        pgn_games = [chess.pgn.read_game(f) for _ in range(15)]
    strings = [game_to_string(g, max_chars=256) for g in pgn_games]
    g_P, p_P, L, names, slices = board.labels_for_games(strings, ["piece", "castling"])
    assert len(g_P) > 15 * 10
    for row, (gi, pos) in enumerate(zip(g_P, p_P)):
        k = strings[gi][:pos].count(".")  # dots before this one = moves each side has played
        b = pgn_games[gi].board()
        for mv in list(pgn_games[gi].mainline_moves())[: 2 * k]:
            b.push(mv)
        expect = np.zeros((64, 12), bool)
        for sq in range(64):
            pc = b.piece_at(sq)
            if pc is not None:
                expect[sq, board.CLASSES.index(pc.symbol())] = True
        assert (L[row, slices["piece"]].reshape(64, 12) == expect).all()
        assert L[row, slices["castling"]][0] == b.has_kingside_castling_rights(chess.WHITE)
