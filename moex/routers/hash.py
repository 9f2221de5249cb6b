"""A fixed random router: a sanity baseline in the spirit of Hash Layers (Roller et al. 2021).

Shape key: T tokens, D model dim, E experts, K experts per token.

True hash routing maps *token ids* to experts; a router here sees only hidden
states x_TD, so this is a frozen random projection instead: expert choice =
top-k of x R with R ~ N(0, 1/D) fixed at init (a buffer: saved with the model,
never trained), gates uniform 1/k. Similar hidden states land on the same
experts (locality-sensitive hashing), but nothing about the routing is learned:
any gain a learned router shows over this one is the value of learning to route.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moex.routers.base import RouterOutput, fp32_logits, token_choice
from moex.routers.registry import register


@register("hash")
class HashRouter(nn.Module):
    def __init__(self, *, d_model: int, cfg):
        super().__init__()
        self.k, self.E = cfg.top_k, cfg.num_experts
        self.register_buffer("proj_DE", torch.randn(d_model, self.E) / d_model**0.5)

    def forward(self, x_TD: Tensor, experts=None) -> RouterOutput:
        logits_TE = fp32_logits(x_TD.detach(), self.proj_DE.T)
        expert_TK = logits_TE.topk(self.k, dim=-1).indices
        gate_TK = torch.full(expert_TK.shape, 1.0 / self.k, dtype=x_TD.dtype, device=x_TD.device)
        return token_choice(expert_TK, gate_TK, logits_TE.softmax(-1), {})
