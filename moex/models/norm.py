"""Normalisation layers of the decoder: LayerNorm (moex's original) or RMSNorm (Llama family)."""

from __future__ import annotations

from torch import nn


def build_norm(kind: str, dim: int, *, eps: float = 1e-5, bias: bool = False) -> nn.Module:
    """`layernorm` (bias optional, as GPT-2) or `rmsnorm` (`w * x / sqrt(mean(x^2) + eps)`, no bias).

    Both keep their scale in `.weight`, so state-dict keys do not depend on the choice.
    """
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        if bias:
            raise ValueError("rmsnorm has no bias")
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")
