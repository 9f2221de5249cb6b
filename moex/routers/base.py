"""What every router returns, and helpers shared by routers.

Shape key: T tokens, D model dim, E experts, K experts per token,
A assignments (token, expert) pairs after routing (A = T*K for token choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RouterOutput:
    """A routing decision as a flat list of (token, expert, gate) assignments.

    Token-choice routers produce A = T*K assignments; expert-choice routers any
    number. The MoE layer sorts assignments by expert, runs the experts and
    scatters gate-weighted outputs back to their tokens.
    """

    token_A: Tensor  # (A,) long, token index
    expert_A: Tensor  # (A,) long, expert index
    gate_A: Tensor  # (A,) float, combine weight (differentiable)
    probs_TE: Tensor  # (T, E) the router's distribution over experts (for entropy stats)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # already scaled by their coefficients
    # (A,) rank of each assignment among its token's choices (0 = first); None = no ranks
    # (expert choice). The gshard capacity policy serves all first choices first.
    choice_A: Tensor | None = None


def token_choice(expert_TK: Tensor, gate_TK: Tensor, probs_TE: Tensor, aux_losses: dict | None = None) -> RouterOutput:
    """Flatten a (T, K) top-k choice into assignments."""
    T, K = expert_TK.shape
    token_A = torch.arange(T, device=expert_TK.device).repeat_interleave(K)
    choice_A = torch.arange(K, device=expert_TK.device).repeat(T)
    return RouterOutput(token_A, expert_TK.reshape(-1), gate_TK.reshape(-1), probs_TE, aux_losses or {}, choice_A)


def fp32_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """Router logits ``x @ w^T`` computed in fp32 whatever the training dtype.

    Input and weight are cast to fp32 *before* the matmul, with autocast off (as HF Switch
    and DeepSpeed do): a bf16 GEMM flips near-tied top-k choices against the fp32 result.
    Gradients flow back to both in their own dtypes.
    """
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return F.linear(x_TD.float(), weight_ED.float())
