"""Capacity policies and fp32 router logits against hand-worked cases."""

import math

import pytest
import torch

from moex.config import MoEConfig
from moex.models.moe import MoELayer
from moex.routers import build_router
from moex.routers.capacity import expert_capacity, keep_within_capacity, renormalise_survivors


def routes(choices_TK):
    """Token-major assignments from per-token expert lists, with their choice ranks."""
    T, K = len(choices_TK), len(choices_TK[0])
    expert_A = torch.tensor([e for c in choices_TK for e in c])
    return torch.arange(T).repeat_interleave(K), expert_A, torch.arange(K).repeat(T)


def kept_pairs(token_A, expert_A, order_S):
    return {(int(token_A[s]), int(expert_A[s])) for s in order_S}


# Worked case, k = 2, E = 3, C = 2; (first, second) choice per token:
#   t0: (1, 0)   t1: (0, 2)   t2: (0, 1)
# expert 0 is asked by t0 (2nd), t1 (1st), t2 (1st).
#   token_order: in listed order t0, t1 fit, t2's FIRST choice is dropped;
#   gshard: first choices t1, t2 fit, t0's second choice is dropped.
CASE = [(1, 0), (0, 2), (0, 1)]
ALL = {(t, e) for t, c in enumerate(CASE) for e in c}


@pytest.mark.parametrize("policy,dropped", [("token_order", {(2, 0)}), ("gshard", {(0, 0)})])
def test_dropped_set_by_policy(policy, dropped):
    token_A, expert_A, choice_A = routes(CASE)
    order_S, counts_E = keep_within_capacity(expert_A, token_A, choice_A, 3, 3, 2, policy=policy)
    assert kept_pairs(token_A, expert_A, order_S) == ALL - dropped
    assert counts_E.tolist() == [2, 2, 1]
    assert (torch.diff(expert_A[order_S]) >= 0).all()  # grouped by expert for the GEMMs


def test_gshard_renormalises_over_survivors():
    """t0's gates (0.6 on e1, 0.4 on e0): e0 dropped -> e1 gets 0.6 / 0.6 = 1; others unchanged."""
    token_A, expert_A, choice_A = routes(CASE)
    gate_A = torch.tensor([0.6, 0.4, 0.7, 0.3, 0.55, 0.45])
    order_S, _ = keep_within_capacity(expert_A, token_A, choice_A, 3, 3, 2, policy="gshard")
    gate_S = renormalise_survivors(gate_A[order_S], token_A[order_S], gate_A, token_A, 3)
    got = {(int(token_A[s]), int(expert_A[s])): float(g) for s, g in zip(order_S, gate_S)}
    assert got == pytest.approx({(0, 1): 1.0, (1, 0): 0.7, (1, 2): 0.3, (2, 0): 0.55, (2, 1): 0.45})


def test_top1_gate_is_unchanged_by_renormalisation():
    token_A, expert_A, choice_A = routes([(0,), (0,), (1,)])
    gate_A = torch.tensor([0.5, 0.9, 0.3])
    order_S, _ = keep_within_capacity(expert_A, token_A, choice_A, 2, 3, 1)
    gate_S = renormalise_survivors(gate_A[order_S], token_A[order_S], gate_A, token_A, 3)
    assert kept_pairs(token_A, expert_A, order_S) == {(0, 0), (2, 1)}
    assert gate_S.tolist() == [0.5, pytest.approx(0.3)]


def test_per_sequence_capacity():
    """k = 1, E = 2, two sequences of two tokens: t0 t1 -> e0, t2 -> e0, t3 -> e1.
    Per sequence (C = 1): t1 dropped. Whole batch (C = 2): t2 dropped."""
    token_A, expert_A, choice_A = routes([(0,), (0,), (0,), (1,)])
    per_seq, counts = keep_within_capacity(expert_A, token_A, choice_A, 2, 4, 1, group_size=2)
    assert kept_pairs(token_A, expert_A, per_seq) == {(0, 0), (2, 0), (3, 1)} and counts.tolist() == [2, 1]
    batch, _ = keep_within_capacity(expert_A, token_A, choice_A, 2, 4, 2)
    assert kept_pairs(token_A, expert_A, batch) == {(0, 0), (1, 0), (3, 1)}


def test_capacity_formula_and_unknown_policy():
    assert expert_capacity(1.25, 10, 2, 4) == math.ceil(1.25 * 10 * 2 / 4) == 7
    with pytest.raises(ValueError, match="gshard, token_order"):
        token_A, expert_A, choice_A = routes(CASE)
        keep_within_capacity(expert_A, token_A, choice_A, 3, 3, 2, policy="random")


def layer(**kw):
    torch.manual_seed(0)
    return MoELayer(8, MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 6, "router": "topk", **kw}), std=0.3)


@pytest.mark.parametrize("policy", ["gshard", "token_order"])
def test_layer_with_room_for_everything_equals_dropless(policy):
    x = torch.randn(3, 5, 8)
    free = layer()(x).y
    capped = layer(capacity_factor=4.0, capacity_policy=policy)(x)  # C = 2 * T * k / E >= any load
    assert capped.stats["dropped_frac"] == 0
    torch.testing.assert_close(capped.y, free)


@pytest.mark.parametrize("policy", ["gshard", "token_order"])
def test_layer_applies_the_policy(policy):
    """The layer's output == a hand loop over the kept routes with the policy's gates."""
    m = layer(capacity_factor=0.5, capacity_policy=policy, capacity_per_sequence=True)
    x = torch.randn(2, 6, 8)
    out = m(x)
    with torch.no_grad():
        r = m.router(x.reshape(-1, 8), m.experts)
    C = math.ceil(0.5 * 6 * 2 / 4)
    y = torch.zeros(12, 8)
    for seq in range(2):  # walk each sequence's routes in the policy's priority order
        load = [0] * 4
        keep = {}
        order = sorted(range(12 * 2), key=lambda a: (int(r.choice_A[a]), a) if policy == "gshard" else a)
        for a in order:
            t, e = int(r.token_A[a]), int(r.expert_A[a])
            if t // 6 == seq and load[e] < C:
                load[e] += 1
                keep[a] = float(r.gate_A[a])
        for t in range(seq * 6, seq * 6 + 6):
            mine = [a for a in keep if int(r.token_A[a]) == t]
            total = sum(float(r.gate_A[a]) for a in range(24) if int(r.token_A[a]) == t)
            for a in mine:
                g = keep[a] * (total / sum(keep[b] for b in mine) if policy == "gshard" else 1.0)
                e = int(r.expert_A[a])
                y[t] += g * (torch.relu(x.reshape(-1, 8)[t] @ m.experts.w1_EDH[e]) @ m.experts.w2_EHD[e])
    assert out.stats["dropped_frac"] > 0
    torch.testing.assert_close(out.y.reshape(-1, 8), y, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ fp32 logits
def test_router_logits_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    router = build_router("topk", d_model=64, cfg=MoEConfig(num_experts=16, top_k=2, router="topk"))
    x = torch.randn(256, 64)
    want = (x.double() @ router.gate.weight.double().T).softmax(-1).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = torch.nn.functional.linear(x, router.gate.weight).float().softmax(-1)
        r = router(x)
    assert r.probs_TE.dtype == torch.float32
    torch.testing.assert_close(r.probs_TE, want, rtol=1e-5, atol=1e-6)
    # the check bites: the same matmul under autocast is bf16 and misses by far more
    assert (bf16 - want).abs().max() > 1e-3


def test_router_logits_upcast_bf16_weights_before_the_matmul():
    torch.manual_seed(0)
    router = build_router("topk", d_model=32, cfg=MoEConfig(num_experts=8, top_k=1, router="topk")).to(torch.bfloat16)
    x = torch.randn(64, 32).to(torch.bfloat16)
    want = (x.double() @ router.gate.weight.double().T).softmax(-1)
    torch.testing.assert_close(router(x).probs_TE.double(), want, rtol=1e-5, atol=1e-6)
