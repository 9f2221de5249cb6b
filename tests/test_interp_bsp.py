"""Board-state labels against hand-worked positions; BSP metrics against known answers."""

from pathlib import Path

import numpy as np
import pytest

from moex.interp import board, bsp

SHARED_PGN = Path(__file__).resolve().parents[2] / "shared/data/chess/games.pgn"


def labels_at(game, dot_index, group):
    g, p, L, names, slices = board.labels_for_games([game], [group])
    return dict(zip(names, L[dot_index]))


def test_after_e4_pawn_on_e4_and_e2_empty():
    lab = labels_at(";1.e4 e5 2.Nf3", 1, "piece")
    assert lab["piece/e4:P"] and not lab["piece/e2:P"]
    assert labels_at(";1.e4 e5 2.Nf3", 1, "empty")["empty/e2:empty"]
    # at the first dot, the start position: masked set has nothing positive
    g, p, L, names, _ = board.labels_for_games([";1.e4 e5 2.Nf3"], ["piece_masked"])
    assert p.tolist() == [2, 10] and not L[0].any() and L[1].sum() == 2  # e4 pawn and e5 pawn
    masked = dict(zip(names, L[1]))
    assert masked["piece_masked/e4:P"] and masked["piece_masked/e5:p"] and not masked["piece_masked/e1:K"]


def test_castling_rights_lost_after_king_move():
    lab = labels_at(";1.e4 e5 2.Ke2 Ke7 3.a3", 2, "castling")
    assert not lab["castling/white_kingside"] and not lab["castling/black_queenside"]
    assert labels_at(";1.e4 e5 2.Ke2 Ke7 3.a3", 1, "castling")["castling/black_kingside"]


def test_en_passant_right_after_double_push():
    game = ";1.e4 a6 2.e5 d5 3.exd6"
    assert labels_at(game, 2, "en_passant")["en_passant/en_passant_available"]
    assert not labels_at(game, 1, "en_passant")["en_passant/en_passant_available"]


def test_check_and_truncated_last_move():
    game = ";1.e4 e5 2.f4 Qh4+ 3.g3 Qxg3+ 4.hxg3 Bc"  # truncated mid-move at the end
    g, p, L, names, _ = board.labels_for_games([game], ["check"])
    assert L[:, 0].tolist() == [False, False, True, True]  # white to move at every dot


def planted(P=600, noise_F=20, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.random((P, 3)) < 0.3
    acts = np.concatenate([labels[:, :1].astype(np.float32) * 2.0, rng.normal(size=(P, noise_F)).astype(np.float32)], 1)
    return acts, labels


def test_planted_feature_is_found_and_labelled_noise_is_not():
    acts, labels = planted()
    cov = bsp.coverage(acts, labels)
    f1 = bsp.f1_matrix(*bsp.pair_counts(acts > 0, labels))[0]
    assert f1[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert cov["score"] >= 1 / 3  # property 0 perfectly covered, the others partially at best
    L = bsp.label_features(acts, labels, bsp.feature_max(acts), 0.5)
    assert L[0, 0] and not L[1:].any()
    rec = bsp.reconstruction(acts[:300], labels[:300, :1], acts[300:], labels[300:, :1])
    assert rec["score"] == pytest.approx(1.0, abs=1e-6) and rec["labelled_features"] == 1


def test_coverage_counts_absent_properties_as_zero():
    acts, labels = planted()
    labels = np.concatenate([labels[:, :1], np.zeros((len(labels), 3), bool)], 1)
    assert bsp.coverage(acts[:, :1], labels)["score"] == pytest.approx(0.25, abs=1e-6)


@pytest.mark.skipif(not SHARED_PGN.exists(), reason="shared chess data not present")
def test_sanity_figures_on_real_games():
    """DESIGN.md: one-hot labels as features give coverage = present/768 and reconstruction ~ 1;
    random Gaussian features give low coverage and nothing labelled."""
    from moex.data import read_pgn

    games = [g[:256] for g in read_pgn(SHARED_PGN, max_games=60)]
    g, p, L, names, slices = board.labels_for_games(games, ["piece_masked"])
    train, test = g < 40, g >= 40
    onehot = L.astype(np.float32)
    cov = bsp.coverage(onehot[train], L[train])
    assert cov["score"] == pytest.approx(cov["present"] / 768, abs=1e-6)
    rec = bsp.reconstruction(onehot[train], L[train], onehot[test], L[test])
    assert rec["score"] > 0.95
    rnd = np.random.default_rng(0).normal(size=(len(L), 512)).astype(np.float32)
    cov_r = bsp.coverage(rnd[train], L[train])
    assert cov_r["score"] < 0.15
    assert bsp.reconstruction(rnd[train], L[train], rnd[test], L[test])["labelled_features"] == 0
