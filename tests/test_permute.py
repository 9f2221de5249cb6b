"""permute / unpermute vs plain loop references, forward and backward."""

import pytest
import torch

from moex.ops import grouped_mm, permute, permute_reference, unpermute, unpermute_reference


def _routing(T, k, E, seed):
    g = torch.Generator().manual_seed(seed)
    expert_TK = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    token_A = torch.arange(T).repeat_interleave(k)
    gate_A = torch.rand(T * k, generator=g)
    return token_A, expert_TK.reshape(-1), gate_A


@pytest.mark.parametrize("T,k,E,seed", [(7, 2, 4, 0), (1, 1, 3, 1), (5, 3, 8, 2), (0, 2, 4, 3), (6, 1, 6, 4)])
def test_permute_matches_reference(T, k, E, seed):
    token_A, expert_A, _ = _routing(T, k, E, seed)
    # shuffle assignment order: permute must not rely on token-major order
    perm = torch.randperm(token_A.numel(), generator=torch.Generator().manual_seed(seed))
    token_A, expert_A = token_A[perm], expert_A[perm]
    x = torch.randn(T, 5, requires_grad=True)
    x_AD, order_A, counts_E = permute(x, token_A, expert_A, E)
    xr_AD, order_r, counts_r = permute_reference(x, token_A, expert_A, E)
    assert torch.equal(order_A, order_r) and torch.equal(counts_E, counts_r)
    torch.testing.assert_close(x_AD, xr_AD)
    if T:
        g = torch.randn_like(x_AD)
        (dx,) = torch.autograd.grad(x_AD, x, g)
        (dxr,) = torch.autograd.grad(xr_AD, x, g)
        torch.testing.assert_close(dx, dxr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_matches_reference(dtype):
    T, k, E, D = 9, 2, 5, 6
    token_A, expert_A, gate_A = _routing(T, k, E, 7)
    _, order_A, _ = permute(torch.zeros(T, D), token_A, expert_A, E)
    y = torch.randn(T * k, D, dtype=dtype, requires_grad=True)
    gate = gate_A.clone().requires_grad_()
    out = unpermute(y, order_A, token_A, gate, T)
    ref = unpermute_reference(y, order_A, token_A, gate, T)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    dy, dg = torch.autograd.grad(out, (y, gate), g)
    dyr, dgr = torch.autograd.grad(ref, (y, gate), g)
    torch.testing.assert_close(dy, dyr, **tol)
    torch.testing.assert_close(dg, dgr, **tol)


def test_unpermute_token_without_assignment_is_zero():
    token_A = torch.tensor([0, 0, 2])
    expert_A = torch.tensor([1, 0, 1])
    x = torch.randn(3, 4)
    x_AD, order_A, _ = permute(x, token_A, expert_A, 2)
    y = unpermute(x_AD, order_A, token_A, torch.tensor([0.25, 0.75, 1.0]), 3)
    assert torch.all(y[1] == 0)
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y[2], x[2])


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_round_trip_identity_experts(backend):
    T, k, E, D = 11, 2, 4, 8
    token_A, expert_A, gate_A = _routing(T, k, E, 11)
    gate_A = (gate_A.view(T, k) / gate_A.view(T, k).sum(-1, keepdim=True)).reshape(-1)  # sums to 1 per token
    x = torch.randn(T, D, requires_grad=True)
    x_AD, order_A, counts_E = permute(x, token_A, expert_A, E)
    eye_EDD = torch.eye(D).expand(E, D, D).contiguous()
    y = unpermute(grouped_mm(x_AD, eye_EDD, counts_E, backend=backend), order_A, token_A, gate_A, T)
    torch.testing.assert_close(y, x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.ones_like(x))


def test_permute_rejects_out_of_range_expert():
    with pytest.raises(ValueError, match="out of range"):
        permute(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 5]), 3)
