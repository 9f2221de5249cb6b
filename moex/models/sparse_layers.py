"""Sparse FFN layers other than the router-based MoE layer, looked up by `model.ffn`.

    monet: moex.models.monet (product-key experts, HD or VD; routers shared per group)
    peer:  moex.models.peer  (product-key retrieval over single-neuron experts)
"""

from __future__ import annotations

from moex.config import ModelConfig
from moex.models.monet import build_monet
from moex.models.peer import build_peer

BUILDERS: dict = {"monet": build_monet, "peer": build_peer}


def build(cfg: ModelConfig, layer: int):
    """The sparse FFN of `layer` for `cfg.ffn` in BUILDERS."""
    if cfg.ffn not in BUILDERS:
        raise ValueError(f"model.ffn={cfg.ffn!r} is not available; valid: dense, moe, {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.ffn](cfg, layer)
