"""The sparse MoE layer: router -> permute -> grouped expert GEMMs -> weighted combine.

Shape key: T tokens, D model dim, E experts (El local to this rank), H hidden
units per expert, K experts per token, A assignments (token, expert) pairs.

Dropless by default: every assignment is computed, grouped by expert, with no
padding and no T x E x C dispatch tensor (memory O(A*D + E*D*H)). With
`capacity_factor` set, each expert keeps its first C = ceil(cf * T * K / E)
assignments in token order and the rest are dropped (counted in the stats).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moex.config import MoEConfig
from moex.models.mlp import activation
from moex.models.outputs import FFNOutput
from moex.ops import grouped_mm, permute, unpermute
from moex.routers import RouterOutput, build_router


class Experts(nn.Module):
    """E two-layer MLPs stored as stacked weights: y = act(x @ w1_EDH[e]) @ w2_EHD[e]."""

    def __init__(self, num_experts: int, d_model: int, d_expert: int, act: str = "relu", std: float = 0.02):
        super().__init__()
        self.w1_EDH = nn.Parameter(torch.randn(num_experts, d_model, d_expert) * std)
        self.w2_EHD = nn.Parameter(torch.randn(num_experts, d_expert, d_model) * std)
        self.act_name, self.act = act, activation(act)

    @property
    def num_experts(self) -> int:
        return self.w1_EDH.shape[0]

    def forward(self, x_AD: Tensor, counts_E: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
        """Rows of x_AD grouped by expert (counts_E). Returns (y_AD, hidden h_AH)."""
        h_AH = self.act(grouped_mm(x_AD, self.w1_EDH, counts_E, backend=backend))
        return grouped_mm(h_AH, self.w2_EHD, counts_E, backend=backend), h_AH


def capacity_mask(expert_sorted_A: Tensor, counts_E: Tensor, capacity: int) -> Tensor:
    """Keep the first `capacity` assignments of each expert (assignments sorted by expert)."""
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_A = torch.arange(expert_sorted_A.numel(), device=expert_sorted_A.device) - starts_E[expert_sorted_A]
    return pos_A < capacity


def routing_stats(r: RouterOutput, num_experts: int, num_tokens: int) -> dict[str, Tensor]:
    with torch.no_grad():
        p = r.probs_TE.float()
        return {
            "tokens_per_expert": torch.bincount(r.expert_A, minlength=num_experts).float(),
            "router_entropy": -(p * p.clamp_min(1e-12).log()).sum(-1).mean(),
        }


class MoELayer(nn.Module):
    """A sparse FFN. `forward(x)` accepts any leading shape (..., D) and returns FFNOutput."""

    def __init__(self, d_model: int, cfg: MoEConfig, *, std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg.router, d_model=d_model, cfg=cfg)
        self.experts = Experts(cfg.num_experts, d_model, cfg.d_expert, cfg.activation, std)
        # Expert-parallel dispatch is plugged in by moex.parallel (None = all experts local).
        self.dispatcher = None

    def forward(self, x: Tensor) -> FFNOutput:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T, E = x_TD.shape[0], self.cfg.num_experts
        r = self.router(x_TD, self.experts)
        stats = routing_stats(r, E, T)
        token_A, expert_A, gate_A = r.token_A, r.expert_A, r.gate_A
        if self.cfg.capacity_factor is not None:
            token_A, expert_A, gate_A, dropped = self._apply_capacity(token_A, expert_A, gate_A, T)
            stats["dropped_frac"] = torch.tensor(dropped / max(1, r.expert_A.numel()))
        else:
            stats["dropped_frac"] = torch.zeros(())
        x_AD, order_A, counts_E = permute(x_TD, token_A, expert_A, E)
        if self.dispatcher is None:
            y_AD, h_AH = self.experts(x_AD, counts_E, self.cfg.gemm_backend)
        else:
            y_AD, h_AH = self.dispatcher(self.experts, x_AD, counts_E, self.cfg.gemm_backend)
        y_TD = unpermute(y_AD, order_A, token_A, gate_A, T)
        with torch.no_grad():  # active hidden units per token / all E*H units (the wide sparse code)
            stats["active_frac"] = (h_AH > 0).sum() / (T * E * self.cfg.d_expert)
        return FFNOutput(y_TD.reshape(shape), r.aux_losses, stats)

    def _apply_capacity(self, token_A, expert_A, gate_A, T):
        E, k = self.cfg.num_experts, self.cfg.top_k
        capacity = math.ceil(self.cfg.capacity_factor * T * k / E)
        order = torch.argsort(expert_A, stable=True)
        counts_E = torch.bincount(expert_A, minlength=E)
        keep_sorted = capacity_mask(expert_A[order], counts_E, capacity)
        keep_A = torch.zeros_like(keep_sorted)
        keep_A[order] = keep_sorted
        dropped = int((~keep_A).sum())
        return token_A[keep_A], expert_A[keep_A], gate_A[keep_A], dropped
