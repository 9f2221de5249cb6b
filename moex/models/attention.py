"""Causal self-attention: PyTorch SDPA by default, flash-attn as an optional backend.

Shape key: B batch, T time, D model dim, N heads, C head dim (D = N*C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rope_cache(T: int, C: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    inv_freq_C2 = 1.0 / (base ** (torch.arange(0, C, 2, device=device, dtype=torch.float32) / C))
    ang_TC2 = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq_C2)
    return ang_TC2.cos(), ang_TC2.sin()


def apply_rope(x_BNTC: Tensor, cos_TC2: Tensor, sin_TC2: Tensor) -> Tensor:
    x1, x2 = x_BNTC.float().unflatten(-1, (-1, 2)).unbind(-1)  # interleaved pairs
    out = torch.stack((x1 * cos_TC2 - x2 * sin_TC2, x1 * sin_TC2 + x2 * cos_TC2), dim=-1)
    return out.flatten(-2).type_as(x_BNTC)


def _flash_attn():
    try:
        from flash_attn import flash_attn_func  # type: ignore
    except ImportError as e:
        raise ImportError(
            "model.attn_backend='flash' needs flash-attn (a CUDA-only package): "
            "pip install 'moex-lm[gpu]' on a GPU machine, or use attn_backend='sdpa'"
        ) from e
    return flash_attn_func


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, *, dropout: float = 0.0, rope: bool = True, backend: str = "sdpa"):
        super().__init__()
        self.n_head, self.rope, self.backend, self.dropout = n_head, rope, backend, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        if backend == "flash":
            _flash_attn()  # fail at build time, not mid-run

    def forward(self, x_BTD: Tensor, rope_cs: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        if self.rope:
            cos, sin = rope_cs
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if self.backend == "flash":
            y = _flash_attn()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True)
            y_BTD = y.reshape(B, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            y_BTD = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y_BTD)
