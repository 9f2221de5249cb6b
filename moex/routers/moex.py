"""MoE-X sparsity-aware router (arXiv 2503.07639).

Shape key: T tokens, D model dim, E experts, H hidden units per expert, K top-k.

Each expert is E_j(x) = W_dec_j ReLU(W_enc_j x). Treat the H encoder weights that
feed input dim d as samples with mean mu_jd and variance s_jd; a hidden
pre-activation is then ~ N(mu_j.x, s_j.(x*x)), positive with probability
Phi(mu/sigma). The router prefers the expert whose ReLU code will be sparsest:

    logit_j = -erf(mu_h / (sqrt(2) sigma_h))      (higher = fewer active units)

top-k of E, softmax over the selected logits. It has no parameters of its own:
it reads the experts' encoder weights (`experts.w1_EDH`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moex.routers.base import RouterOutput, token_choice
from moex.routers.registry import register
from moex.routers.topk import switch_balance_loss


def sparsity_logits(x_TD: Tensor, w1_EDH: Tensor, eps: float = 1e-6) -> Tensor:
    """-erf(mu/(sqrt2 sigma)) per token and expert: the MoE-X gate logits (T, E)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):  # fp32, as every router's logits
        mu_ED = w1_EDH.float().mean(-1)
        var_ED = w1_EDH.float().var(-1, unbiased=False)
        x = x_TD.float()
        mu_TE = x @ mu_ED.T
        sigma_TE = ((x * x) @ var_ED.T).clamp_min(eps).sqrt()
        return -torch.erf(mu_TE / (math.sqrt(2.0) * sigma_TE))


@register("moex")
class MoEXRouter(nn.Module):
    def __init__(self, *, d_model: int, cfg):
        super().__init__()
        self.k, self.aux_coef = cfg.top_k, cfg.aux_loss_coef
        if cfg.activation != "relu":
            raise ValueError("the MoE-X router assumes ReLU experts: set model.moe.activation=relu")

    def forward(self, x_TD: Tensor, experts) -> RouterOutput:
        logits_TE = sparsity_logits(x_TD, experts.w1_EDH)
        top_TK, expert_TK = logits_TE.topk(self.k, dim=-1)
        gate_TK = top_TK.softmax(-1)
        probs_TE = logits_TE.softmax(-1)  # for entropy statistics and the balance loss
        aux = {}
        if self.aux_coef:
            aux["balance"] = self.aux_coef * switch_balance_loss(probs_TE, expert_TK)
        return token_choice(expert_TK, gate_TK.type_as(x_TD), probs_TE, aux)
