"""Sparse FFN layers other than the router-based MoE layer (Monet, PEER).

Filled by the router-zoo work; looked up by `model.ffn`.
"""

from __future__ import annotations

from moex.config import ModelConfig

BUILDERS: dict = {}


def build(cfg: ModelConfig, layer: int):
    if cfg.ffn not in BUILDERS:
        raise ValueError(f"model.ffn={cfg.ffn!r} is not available; valid: dense, moe, {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.ffn](cfg, layer)
