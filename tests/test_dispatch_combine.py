"""Index-only dispatch/combine ops (moex.ops.dispatch_combine) vs loop references, forward and backward,
and the layer's gate-folded fast path vs the gated-combine path."""

import pytest
import torch

from moex.config import MoEConfig
from moex.models.moe import MoELayer
from moex.ops import (
    gated_scatter_add,
    gated_scatter_add_reference,
    scatter_add_rows,
    scatter_add_rows_reference,
    sort_by_expert,
    sort_by_expert_reference,
)


@pytest.mark.parametrize("A,E,seed", [(0, 3, 0), (1, 1, 1), (17, 4, 2), (40, 7, 3)])
def test_sort_by_expert_matches_reference(A, E, seed):
    expert_A = torch.randint(0, E, (A,), generator=torch.Generator().manual_seed(seed))
    order, counts = sort_by_expert(expert_A, E)
    order_r, counts_r = sort_by_expert_reference(expert_A, E)
    assert order.dtype == torch.long and torch.equal(order, order_r) and torch.equal(counts, counts_r)


def test_sort_by_expert_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        sort_by_expert(torch.tensor([0, 5]), 3)


def _rows(S, T, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    token_S = torch.randint(0, max(T, 1), (S,), generator=g)
    y = torch.randn(S, D, generator=g).to(dtype).requires_grad_()
    gate = torch.rand(S, generator=g).requires_grad_()
    return token_S, y, gate


@pytest.mark.parametrize("S,T", [(0, 3), (5, 3), (12, 9), (9, 12)])
def test_scatter_add_rows_fwd_bwd(S, T):
    token_S, y, _ = _rows(S, T, 4, S + T)
    out, ref = scatter_add_rows(y, token_S, T), scatter_add_rows_reference(y, token_S, T)
    torch.testing.assert_close(out, ref)
    if S:
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, y, g)[0], torch.autograd.grad(ref, y, g)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,T", [(1, 1), (12, 9), (9, 12)])
def test_gated_scatter_add_fwd_bwd(S, T, dtype):
    token_S, y, gate = _rows(S, T, 6, 3 * S + T, dtype)
    out, ref = gated_scatter_add(y, gate, token_S, T), gated_scatter_add_reference(y, gate, token_S, T)
    assert out.dtype == dtype
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn(out.shape).to(dtype)
    got = torch.autograd.grad(out, (y, gate), g)
    want = torch.autograd.grad(ref, (y, gate), g)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_gated_scatter_add_gradcheck():
    token_S = torch.tensor([2, 0, 2, 1, 0])
    y = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
    gate = torch.rand(5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, g: gated_scatter_add(y, g, token_S, 4), (y, gate))


class _PassThrough:
    """A dispatcher that runs the experts locally: forces the gated-combine path."""

    def __call__(self, experts, x_AD, counts_E, backend):
        return experts(x_AD, counts_E, backend)


@pytest.mark.parametrize("d_expert", [6, 12])  # <= d_model: gate folded into the hidden layer; > d_model: not
@pytest.mark.parametrize("router,act,cf", [("topk", "relu", None), ("topk", "gelu", None), ("moex", "relu", None),
                                           ("topk", "relu", 0.6), ("expert_choice", "relu", 1.0)])
def test_gate_folded_path_equals_gated_combine(router, act, cf, d_expert):
    """Unfused path without a dispatcher (gate folded when H <= D) == gate applied at the combine (dispatcher)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=d_expert, router=router, activation=act, capacity_factor=cf,
                    gemm_backend="torch")
    m = MoELayer(8, cfg, std=0.3)
    x = torch.randn(3, 7, 8, requires_grad=True)
    g = torch.randn(3, 7, 8)
    params = [x, *m.parameters()]
    fast = m(x)
    gf = torch.autograd.grad((fast.y * g).sum() + sum(fast.aux_losses.values()), params, allow_unused=True)
    m.dispatcher = _PassThrough()
    slow = m(x)
    gs = torch.autograd.grad((slow.y * g).sum() + sum(slow.aux_losses.values()), params, allow_unused=True)
    torch.testing.assert_close(fast.y, slow.y, rtol=1e-5, atol=1e-6)
    for a, b in zip(gf, gs):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("tokens_per_expert", "dropped_frac", "active_frac"):
        torch.testing.assert_close(fast.stats[key], slow.stats[key])


def test_torch_backend_probe_works_under_no_grad():
    """The first grouped_mm call may come from eval code under no_grad / inference_mode: the
    backend probe must still see autograd (it used to cache 'unavailable' there)."""
    from moex.ops import grouped_gemm as gg

    for ctx in (torch.no_grad, torch.inference_mode):
        fresh = gg.TorchBackend()  # its own, empty availability cache
        with ctx():
            assert fresh.reason("cpu", torch.float32) is None and fresh.available("cpu", torch.float32)


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_round_trip_through_identity_experts(backend):
    """sort -> gather -> identity experts -> gated combine with gates summing to 1 per token is x."""
    from moex.ops import grouped_mm

    T, k, E, D = 11, 2, 4, 8
    g = torch.Generator().manual_seed(11)
    expert_A = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(-1)
    token_A = torch.arange(T).repeat_interleave(k)
    gate_A = torch.rand(T, k, generator=g)
    gate_A = (gate_A / gate_A.sum(-1, keepdim=True)).reshape(-1)
    x = torch.randn(T, D, requires_grad=True)
    order_S, counts_E = sort_by_expert(expert_A, E)
    token_S = token_A[order_S]
    eye_EDD = torch.eye(D).expand(E, D, D).contiguous()
    y = gated_scatter_add(grouped_mm(x[token_S], eye_EDD, counts_E, backend=backend), gate_A[order_S], token_S, T)
    torch.testing.assert_close(y, x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.ones_like(x))
