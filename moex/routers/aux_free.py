"""Sigmoid gates with auxiliary-loss-free bias balancing (DeepSeek-V3; Wang et al. 2024).

Shape key: T tokens, D model dim, E experts, K experts per token.

    s_TE = sigmoid(x W)                     affinity per expert
    chosen = top-k of (s_TE + b_E)          the bias only steers *selection*
    gate = s chosen / sum of s chosen       the bias never enters the output

`b_E` is a registered buffer (checkpointed with the model, not trained by the
optimizer). Training forward passes add their expert loads into `load_E`; after
each optimizer step the trainer calls `post_step()`, which (all-reducing the load
first when torch.distributed runs with world > 1) applies

    b_i += rate * sign(mean_load - load_i)

and clears the load. rate = `bias_update_rate`. No auxiliary loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moex.routers.base import RouterOutput, fp32_logits, token_choice
from moex.routers.registry import register


@register("aux_free")
class AuxFreeRouter(nn.Module):
    def __init__(self, *, d_model: int, cfg):
        super().__init__()
        self.k, self.E, self.rate = cfg.top_k, cfg.num_experts, cfg.bias_update_rate
        self.gate = nn.Linear(d_model, self.E, bias=False)
        self.register_buffer("bias_E", torch.zeros(self.E))
        self.register_buffer("load_E", torch.zeros(self.E), persistent=False)  # this step's assignments

    def forward(self, x_TD: Tensor, experts=None) -> RouterOutput:
        s_TE = torch.sigmoid(fp32_logits(x_TD, self.gate.weight))
        _, expert_TK = (s_TE + self.bias_E.float()).topk(self.k, dim=-1)
        s_TK = s_TE.gather(-1, expert_TK)
        gate_TK = s_TK / s_TK.sum(-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                self.load_E += torch.bincount(expert_TK.reshape(-1), minlength=self.E).to(self.load_E)
        probs_TE = s_TE / s_TE.sum(-1, keepdim=True)  # normalised affinities, for entropy stats
        return token_choice(expert_TK, gate_TK.type_as(x_TD), probs_TE, {})

    @torch.no_grad()
    def post_step(self) -> None:
        """Move each bias toward balance using the load seen since the last call, then reset it."""
        load = self.load_E.float().clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        if load.sum() > 0:
            self.bias_E += (self.rate * torch.sign(load.mean() - load)).to(self.bias_E)
        self.load_E.zero_()
