"""moex MoE layers == the peers' MoE blocks with the same weights, outputs and gradients.

Peers are built locally from tiny random-weight configs (no download): Hugging Face
transformers' Switch, Mixtral, Qwen2-MoE (shared expert with a sigmoid gate) and OLMoE
blocks, and DeepSpeed's ``MoE``. Weights go through ``moex.interop.layers`` (the same
mapping whole-model import uses); the peers' gradients are mapped the same way and
compared with moex's. Both sides compute in fp32, so tolerances are fp32 round-off.
Slow only because importing transformers takes seconds.
"""

import os
import socket

import pytest
import torch

from moex.config import MoEConfig
from moex.interop.layers import from_peer_state, load_peer_block, moe_config_kwargs, to_peer_state
from moex.models.moe import MoELayer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
TOL = dict(rtol=2e-5, atol=2e-6)
D = 8


def randomise(module, seed=0, std=0.4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def hf_block(family, **cfg):
    """A tiny transformers MoE block with random weights."""
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        c = MixtralConfig(hidden_size=D, intermediate_size=6, num_local_experts=4, num_experts_per_tok=2, **cfg)
        return c, randomise(MixtralSparseMoeBlock(c))
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        c = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=6, shared_expert_intermediate_size=10, num_experts=4,
                           num_experts_per_tok=2, **cfg)
        return c, randomise(Qwen2MoeSparseMoeBlock(c))
    if family == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
        c = OlmoeConfig(hidden_size=D, intermediate_size=6, num_experts=4, num_experts_per_tok=2, **cfg)
        return c, randomise(OlmoeSparseMoeBlock(c))
    if family == "switch":
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
        c = SwitchTransformersConfig(d_model=D, d_ff=6, num_experts=4, router_jitter_noise=0.0, **cfg)
        return c, randomise(SwitchTransformersSparseMLP(c))
    raise ValueError(family)


def moex_layer(family, peer, backend, **kw):
    m = MoELayer(D, MoEConfig(gemm_backend=backend, **kw))
    load_peer_block(m, family, peer)
    return m


def assert_same(family, peer, ours, x, peer_out=lambda o: o):
    """Outputs, input gradients and (mapped) weight gradients agree."""
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yo = peer_out(peer(xp)), ours(xo).y
    torch.testing.assert_close(yo, yp, **TOL)
    g = torch.randn(yp.shape, generator=torch.Generator().manual_seed(7))
    (yp * g).sum().backward()
    (yo * g).sum().backward()
    torch.testing.assert_close(xo.grad, xp.grad, **TOL)
    peer_grads = from_peer_state(family, {n: p.grad if p.grad is not None else torch.zeros_like(p)
                                          for n, p in peer.named_parameters()})
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, peer_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def tokens(B=2, S=8, seed=1):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["fused", "loop"])
@pytest.mark.parametrize("family,extra", [("mixtral", {}), ("olmoe", {}), ("olmoe", {"norm_topk_prob": True}),
                                          ("qwen2_moe", {}), ("qwen2_moe", {"norm_topk_prob": True})])
def test_hf_swiglu_blocks_dropless(family, extra, backend):
    config, peer = hf_block(family, **extra)
    ours = moex_layer(family, peer, backend, **moe_config_kwargs(config))
    assert ours.experts.w3_EDH is not None and (ours.shared is not None) == (family == "qwen2_moe")
    assert_same(family, peer, ours, tokens())


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_hf_switch_dropless(backend):
    config, peer = hf_block("switch", expert_capacity=16)  # >= sequence length: nothing dropped
    ours = moex_layer("switch", peer, backend, **moe_config_kwargs(config))
    assert_same("switch", peer, ours, tokens())


@pytest.mark.parametrize("backend", ["fused", "loop"])
def test_hf_switch_capacity_per_sequence(backend):
    """expert_capacity=2 per sequence of 8 tokens over 4 experts: ceil(cf * 8 / 4) = 2 at cf = 1."""
    config, peer = hf_block("switch", expert_capacity=2)
    ours = moex_layer("switch", peer, backend, **moe_config_kwargs(config), capacity_factor=1.0,
                      capacity_per_sequence=True)
    x = tokens()
    assert ours(x).stats["dropped_frac"] > 0.2  # the cut bites
    assert_same("switch", peer, ours, x)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "switch"])
def test_state_round_trip(family):
    config, peer = hf_block(family)
    sd = peer.state_dict()
    back = to_peer_state(family, from_peer_state(family, sd))
    assert back.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)


def test_transformers4_per_expert_keys_load():
    """Checkpoints written by transformers 4 keep one Linear per expert (Mixtral: w1 gate, w3 up, w2 down)."""
    config, peer = hf_block("mixtral")
    sd = peer.state_dict()
    H = config.intermediate_size
    legacy = {"gate.weight": sd["gate.weight"]}
    for e in range(config.num_local_experts):
        legacy[f"experts.{e}.w1.weight"] = sd["experts.gate_up_proj"][e, :H]
        legacy[f"experts.{e}.w3.weight"] = sd["experts.gate_up_proj"][e, H:]
        legacy[f"experts.{e}.w2.weight"] = sd["experts.down_proj"][e]
    a, b = from_peer_state("mixtral", legacy), from_peer_state("mixtral", sd)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------ DeepSpeed
@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deepspeed_moe(k, **kw):
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(D, 6, bias=False), torch.nn.ReLU(), torch.nn.Linear(6, D, bias=False))
    moe = MoE(D, expert, num_experts=4, ep_size=1, k=k, use_rts=False, top2_2nd_expert_sampling=False, **kw)
    return randomise(moe)


@pytest.mark.parametrize("k", [1, 2])
def test_deepspeed_moe_dropless(one_process_group, k):
    peer = deepspeed_moe(k, drop_tokens=False)
    ours = moex_layer("deepspeed", peer, "fused", router="topk", num_experts=4, top_k=k, d_expert=6,
                      activation="relu", aux_loss_coef=0.0, z_loss_coef=0.0)
    assert_same("deepspeed", peer, ours, tokens(), peer_out=lambda o: o[0])


@pytest.mark.parametrize("backend", ["fused", "loop"])
def test_deepspeed_moe_capacity_gshard(one_process_group, backend):
    """k = 2, drop_tokens=True: first choices before second, gates renormalised over survivors.
    DeepSpeed's C = ceil(T / E * cf * 2) (min_capacity 0) equals moex's ceil(cf * T * k / E) here.
    (Its top-1 gate picks survivors by torch.topk over a 0/1 mask, whose tie order is
    unspecified; k = 1 with capacity is compared against HF Switch above.)"""
    k = 2
    cf = 0.75
    peer = deepspeed_moe(k, drop_tokens=True, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=0)
    ours = moex_layer("deepspeed", peer, backend, router="topk", num_experts=4, top_k=k, d_expert=6,
                      activation="relu", aux_loss_coef=0.0, z_loss_coef=0.0, capacity_factor=cf,
                      capacity_policy="gshard")
    x = tokens()
    assert ours(x).stats["dropped_frac"] > 0.1  # the cut bites
    assert_same("deepspeed", peer, ours, x, peer_out=lambda o: o[0])
