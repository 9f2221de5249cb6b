"""The variants `moex compare` knows: each is the base recipe plus dotted overrides.

With `match=True` (the default) the FFN sizes are derived from the base recipe's
dense width F = `model.d_ff` so every variant has the same *active* FFN
parameters per token as the dense baseline (2*D*F per layer):

    moe (E experts, top-k):   d_expert = F / k
    monet (G heads, k of N):  d_expert M = F / (G*k)   (G*k of N sub-experts kept per key set)
    peer (G heads):           top_k = F / G single-neuron experts per head, N >= k

Routers, Monet's routers and PEER's query/keys come on top and are reported in
the total/active parameter columns.
"""

from __future__ import annotations

VARIANTS: dict[str, dict] = {
    "dense-relu": {"model.ffn": "dense", "model.mlp_activation": "relu"},
    "dense-gelu": {"model.ffn": "dense", "model.mlp_activation": "gelu"},
    "switch": {"model.ffn": "moe", "model.moe.router": "topk", "model.moe.num_experts": 8, "model.moe.top_k": 1},
    "topk2": {"model.ffn": "moe", "model.moe.router": "topk", "model.moe.num_experts": 8, "model.moe.top_k": 2},
    "moex": {"model.ffn": "moe", "model.moe.router": "moex", "model.moe.num_experts": 8, "model.moe.top_k": 2,
             "model.moe.activation": "relu"},
    "expert-choice": {"model.ffn": "moe", "model.moe.router": "expert_choice", "model.moe.num_experts": 8,
                      "model.moe.top_k": 2},
    "aux-free": {"model.ffn": "moe", "model.moe.router": "aux_free", "model.moe.num_experts": 8, "model.moe.top_k": 2},
    "hash": {"model.ffn": "moe", "model.moe.router": "hash", "model.moe.num_experts": 8, "model.moe.top_k": 2},
    "monet-hd": {"model.ffn": "monet", "model.monet.mode": "hd", "model.monet.num_sub_experts": 16,
                 "model.monet.num_heads": 2, "model.monet.top_k": 4, "model.monet.router_share_every": 2},
    "monet-vd": {"model.ffn": "monet", "model.monet.mode": "vd", "model.monet.num_sub_experts": 16,
                 "model.monet.num_heads": 2, "model.monet.top_k": 4, "model.monet.router_share_every": 2},
    "peer": {"model.ffn": "peer", "model.peer.num_sub_experts": 32, "model.peer.num_heads": 8},
}

DEFAULT = "dense-relu,dense-gelu,switch,topk2,moex,expert-choice,aux-free,monet-hd,monet-vd,peer"


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def variant_overrides(name: str, d_ff: int, *, match: bool = True) -> list[str]:
    """Dotted overrides for variant `name` given the base recipe's dense width `d_ff`."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    ov = dict(VARIANTS[name])
    if match:
        ffn = ov["model.ffn"]
        if ffn == "dense":
            ov["model.d_ff"] = d_ff
        elif ffn == "moe":
            ov["model.moe.d_expert"] = _div(d_ff, ov["model.moe.top_k"], name)
        elif ffn == "monet":
            ov["model.monet.d_expert"] = _div(d_ff, ov["model.monet.num_heads"] * ov["model.monet.top_k"], name)
        elif ffn == "peer":
            k = _div(d_ff, ov["model.peer.num_heads"], name)
            ov["model.peer.top_k"] = k
            ov["model.peer.num_sub_experts"] = max(k, ov["model.peer.num_sub_experts"])
    return [f"{k}={_fmt(v)}" for k, v in ov.items()]


def _div(a: int, b: int, name: str) -> int:
    if a % b:
        raise ValueError(f"variant {name}: model.d_ff={a} must be divisible by {b} to match active parameters")
    return a // b
