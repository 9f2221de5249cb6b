"""GPT-style decoder: pre-norm blocks of causal attention + an FFN chosen per layer.

Shape key: B batch, T time, D model dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moex.config import ModelConfig
from moex.models.attention import CausalSelfAttention, LayerKV, rope_cache
from moex.models.mlp import DenseMLP
from moex.models.norm import build_norm
from moex.models.outputs import FFNOutput


def ffn_builder(cfg: ModelConfig) -> Callable[[int], nn.Module]:
    """One model's `layer -> FFN`: dense, or the configured sparse layer on every `moe_every`-th layer.

    A builder serves one model, built in layer order: Monet's owns the routers its layer groups share.
    """
    if cfg.ffn == "moe":
        from moex.models.moe import MoELayer

        sparse = lambda layer: MoELayer(cfg.d_model, cfg.moe, std=cfg.init_std)  # noqa: E731
    elif cfg.ffn != "dense":
        from moex.models import sparse_layers

        sparse = sparse_layers.builder(cfg)

    def build(layer: int) -> nn.Module:
        if cfg.ffn == "dense" or layer % cfg.moe_every != cfg.moe_every - 1:
            return DenseMLP(cfg.d_model, cfg.d_ff, cfg.mlp_activation, bias=cfg.bias == "all")
        return sparse(layer)

    return build


def _norm(cfg: ModelConfig) -> nn.Module:
    return build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias == "all")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, build_ffn: Callable[[int], nn.Module]):
        super().__init__()
        self.ln1 = _norm(cfg)
        self.attn = CausalSelfAttention(
            cfg.d_model, cfg.n_head, n_kv_head=cfg.n_kv_head, dropout=cfg.dropout, rope=cfg.pos_emb == "rope",
            backend=cfg.attn_backend, qkv_bias=cfg.bias != "none", proj_bias=cfg.bias == "all",
            qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
        )
        self.ln2 = _norm(cfg)
        self.ffn = build_ffn(layer)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: Tensor, rope_cs, kv: LayerKV | None = None, features: bool = False) -> tuple[Tensor, FFNOutput]:
        x_BTD = x_BTD + self.drop(self.attn(self.ln1(x_BTD), rope_cs, kv))
        h_BTD = self.ln2(x_BTD)
        out = self.ffn(h_BTD, features=True) if features else self.ffn(h_BTD)
        return x_BTD + self.drop(out.y), out


class KVCache:
    """Per-layer key/value caches of a batch of sequences for incremental decoding.

    `pos` is the number of tokens already fed; the next forward's tokens sit at
    absolute positions pos, pos+1, ... (at most `max_len` = the context length).
    """

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKV(max_len) for _ in range(n_layer)]
        self.max_len = max_len

    @property
    def pos(self) -> int:
        return self.layers[0].len


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # cross-entropy + aux losses (what the optimizer minimises)
    ce_loss: Tensor | None  # cross-entropy alone (what perplexity is made of)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # summed over layers
    layer_stats: list[dict[str, Tensor]] = field(default_factory=list)  # one per layer
    # forward(..., features=True) only: each layer's FFNOutput.features (rows = B*T, row-major)
    layer_features: list[dict] = field(default_factory=list)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        build_ffn = ffn_builder(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i, build_ffn) for i in range(cfg.n_layer))
        self.ln_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("proj.weight", "w2_EHD")):
                nn.init.normal_(p, 0.0, cfg.init_std / (2 * cfg.n_layer) ** 0.5)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def new_cache(self) -> KVCache:
        """An empty KV cache for `forward(..., cache=)`, holding up to block_size positions."""
        return KVCache(self.cfg.n_layer, self.cfg.block_size)

    def forward(self, idx_BT: Tensor, targets_BT: Tensor | None = None, *, cache: KVCache | None = None,
                features: bool = False) -> ModelOutput:
        """Logits (and losses with targets). With `cache`, idx_BT continues the cached tokens. With
        ``features``, every layer's feature sources too (``layer_features``)."""
        B, T = idx_BT.shape
        pos0 = cache.pos if cache is not None else 0
        if pos0 + T > self.cfg.block_size:
            raise ValueError(f"sequence length {pos0 + T} exceeds model.block_size={self.cfg.block_size}")
        x = self.wte(idx_BT)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos0, pos0 + T, device=idx_BT.device))
        rope_cs = None
        if self.cfg.pos_emb == "rope":
            C = self.cfg.d_model // self.cfg.n_head
            cos, sin = rope_cache(pos0 + T, C, self.cfg.rope_base, device=idx_BT.device)
            rope_cs = cos[pos0:], sin[pos0:]
        x = self.drop(x)
        aux: dict[str, Tensor] = {}
        stats, feats = [], []
        for i, block in enumerate(self.blocks):
            x, out = block(x, rope_cs, cache.layers[i] if cache is not None else None, features)
            for k, v in out.aux_losses.items():
                aux[k] = aux[k] + v if k in aux else v
            stats.append(out.stats)
            feats.append(out.features)
        logits = self.lm_head(self.ln_f(x))
        loss = ce = None
        if targets_BT is not None:
            ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets_BT.reshape(-1))
            loss = ce + sum(aux.values()) if aux else ce
        return ModelOutput(logits, loss, ce, aux, stats, feats if features else [])


def param_counts(model: GPT) -> dict[str, int]:
    """Total parameters and parameters active per token (experts scaled by K/E; embeddings once)."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    for m in model.modules():
        if hasattr(m, "active_params"):
            active -= m.active_params()[0] - m.active_params()[1]
        elif m.__class__.__name__ == "MoELayer":
            n = sum(p.numel() for p in m.experts.parameters())
            active -= n - n * m.cfg.top_k // m.cfg.num_experts
    return {"total": total, "active": active}
