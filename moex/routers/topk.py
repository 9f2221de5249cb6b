"""Softmax top-k routing: Switch (k=1) and GShard/Mixtral (k=2).

Shape key: T tokens, D model dim, E experts, K experts per token.

Logits are computed in fp32 (input and weight cast before the matmul). Gates are the
selected probabilities, renormalised over the K chosen when K > 1 (identical to
Mixtral's softmax over the selected logits; ``normalize_gates=False`` keeps the raw
probabilities, as Qwen2-MoE and OLMoE do by default); Switch (K = 1) keeps the raw
probability so the router still gets a gradient.
Aux losses: Switch load balance  alpha * E * sum_i f_i * P_i  (f_i = fraction of
assignments to expert i, P_i = mean router probability) and the router z-loss
z_coef * mean(logsumexp(logits)^2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moex.routers.base import RouterOutput, fp32_logits, token_choice
from moex.routers.registry import register


def switch_balance_loss(probs_TE: Tensor, expert_TK: Tensor) -> Tensor:
    """E * sum_i f_i P_i (equals 1 when perfectly balanced)."""
    E = probs_TE.shape[-1]
    f_E = torch.bincount(expert_TK.reshape(-1), minlength=E).float() / expert_TK.numel()
    return E * (f_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


@register("topk")
class TopKRouter(nn.Module):
    def __init__(self, *, d_model: int, cfg):
        super().__init__()
        self.k, self.E = cfg.top_k, cfg.num_experts
        self.aux_coef, self.z_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        self.normalize = cfg.normalize_gates
        self.gate = nn.Linear(d_model, self.E, bias=False)

    def forward(self, x_TD: Tensor, experts=None) -> RouterOutput:
        logits_TE = fp32_logits(x_TD, self.gate.weight)
        probs_TE = logits_TE.softmax(-1)
        gate_TK, expert_TK = probs_TE.topk(self.k, dim=-1)
        if self.k > 1 and self.normalize:
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)
        aux = {}
        if self.aux_coef:
            aux["balance"] = self.aux_coef * switch_balance_loss(probs_TE, expert_TK)
        if self.z_coef:
            aux["z"] = self.z_coef * z_loss(logits_TE)
        return token_choice(expert_TK, gate_TK.type_as(x_TD), probs_TE, aux)
