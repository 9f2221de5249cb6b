"""Causal self-attention: PyTorch SDPA by default, flash-attn as an optional backend.

Shape key (docs/architecture.md): B batch, T time (new tokens), S time (cached + new),
D model dim, G heads, R key/value heads (grouped-query attention; R divides G), W head
dim (D = G*W), L cache length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moex.models.norm import build_norm


def rope_cache(T: int, W: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    inv_freq_W2 = 1.0 / (base ** (torch.arange(0, W, 2, device=device, dtype=torch.float32) / W))
    ang_TW2 = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq_W2)
    return ang_TW2.cos(), ang_TW2.sin()


def apply_rope(x_BGTW: Tensor, cos_TW2: Tensor, sin_TW2: Tensor) -> Tensor:
    x1, x2 = x_BGTW.float().unflatten(-1, (-1, 2)).unbind(-1)  # interleaved pairs
    out = torch.stack((x1 * cos_TW2 - x2 * sin_TW2, x1 * sin_TW2 + x2 * cos_TW2), dim=-1)
    return out.flatten(-2).type_as(x_BGTW)


def _flash_attn():
    try:
        from flash_attn import flash_attn_func  # type: ignore
    except ImportError as e:
        raise ImportError(
            "model.attn_backend='flash' needs flash-attn (a CUDA-only package): "
            "pip install 'moex-lm[gpu]' on a GPU machine, or use attn_backend='sdpa'"
        ) from e
    return flash_attn_func


class LayerKV:
    """One layer's cached keys and values, preallocated for `max_len` positions.

    Incremental decoding appends the new tokens' (rotated) keys and values and
    attends over everything cached so far; positions are absolute, so a token's
    output equals the one a full forward over the whole prefix computes.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k_BRLW: Tensor | None = None
        self.v_BRLW: Tensor | None = None
        self.len = 0

    def append(self, k_BRTW: Tensor, v_BRTW: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values; return all cached ones (B, R, S, W)."""
        B, R, T, W = k_BRTW.shape
        if self.k_BRLW is None:
            self.k_BRLW = k_BRTW.new_empty(B, R, self.max_len, W)
            self.v_BRLW = v_BRTW.new_empty(B, R, self.max_len, W)
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache full: {self.len} + {T} tokens > capacity {self.max_len}")
        self.k_BRLW[:, :, self.len : self.len + T] = k_BRTW
        self.v_BRLW[:, :, self.len : self.len + T] = v_BRTW
        self.len += T
        return self.k_BRLW[:, :, : self.len], self.v_BRLW[:, :, : self.len]


class CausalSelfAttention(nn.Module):
    """Causal attention; `n_kv_head` < `n_head` shares each key/value head among n_head/n_kv_head query heads.

    `qkv` holds the q, k and v projections stacked by rows (G*W, R*W, R*W). With
    `qk_norm`, q and k are RMS-normalised over all their heads before RoPE (OLMoE).
    """

    def __init__(self, d_model: int, n_head: int, *, n_kv_head: int = 0, dropout: float = 0.0, rope: bool = True,
                 backend: str = "sdpa", qkv_bias: bool = False, proj_bias: bool = False, qk_norm: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.n_head, self.rope, self.backend, self.dropout = n_head, rope, backend, dropout
        self.n_kv_head = n_kv_head or n_head
        kv_dim = self.n_kv_head * (d_model // n_head)
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=qkv_bias)
        self.proj = nn.Linear(d_model, d_model, bias=proj_bias)
        self.q_norm = build_norm("rmsnorm", d_model, eps=norm_eps) if qk_norm else None
        self.k_norm = build_norm("rmsnorm", kv_dim, eps=norm_eps) if qk_norm else None
        if backend == "flash":
            _flash_attn()  # fail at build time, not mid-run

    def forward(
        self, x_BTD: Tensor, rope_cs: tuple[Tensor, Tensor] | None = None, kv: LayerKV | None = None
    ) -> Tensor:
        """Causal attention over x; with `kv`, x holds the next tokens after those cached there.

        `rope_cs` are the cos/sin rows of x's own (absolute) positions.
        """
        B, T, D = x_BTD.shape
        G, R, W = self.n_head, self.n_kv_head, D // self.n_head
        q, k, v = self.qkv(x_BTD).split([G * W, R * W, R * W], dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, T, G, W).transpose(1, 2), k.view(B, T, R, W).transpose(1, 2), v.view(B, T, R, W).transpose(1, 2)
        if self.rope:
            cos, sin = rope_cs
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.append(k, v)  # (B, R, S, W): cached + new
        past = k.shape[2] - T
        p = self.dropout if self.training else 0.0
        if self.backend == "flash":  # fewer k/v heads as they are; causal mask aligned bottom-right (past > 0 ok)
            y = _flash_attn()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True)
            y_BTD = y.reshape(B, T, D)
        else:
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=R != G)
            else:  # SDPA's is_causal aligns top-left; query i sits at position past + i
                mask_TS = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TS, dropout_p=p, enable_gqa=R != G)
            y_BTD = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y_BTD)
