"""Decoder options of the published families (RMSNorm, GQA, RoPE base, QK-norm, untied, biases),
each against a hand-written reference; the defaults keep moex's original state-dict keys."""

import math

import pytest
import torch

from moex import config as C
from moex.models import GPT
from moex.models.attention import CausalSelfAttention
from moex.models.norm import build_norm


def tiny_cfg(*over):
    return C.load(None, ["model.vocab_size=32", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
                         "model.block_size=16", "model.moe.d_expert=16", "model.d_ff=32", *over]).model


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_ref(x_BNTC, base):
    """Interleaved-pair rotation by angle t * base^(-2i/C), written out per pair."""
    C_ = x_BNTC.shape[-1]
    out = torch.empty_like(x_BNTC)
    for t in range(x_BNTC.shape[2]):
        for i in range(C_ // 2):
            a = t * base ** (-2 * i / C_)
            x1, x2 = x_BNTC[:, :, t, 2 * i], x_BNTC[:, :, t, 2 * i + 1]
            out[:, :, t, 2 * i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[:, :, t, 2 * i + 1] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def _attention_ref(attn: CausalSelfAttention, x_BTD, base, eps=1e-5):
    """Attention from the weights: split q/k/v by rows, optional QK RMSNorm, RoPE, K/V heads repeated by hand."""
    B, T, D = x_BTD.shape
    N, K = attn.n_head, attn.n_kv_head
    C_ = D // N
    W, b = attn.qkv.weight, attn.qkv.bias
    qkv = x_BTD @ W.T + (b if b is not None else 0)
    q, k, v = qkv[..., :D], qkv[..., D:D + K * C_], qkv[..., D + K * C_:]
    if attn.q_norm is not None:
        q, k = _rms(q, attn.q_norm.weight, eps), _rms(k, attn.k_norm.weight, eps)
    q, k, v = (t.reshape(B, T, -1, C_).transpose(1, 2) for t in (q, k, v))
    q, k = _rope_ref(q, base), _rope_ref(k, base)
    k = torch.cat([k[:, j:j + 1].expand(B, N // K, T, C_) for j in range(K)], dim=1)  # head h uses kv head h // (N/K)
    v = torch.cat([v[:, j:j + 1].expand(B, N // K, T, C_) for j in range(K)], dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(C_)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    pb = attn.proj.bias
    return y @ attn.proj.weight.T + (pb if pb is not None else 0)


@pytest.mark.parametrize("n_kv,qk_norm,bias,base", [
    (0, False, "none", 10000.0),  # moex's original attention
    (2, False, "none", 10000.0),  # GQA: 2 kv heads for 4 query heads
    (1, False, "none", 500000.0),  # multi-query, another RoPE base
    (4, True, "none", 10000.0),  # OLMoE QK-norm
    (2, False, "qkv", 1e6),  # Qwen2: q/k/v biases
    (0, False, "all", 10000.0),
])
def test_attention_matches_reference(n_kv, qk_norm, bias, base):
    torch.manual_seed(0)
    cfg = tiny_cfg(f"model.n_kv_head={n_kv}", f"model.qk_norm={qk_norm}", f"model.bias={bias}", f"model.rope_base={base}")
    m = GPT(cfg)
    attn = m.blocks[0].attn
    for p in attn.parameters():  # non-trivial norm weights and biases
        torch.nn.init.normal_(p, 0.5 if p.ndim == 1 else 0.0, 0.3)
    x = torch.randn(2, 7, 32)
    from moex.models.attention import rope_cache

    got = attn(x, rope_cache(7, 8, base))
    torch.testing.assert_close(got, _attention_ref(attn, x, base), rtol=1e-5, atol=1e-5)
    assert attn.qkv.weight.shape == (32 + 2 * 8 * (n_kv or 4), 32)


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    n = build_norm("rmsnorm", 16, eps=1e-6)
    torch.nn.init.normal_(n.weight)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(n(x), _rms(x, n.weight, 1e-6))
    m = GPT(tiny_cfg("model.norm=rmsnorm", "model.norm_eps=1e-6"))
    assert all(isinstance(b.ln1, torch.nn.RMSNorm) and b.ln1.eps == 1e-6 for b in m.blocks)
    assert isinstance(m.ln_f, torch.nn.RMSNorm)


def test_untied_embeddings_have_their_own_head():
    torch.manual_seed(0)
    m = GPT(tiny_cfg("model.tie_embeddings=false", "model.ffn=dense")).eval()
    assert m.lm_head.weight is not m.wte.weight
    torch.nn.init.normal_(m.lm_head.weight)
    idx = torch.randint(0, 32, (1, 6))
    h = {}
    m.ln_f.register_forward_hook(lambda mod, i, o: h.setdefault("x", o))
    logits = m(idx).logits
    torch.testing.assert_close(logits, h["x"] @ m.lm_head.weight.T)


@pytest.mark.parametrize("bias,expected", [
    ("none", set()),
    ("qkv", {"attn.qkv.bias"}),
    ("all", {"attn.qkv.bias", "attn.proj.bias", "ffn.fc.bias", "ffn.proj.bias", "ln1.bias", "ln2.bias"}),
])
def test_bias_options(bias, expected):
    m = GPT(tiny_cfg(f"model.bias={bias}", "model.ffn=dense"))
    got = {k.split(".", 2)[2] for k in m.state_dict() if k.startswith("blocks.0.") and k.endswith("bias")}
    assert got == expected
    assert ("ln_f.bias" in m.state_dict()) == (bias == "all")


def test_defaults_keep_the_original_state_dict_keys():
    """Runs trained before these options must stay loadable: same keys, same shapes."""
    sd = GPT(tiny_cfg("model.moe_every=2")).state_dict()
    layer0 = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("blocks.0.")}
    assert layer0 == {"blocks.0.ln1.weight": (32,), "blocks.0.attn.qkv.weight": (96, 32),
                      "blocks.0.attn.proj.weight": (32, 32), "blocks.0.ln2.weight": (32,),
                      "blocks.0.ffn.fc.weight": (32, 32), "blocks.0.ffn.proj.weight": (32, 32)}
    assert {k for k in sd if not k.startswith("blocks.")} == {"wte.weight", "ln_f.weight", "lm_head.weight"}


def test_bad_kv_heads_is_a_config_error():
    with pytest.raises(C.ConfigError, match="n_kv_head"):
        tiny_cfg("model.n_kv_head=3")


def test_gelu_tanh_matches_gpt2_formula_forward_and_backward():
    from moex.models.mlp import DenseMLP
    from moex.ops import activations

    torch.manual_seed(0)
    mlp = DenseMLP(8, 16, "gelu_tanh")
    x = torch.randn(5, 8)
    pre = mlp.fc(x)
    ref = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))  # GPT-2's gelu_new
    torch.testing.assert_close(mlp.hidden(x), ref)
    p = torch.randn(50, requires_grad=True)
    g = torch.randn(50)
    (0.5 * p * (1 + torch.tanh(math.sqrt(2 / math.pi) * (p + 0.044715 * p**3))) * g).sum().backward()
    torch.testing.assert_close(activations.get("gelu_tanh").grad(g, p.detach()), p.grad)
