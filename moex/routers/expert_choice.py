"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Shape key: T tokens, D model dim, E experts, C tokens per expert (capacity), A assignments.

Scores are a softmax over experts per token, s_TE = softmax(x W). In training each
expert takes its top-C tokens by score, C = min(T, ceil(cf * T * k / E)) with cf =
`capacity_factor` (1.0 when None) and k = `top_k`; the gate is that score. A token
may get 0..E experts, every expert is exactly full: balance holds by construction.

Causality: choosing tokens per expert looks at every token of the batch, later
positions included, so it cannot run token by token at inference. In eval mode
(`module.eval()`) this router therefore routes *token-choice* top-k on the same
scores (gate = raw score, as in training) — causal, and what perplexity numbers
of an expert-choice model in this framework mean. See docs/routers.md.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from moex.routers.base import RouterOutput, fp32_logits, token_choice
from moex.routers.capacity import expert_capacity as capacity_formula
from moex.routers.registry import register
from moex.routers.topk import z_loss


def expert_capacity(T: int, k: int, E: int, capacity_factor: float | None) -> int:
    """Tokens each expert takes: min(T, ceil(cf * T * k / E)), cf = 1.0 when None."""
    cf = 1.0 if capacity_factor is None else capacity_factor
    return max(1, min(T, capacity_formula(cf, T, k, E)))


@register("expert_choice")
class ExpertChoiceRouter(nn.Module):
    def __init__(self, *, d_model: int, cfg):
        super().__init__()
        self.k, self.E, self.cf, self.z_coef = cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.z_loss_coef
        self.gate = nn.Linear(d_model, self.E, bias=False)

    def forward(self, x_TD: Tensor, experts=None) -> RouterOutput:
        logits_TE = fp32_logits(x_TD, self.gate.weight)
        probs_TE = logits_TE.softmax(-1)
        aux = {"z": self.z_coef * z_loss(logits_TE)} if self.z_coef and self.training else {}
        if not self.training:  # causal fallback: token-choice top-k on the same scores
            gate_TK, expert_TK = probs_TE.topk(self.k, dim=-1)
            return token_choice(expert_TK, gate_TK.type_as(x_TD), probs_TE, aux)
        T = x_TD.shape[0]
        C = expert_capacity(T, self.k, self.E, self.cf)
        gate_EC, token_EC = probs_TE.T.topk(C, dim=-1)  # each expert picks its C best tokens
        expert_A = torch.arange(self.E, device=x_TD.device).repeat_interleave(C)
        return RouterOutput(token_EC.reshape(-1), expert_A, gate_EC.reshape(-1).type_as(x_TD), probs_TE, aux)
