"""KV-cache decoding and sampling: cached logits equal full forwards, seeded sampling repeats."""

import math

import pytest
import torch

from moex import config as C
from moex.models import GPT
from moex.models.sampling import filter_logits, generate, sample_next

VARIANTS = [
    ("dense", {}),
    ("moe", {"model.moe.router": "topk"}),
    ("moe", {"model.moe.router": "moex"}),
    ("moe", {"model.moe.router": "expert_choice"}),
    ("moe", {"model.moe.router": "aux_free"}),
    ("moe", {"model.moe.router": "hash"}),
    ("monet", {"model.monet.mode": "hd"}),
    ("monet", {"model.monet.mode": "vd"}),
    ("peer", {}),
    ("moe", {"model.pos_emb": "learned"}),
    ("moe", {"model.n_kv_head": 2, "model.qk_norm": "true", "model.norm": "rmsnorm", "model.bias": "qkv"}),
]


def model(ffn, **over):
    ov = [f"{k}={v}" for k, v in over.items()]
    cfg = C.load(None, ["model.vocab_size=32", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
                        "model.block_size=16", f"model.ffn={ffn}", "model.moe.d_expert=8", "model.monet.d_expert=8",
                        "model.monet.num_sub_experts=4", "model.peer.num_sub_experts=4", "model.d_ff=32", *ov])
    torch.manual_seed(0)
    m = GPT(cfg.model)
    m.train()
    with torch.no_grad():  # move BatchNorm running stats (Monet/PEER) off their init
        for _ in range(3):
            m(torch.randint(0, 32, (4, 16)))
    return m.eval()


@pytest.mark.parametrize("ffn,over", VARIANTS, ids=[f"{f}-{'-'.join(map(str, o.values()))}" for f, o in VARIANTS])
def test_cached_logits_equal_full_forward(ffn, over):
    m = model(ffn, **over)
    idx = torch.randint(0, 32, (2, 13))
    with torch.no_grad():
        full = m(idx).logits
        cache = m.new_cache()
        parts = [m(idx[:, :5], cache=cache).logits]  # prefill
        parts += [m(idx[:, t : t + 1], cache=cache).logits for t in range(5, 9)]  # one token at a time
        parts.append(m(idx[:, 9:], cache=cache).logits)  # several new tokens after a non-empty cache
    assert cache.pos == 13
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_respects_context():
    m = model("dense")
    cache = m.new_cache()
    m(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("ffn", ["moe", "monet"])
def test_seeded_sampling_repeats_and_cache_changes_nothing(ffn):
    m = model(ffn)
    prompt = torch.randint(0, 32, (2, 4))

    def sample(seed, use_cache=True, n=10):
        g = torch.Generator().manual_seed(seed)
        return generate(m, prompt, n, temperature=1.0, top_k=20, top_p=0.95, generator=g, use_cache=use_cache)

    a = sample(7)
    assert a.shape == (2, 14) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, sample(7))
    assert torch.equal(a, sample(7, use_cache=False))  # same draws from the same distributions
    assert not all(torch.equal(a, sample(s)) for s in range(8, 12))  # it does sample


def test_greedy_follows_argmax_and_runs_past_the_context():
    m = model("moe")
    prompt = torch.randint(0, 32, (1, 3))
    out = generate(m, prompt, 30, temperature=0)  # 33 tokens > block_size 16: cache rebuilt
    assert out.shape == (1, 33)
    for t in range(3, 16):  # within the context, every token is the argmax of a full forward
        assert out[0, t] == m(out[:, :t]).logits[0, -1].argmax()
    with pytest.raises(ValueError, match="eval mode"):
        generate(m.train(), prompt, 1)


def test_top_k_and_top_p_against_hand_counts():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=3) == [True, True, True, False]
    assert kept(top_p=0.45) == [True, False, False, False]  # the top token alone reaches 0.45
    assert kept(top_p=0.75) == [True, True, False, False]  # 0.5 + 0.3 >= 0.75
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_k=2, top_p=0.99) == [True, True, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]  # order in the vocabulary does not matter
    assert torch.isfinite(filter_logits(shuffled, top_p=0.75))[0].tolist() == [False, True, False, True]
    # sampled frequencies follow the renormalised nucleus (0.5, 0.3) / 0.8
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(20000, 4), top_p=0.75, generator=g)
    assert set(draws.tolist()) == {0, 1}
    assert math.isclose((draws == 0).float().mean().item(), 0.625, abs_tol=0.02)
