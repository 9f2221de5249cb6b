"""The fused expert MLP (moex.ops.expert_mlp) against its plain composition reference."""

import pytest
import torch

from moex.config import MoEConfig
from moex.models.moe import MoELayer
from moex.ops import count_active, expert_mlp, expert_mlp_reference


def problem(counts, T=6, D=8, H=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, S = len(counts), sum(counts)
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    token_S = torch.randint(0, T, (S,), generator=g)
    gate_S = torch.rand(S, generator=g).to(dtype).requires_grad_()
    w1 = torch.randn(E, D, H, generator=g).to(dtype).requires_grad_()
    w2 = torch.randn(E, H, D, generator=g).to(dtype).requires_grad_()
    return x, token_S, gate_S, torch.tensor(counts), w1, w2


def fwd_bwd(fn, x, token_S, gate_S, counts, w1, w2, act, **kw):
    y, h = fn(x, token_S, gate_S, counts, w1, w2, act, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    return (y, h, *torch.autograd.grad(y, (x, gate_S, w1, w2), gy))


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("block_rows", [1, 3, 1024])
@pytest.mark.parametrize("counts", [[4, 0, 6, 1], [0, 0, 1, 0], [9, 9, 0, 2, 7], [0, 0, 0]])
def test_fused_matches_reference_fp32(counts, block_rows, act):
    """Empty experts, one row, uneven groups, blocks that split an expert, no rows at all."""
    args = problem(counts)
    got = fwd_bwd(lambda *a, **k: expert_mlp(*a, block_rows=block_rows, **k), *args, act)
    ref = fwd_bwd(expert_mlp_reference, *args, act)
    for name, a, b in zip(["y", "h", "dx", "dgate", "dw1", "dw2"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_fused_matches_reference_bf16(act):
    """bf16 inputs: compared with the fp32 reference on the same (bf16-rounded) values."""
    args = problem([5, 0, 7, 3], dtype=torch.bfloat16)
    got = fwd_bwd(expert_mlp, *args, act)
    x, tok, gate, counts, w1, w2 = args
    up = [t.detach().float().requires_grad_() for t in (x, gate, w1, w2)]
    ref = fwd_bwd(expert_mlp_reference, up[0], tok, up[1], counts, up[2], up[3], act)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


def test_fused_gradcheck_float64():
    x, tok, gate, counts, w1, w2 = problem([3, 0, 4], T=4, D=3, H=4, dtype=torch.float64)
    for act in ("relu", "gelu"):
        assert torch.autograd.gradcheck(
            lambda x, g, a, b: expert_mlp(x, tok, g, counts, a, b, act, block_rows=2)[0], (x, gate, w1, w2))


def test_count_active_is_exact_for_relu_codes():
    """ReLU codes hold +0.0 for every inactive unit, even where x @ w1 is exactly -0.0."""
    x, tok, gate, counts, w1, w2 = problem([3, 4])
    with torch.no_grad():
        x[tok[0]] = 0.0  # row of zeros
        w1[0] = -w1[0].abs()  # 0 * negative = -0.0 pre-activations
    _, h = expert_mlp(x, tok, gate, counts, w1, w2, "relu")
    assert int(count_active(h, relu_code=True)) == int((h > 0).sum())
    _, hg = expert_mlp(x, tok, gate, counts, w1, w2, "gelu")
    assert int(count_active(hg)) == int((hg > 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_count_active_equals_greater_than_zero(dtype):
    h = torch.tensor([-0.0, 0.0, 1e-30, -1e-30, 3.0, -2.0, float("inf"), -float("inf")]).to(dtype)
    h = torch.cat([h, torch.randn(1000).to(dtype)])
    assert int(count_active(h)) == int((h > 0).sum())
    assert int(count_active(h[::2])) == int((h[::2] > 0).sum())  # non-contiguous: plain path


def test_bad_inputs_say_what_is_wrong():
    x, tok, gate, counts, w1, w2 = problem([2, 3])
    with pytest.raises(ValueError, match="unknown activation 'tanh'; valid"):
        expert_mlp(x, tok, gate, counts, w1, w2, "tanh")
    with pytest.raises(ValueError, match="counts_E"):
        expert_mlp(x, tok, gate, torch.tensor([2, 2]), w1, w2)
    with pytest.raises(ValueError, match="dtypes differ"):
        expert_mlp(x, tok, gate, counts, w1.double(), w2)
    with pytest.raises(ValueError, match="block_rows"):
        expert_mlp(x, tok, gate, counts, w1, w2, block_rows=0)


@pytest.mark.parametrize("router,act,cf", [("topk", "relu", None), ("topk", "gelu", None), ("moex", "relu", None),
                                           ("topk", "relu", 0.6), ("expert_choice", "relu", 1.0)])
def test_layer_fused_equals_grouped_mm_backends(router, act, cf):
    """The MoE layer on the fused path == the unfused path on the loop and torch grouped GEMMs."""
    results = {}
    for backend in ("fused", "loop", "torch"):
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=4, top_k=2, d_expert=12, router=router, activation=act, capacity_factor=cf,
                        gemm_backend=backend)
        m = MoELayer(8, cfg, std=0.3)
        x = torch.randn(3, 7, 8, requires_grad=True)
        out = m(x)
        loss = (out.y * torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(1))).sum()
        grads = torch.autograd.grad(loss + sum(out.aux_losses.values()), [x, *m.parameters()])
        results[backend] = (out, grads)
    (fo, fg) = results["fused"]
    for backend in ("loop", "torch"):
        o, g = results[backend]
        torch.testing.assert_close(fo.y, o.y, rtol=1e-5, atol=1e-6)
        for a, b in zip(fg, g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for key in ("tokens_per_expert", "dropped_frac", "active_frac"):
            torch.testing.assert_close(fo.stats[key], o.stats[key])


def test_config_gemm_backend_choices_match_the_registry():
    import typing

    from moex.ops import BACKENDS

    choices = typing.get_args(typing.get_type_hints(MoEConfig)["gemm_backend"])
    assert set(choices) == {"auto", "fused", *BACKENDS}
