"""Toy models of superposition: the data generator against its formula, the metrics on hand-built
weights with known answers (identity, feature pairs, antipodal pairs), and the unit codes against
the layers' own outputs."""

import math

import pytest
import torch

from moex.interp import toy_metrics as tm
from moex.interp.toy import FAMILIES, ToyModel, ToyTask, active_params, build_ffn, train, unit_code
from moex.models.mlp import DenseMLP


def test_generator_matches_sparsity_and_importance_formula():
    task = ToyTask(n=16, d=4, sparsity=0.8, importance_decay=0.7)
    x = task.sample(50_000, torch.Generator().manual_seed(0))
    on = x > 0
    p = 1 - task.sparsity
    # per-feature frequency within 5 binomial standard deviations of 1 - S
    assert (on.float().mean(0) - p).abs().max() < 5 * math.sqrt(p * (1 - p) / 50_000)
    assert x.max() <= 1 and x.min() >= 0
    assert x[on].mean() == pytest.approx(0.5, abs=0.01)  # U(0, 1) magnitudes
    assert x[on].square().mean() == pytest.approx(1 / 3, abs=0.01)
    assert task.importance().tolist() == pytest.approx([0.7**i for i in range(16)])
    zero = float(task.loss(torch.zeros_like(x), x))
    assert zero == pytest.approx(task.zero_loss(), rel=0.02)
    assert task.zero_loss() == pytest.approx(sum(0.7**i for i in range(16)) * p / 3)


def test_generator_rejects_bad_settings():
    with pytest.raises(ValueError, match="sparsity"):
        ToyTask(sparsity=1.0)
    with pytest.raises(ValueError, match="d <= n"):
        ToyTask(n=4, d=8)


def test_weight_metrics_identity_and_antipodal_pairs():
    d = 5
    eye = torch.eye(d)  # n = d: every feature its own dimension
    assert tm.feature_norms(eye).tolist() == [1.0] * d
    assert tm.dimensionality(eye).tolist() == pytest.approx([1.0] * d)
    anti = torch.stack([s * eye[j] for j in range(d) for s in (1.0, -1.0)])  # n = 2d, rows +-e_j
    assert int((tm.feature_norms(anti) > 0.5).sum()) == 2 * d
    assert tm.dimensionality(anti).tolist() == pytest.approx([0.5] * (2 * d))
    assert tm.dimensionality(torch.zeros(3, 2)).tolist() == [0.0, 0.0, 0.0]


def hand_mlp(enc_UN, dec_NU, act="relu"):
    mlp = DenseMLP(enc_UN.shape[1], enc_UN.shape[0], act)
    with torch.no_grad():
        mlp.fc.weight.copy_(enc_UN)
        mlp.proj.weight.copy_(dec_NU)
    return mlp


def test_identity_mlp_every_feature_represented_every_unit_monosemantic():
    n = 6
    mlp = hand_mlp(torch.eye(n), torch.eye(n))
    assert tm.self_gain_norms(mlp, n).tolist() == pytest.approx([1.0] * n)
    mono = tm.monosemanticity(tm.unit_feature_mass(mlp.hidden, n))
    assert mono == {"top_share": pytest.approx(1.0), "features_per_unit": pytest.approx(1.0), "alive_units": n,
                    "units": n}


def test_feature_pairs_two_features_per_unit():
    d = 4  # n = 2d; unit j reads features 2j and 2j+1 and writes both back
    enc = torch.zeros(d, 2 * d)
    for j in range(d):
        enc[j, 2 * j] = enc[j, 2 * j + 1] = 1.0
    mlp = hand_mlp(enc, enc.T.clone())
    assert tm.self_gain_norms(mlp, 2 * d).tolist() == pytest.approx([1.0] * (2 * d))
    mono = tm.monosemanticity(tm.unit_feature_mass(mlp.hidden, 2 * d))
    assert mono["top_share"] == pytest.approx(0.5) and mono["features_per_unit"] == pytest.approx(2.0)


def test_antipodal_signed_code_and_dead_units():
    d = 3  # unit j = x_2j - x_2j+1 (Elhage's antipodal pair on one signed unit); a 4th unit never moves
    A = torch.zeros(2 * d, d + 1)
    for j in range(d):
        A[2 * j, j], A[2 * j + 1, j] = 1.0, -1.0
    mass = tm.unit_feature_mass(lambda x: x @ A, 2 * d)
    assert mass[:, d].abs().max() == 0
    mono = tm.monosemanticity(mass)
    assert mono == {"top_share": pytest.approx(0.5), "features_per_unit": pytest.approx(2.0), "alive_units": d,
                    "units": d + 1}


def test_monosemanticity_by_hand():
    # unit 0: masses (3, 1): share 3/4, PR 16/10; unit 1: (0, 2): share 1, PR 1; unit weights 4/6, 2/6
    mono = tm.monosemanticity(torch.tensor([[3.0, 0.0], [1.0, 2.0]]))
    assert mono["top_share"] == pytest.approx((4 * 0.75 + 2 * 1.0) / 6)
    assert mono["features_per_unit"] == pytest.approx((4 * 1.6 + 2 * 1.0) / 6)
    assert math.isnan(tm.monosemanticity(torch.zeros(2, 2))["top_share"])


def test_known_features_as_code_score_perfectly():
    res = tm.known_feature_scores(lambda x: x, ToyTask(n=8, d=2, sparsity=0.7), positions=2000)
    assert res["coverage"] == pytest.approx(1.0, abs=1e-6)
    assert res["reconstruction"] == pytest.approx(1.0, abs=1e-6)
    assert res["labelled_features"] == 8
    # the regularised probe puts its boundary a little above 0, so tiny magnitudes are missed
    assert res["probed_features"] == 8 and res["ksparse_f1_k1"] > 0.9


def ffn_with_stats(family, n=8, d=4, seed=0):
    """A layer whose BatchNorm running statistics have seen data (eval mode reads them)."""
    torch.manual_seed(seed)
    model = ToyModel(build_ffn(family, n, d), n)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(ToyTask(n=n, d=d, sparsity=0.5).sample(256))
    return model.eval().ffn


@pytest.mark.parametrize("family", ["dense-relu", "dense-gelu", "switch", "moex", "peer"])
def test_unit_code_reproduces_layer_output(family):
    ffn = ffn_with_stats(family)
    x = ToyTask(n=8, d=4, sparsity=0.5).sample(64, torch.Generator().manual_seed(1))
    code = unit_code(ffn, x)
    with torch.no_grad():
        if family.startswith("dense"):
            y = ffn.proj(code)
        elif family == "peer":
            y = code @ ffn.up.weight
        else:  # gate-weighted expert codes through each expert's decoder
            E, H = ffn.cfg.num_experts, ffn.cfg.d_expert
            y = torch.einsum("beh,ehd->bd", code.view(-1, E, H), ffn.experts.w2_EHD)
        assert torch.allclose(y, ffn(x).y, atol=1e-5)
    if family in ("switch", "moex"):  # only the selected experts' units can be non-zero
        per_expert_active = code.view(64, ffn.cfg.num_experts, -1).abs().sum(-1) > 0
        assert (per_expert_active.sum(-1) <= ffn.cfg.top_k).all()


def test_monet_code_is_zero_outside_kept_sub_experts():
    ffn = ffn_with_stats("monet")
    x = ToyTask(n=8, d=4, sparsity=0.5).sample(64, torch.Generator().manual_seed(1))
    _, _, _, _, keep1, keep2 = ffn.router(x)
    code = unit_code(ffn, x).view(64, 2, ffn.N, -1)  # VD: key set 1 halves, then key set 2 halves
    assert (code[:, 0][~keep1.any(1)] == 0).all() and (code[:, 1][~keep2.any(1)] == 0).all()


def test_expert_norms_match_plain_loop():
    ffn = ffn_with_stats("switch")
    w1, w2 = ffn.experts.w1_EDH, ffn.experts.w2_EHD
    ref = torch.stack([(torch.relu(torch.eye(8) @ w1[e]) @ w2[e]).diagonal() for e in range(w1.shape[0])])
    assert torch.allclose(tm.expert_norms(ffn), ref.clamp_min(0).sqrt(), atol=1e-6)


def test_equal_active_parameters():
    n, d = 16, 8  # every family: 2*n*d active expert weights, plus its router / query
    routing = {"dense-relu": 0, "dense-gelu": 0, "switch": n * 8, "moex": 0, "peer": n * n + 2 * 16 * (n // 2)}
    for fam, extra in routing.items():
        assert active_params(build_ffn(fam, n, d)) == 2 * n * d + extra, fam
    # Monet: two routers (2 * n * 8) and 2 * n * d active weights plus the kept sub-experts' biases
    assert 2 * n * d <= active_params(build_ffn("monet", n, d)) - 2 * n * 8 <= 2 * n * d * 1.2
    with pytest.raises(ValueError, match="multiple of 4"):
        build_ffn("monet", n, 6)
    with pytest.raises(ValueError, match="valid: dense-relu"):
        build_ffn("nope", n, d)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_learns(family):
    task = ToyTask(n=8, d=4, sparsity=0.7)
    torch.manual_seed(0)
    model = ToyModel(build_ffn(family, 8, 4), 8)
    curve = train(model, task, steps=150, batch=256, lr=1e-2)
    assert curve[-1] < 0.8 * task.zero_loss()
    res = tm.evaluate(model, task, positions=1000)
    assert 0 <= res["top_share"] <= 1 and res["features_per_unit"] >= 1 and 0 <= res["represented"] <= 8
