"""Linear board probes and k-sparse probing against planted signals, hand counts and scipy's ANOVA."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats
import torch

from moex.interp import board, chess_probes, ksparse, probe


def test_probe_recovers_a_planted_linear_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    w_true = rng.normal(size=(16, 2, 5))  # two heads of 5 classes, each the argmax of a linear map
    y = np.einsum("pd,dsc->psc", x, w_true).argmax(-1)
    r = probe.fit_softmax(x[:2000], y[:2000], 5, l2=1e-6, max_iter=200)
    acc = (r.predict(x[2000:]) == y[2000:]).mean()
    base = (probe.majority(y[:2000], 5)[None] == y[2000:]).mean()
    assert acc > 0.95 and base < 0.5


def test_probe_on_noise_stays_near_the_majority_baseline():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 8)).astype(np.float32)
    y = (rng.random((2000, 3)) < 0.8).astype(int)  # class 1 in 80%, independent of x
    fit = probe.fit_softmax(x[:1000], y[:1000], 2)
    acc = (fit.predict(x[1000:]) == y[1000:]).mean()
    base = (probe.majority(y[:1000], 2)[None] == y[1000:]).mean()
    assert abs(acc - base) < 0.03


def test_majority_baseline_by_hand():
    y = np.array([[0, 2], [1, 2], [1, 0], [0, 0], [1, 2]])  # head 0: three 1s; head 1: three 2s
    assert probe.majority(y, 3).tolist() == [1, 2]
    assert probe.majority(np.array([[0], [1]]), 2).tolist() == [0]  # tie -> smallest class


def test_square_classes_of_the_starting_position():
    # a1..h1 = R N B Q K B N R (white), rank 2 white pawns, ranks 3-6 empty; classes 1 + "PNBRQKpnbrqk".index
    want = [4, 2, 3, 5, 6, 3, 2, 4] + [1] * 8 + [0] * 32 + [7] * 8 + [10, 8, 9, 11, 12, 9, 8, 10]
    assert probe.INITIAL_S.tolist() == want


def test_board_probe_reads_one_hot_boards_perfectly():
    games = [";1.e4 e5 2.Nf3 Nc6 3.Bb5 a6 4.Ba4 Nf6 5.O-O Be7 6.Re1 b5 7.Bb3 d6 8.c3 O-O",
             ";1.d4 d5 2.c4 e6 3.Nc3 Nf6 4.Bg5 Be7 5.e3 O-O 6.Nf3 h6 7.Bh4 b6 8.cxd5 exd5"] * 4
    _, _, labels, _, slices = board.labels_for_games(games)
    onehot = labels[:, slices["piece"]].astype(np.float32)
    half = len(labels) // 2
    r = chess_probes.board_probe(onehot[:half], onehot[half:], labels[:half], labels[half:], slices)
    assert r["accuracy"] == 1.0 and r["accuracy_changed"] == 1.0
    assert r["majority_baseline"] < 1.0 and r["majority_changed"] < r["accuracy_changed"]


def test_f_statistic_matches_scipy_anova_and_mean_diff_by_hand():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 4))
    y = rng.random((200, 3)) < 0.3
    x[:, 1] += 2 * y[:, 0]
    f = ksparse.rank_scores(x, y, "f_stat")
    for q in range(3):
        for j in range(4):
            ref = scipy.stats.f_oneway(x[y[:, q], j], x[~y[:, q], j]).statistic
            assert f[q, j] == pytest.approx(ref, rel=1e-6)
    md = ksparse.rank_scores(x, y, "mean_diff")
    assert md[0, 1] == pytest.approx(abs(x[y[:, 0], 1].mean() - x[~y[:, 0], 1].mean()), rel=1e-9)
    const = ksparse.rank_scores(np.ones((10, 1)), np.arange(10)[:, None] < 5)
    assert const.tolist() == [[0.0]]  # a constant feature separates nothing


def test_logistic_newton_solution_has_zero_gradient():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(2, 3, 500)).astype(np.float32))  # (Q, K, P)
    y = torch.from_numpy(rng.random((2, 500)) < 0.4)
    l2 = 1e-2
    w = ksparse.fit_logistic(x, y, l2=l2).clone().requires_grad_(True)
    xb = torch.cat([x.double(), torch.ones(2, 1, 500, dtype=torch.float64)], 1)
    logit = torch.einsum("qk,qkp->qp", w, xb)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y.double(), reduction="none").mean(1).sum()
    loss = loss + l2 / 2 * (w[:, :-1] ** 2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-6


def planted(P=2000, F=64, Q=6, seed=4):
    rng = np.random.default_rng(seed)
    y = rng.random((P, Q)) < 0.2
    x = rng.normal(size=(P, F)).astype(np.float32)
    x[:, 7] = np.where(y[:, 0], 1.0 + rng.random(P), 0.5 * rng.random(P))  # separates property 0 exactly
    return np.maximum(x, 0), y


def test_k_sparse_picks_the_planted_feature_and_scores_one():
    x, y = planted()
    r = ksparse.probe_properties(x[:1000], y[:1000], x[1000:], y[1000:], ks=(1, 2, 4))
    assert r["properties"].tolist() == list(range(6))
    assert r["features"][0, 0] == 7
    assert r["f1"][1][0] == pytest.approx(1.0, abs=1e-6)
    assert max(r["f1"][k][1:].max() for k in (1, 2, 4)) < 0.5  # noise properties: nothing to find
    summ = ksparse.summarise(r, {"planted": slice(0, 1), "noise": slice(1, 6)})
    assert summ["planted"]["f1"]["1"] == pytest.approx(1.0, abs=1e-6) and summ["noise"]["probed"] == 5


def test_k_sparse_on_sparse_matrices_equals_dense():
    x, y = planted()
    dense = ksparse.probe_properties(x[:1000], y[:1000], x[1000:], y[1000:], ks=(1, 4))
    xs = sp.csr_matrix(x)
    sparse = ksparse.probe_properties(xs[:1000], y[:1000], xs[1000:], y[1000:], ks=(1, 4))
    assert (dense["features"] == sparse["features"]).all()
    for k in (1, 4):
        np.testing.assert_allclose(dense["f1"][k], sparse["f1"][k], atol=1e-9)


def test_rare_properties_are_not_probed():
    x, y = planted()
    y[:, 2] = False
    y[:5, 2] = True  # 5 positives < min_count
    r = ksparse.probe_properties(x[:1000], y[:1000], x[1000:], y[1000:], ks=(1,))
    assert 2 not in r["properties"].tolist()


def test_text_k_sparse_finds_a_planted_pos_feature():
    from moex.interp import pos, text_suite

    rng = np.random.default_rng(5)
    sent_N = np.repeat(np.arange(40), 25)  # 40 sentences of 25 tokens
    tags_N = rng.integers(0, len(pos.UPOS), len(sent_N))
    acts = rng.random((len(sent_N), 12)).astype(np.float32)
    noun = pos.TAG_ID["NOUN"]
    acts[:, 3] = (tags_N == noun) * (1 + rng.random(len(sent_N)))
    r = text_suite.ksparse_pos(acts, tags_N, sent_N, ks=(1, 2))
    assert r["per_tag"]["NOUN"]["1"] == pytest.approx(1.0, abs=1e-6)
    others = [v["1"] for t, v in r["per_tag"].items() if t != "NOUN"]
    assert max(others) < 0.5 and r["probed"] == len(r["per_tag"])


def test_curve_summary_and_points(tmp_path):
    from moex.interp import curve

    rep = {"suite": "chess", "step": 7,
           "sources": {"L0.a": {"coverage": {"score": 0.2}, "reconstruction": {"score": 0.5}},
                       "L1.a": {"coverage": {"score": 0.3}, "reconstruction": {"score": 0.1}}},
           "probe": {"L0.resid": {"accuracy": 0.7, "majority_baseline": 0.6},
                     "L1.resid": {"accuracy": 0.9, "majority_baseline": 0.6}},
           "ksparse": {"L0.a": {"piece_masked": {"f1": {"1": 0.4, "16": 0.8}}},
                       "L1.a": {"piece_masked": {"f1": {"1": 0.5, "16": 0.6}}}}}
    s = curve.summary(rep)
    assert s == {"step": 7, "coverage": 0.3, "reconstruction": 0.5, "probe_accuracy": 0.9, "probe_layer": "L1.resid",
                 "majority_baseline": 0.6, "ksparse_f1_k1": 0.5, "ksparse_f1_k16": 0.8}
    curve.add_point(tmp_path, {**s, "tokens": 70})
    curve.add_point(tmp_path, {**s, "step": 3, "tokens": 30})
    pts = curve.add_point(tmp_path, {**s, "step": 7, "coverage": 0.35, "tokens": 70})  # replaces step 7
    assert [(p["step"], p["coverage"]) for p in pts] == [(3, 0.3), (7, 0.35)] and (tmp_path / "curve.png").exists()


def test_case_control_sample_weights_and_fit():
    x, y = planted(P=3000)
    pos, wt = ksparse.fit_sample(y[:, :2].T, 500)
    for q in range(2):
        assert len(set(pos[q].tolist())) == 500  # without replacement
        kept1 = int(y[pos[q], q].sum())
        assert kept1 == min(int(y[:, q].sum()), 250)
        # weights restore the class counts: sum over kept positives = all positives, same for negatives
        assert wt[q][y[pos[q], q]].sum() == pytest.approx(y[:, q].sum())
        assert wt[q][~y[pos[q], q]].sum() == pytest.approx((~y[:, q]).sum())
    r = ksparse.probe_properties(x[:2000], y[:2000], x[2000:], y[2000:], ks=(1, 2), max_fit=300)
    assert r["features"][0, 0] == 7 and r["f1"][1][0] == pytest.approx(1.0, abs=1e-6)
